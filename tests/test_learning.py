"""Learning test: the real pipeline learns on a small synthetic world (CPU, about three minutes).

One module-scoped run: a 400 + 80 scene world, the ResNet tiny CLIP trained in this session
(100 steps), the baseline CAM network (100 steps), CLIMS (OTM+BTM+REG+CBS, synth preset
weights) from the baseline (120 steps, as the papers start) and from random weights (600
steps). Val CAMs of an untrained network, the baseline and both CLIMS networks are scored with
`wsclip.demo.cam_metrics`: CAM mIoU (best background threshold), object AUC (threshold-free: does
a class's CAM rank its object pixels above background pixels), co-occurring-background false
activation (co-bg FA) and object coverage (both at CAM > 0.15).

Measured on the 2-core dev box (seed 0, torch 2.14.1 CPU):
- tiny CLIP top-1 in labels 0.725, masked-object top-1 0.55 (chance 0.17);
- CAM mIoU / object AUC: untrained 0.206 / 0.658, baseline 0.138 / 0.462 (it learned the
  co-occurring backgrounds), CLIMS from random weights 0.245 / 0.771 (training seeds 1 and 2,
  same world and CLIP: 0.215 / 0.689 and 0.251 / 0.795);
- co-bg FA untrained 0.57, baseline 0.76, CLIMS from the baseline 0.46 (torch 2.15: 0.24), its
  object coverage 0.41.
Broken on purpose (same runs, one change each), every one fails a check:
- OTM sign flipped: from random weights mIoU 0.153 / AUC 0.532; from the baseline co-bg FA 0.63;
- BTM sign flipped: 0.178 / 0.642; coverage 0.06;
- fg and bg swapped: 0.168 / 0.582; coverage 0.00.
At this budget CLIMS started from the baseline does not yet beat the untrained network on mIoU
(0.16): it first has to unlearn the backgrounds (the longer run in BENCHMARKS.md does).
"""

from __future__ import annotations

import json

import pytest
import torch

from wsclip.demo import DemoConfig, _bg_of_val, build_world, cam_metrics, train_baseline, train_variant

N_TRAIN, N_VAL = 400, 80
CLIP_STEPS, CLIP_BATCH = 100, 32
CAM_STEPS, CLIMS_STEPS, SCRATCH_STEPS = 100, 120, 600
MIN_CLIP_TOP1 = 0.55  # "the tiny CLIP ranks a right class first for most val images" (measured 0.725)
MIN_OBJECT_TOP1 = 0.35  # masked objects alone, 6 classes (chance 0.17; measured 0.55)
MIN_BASELINE_EXCESS_FA = 0.10  # baseline over untrained co-bg FA (measured +0.19)
MIN_CLIMS_FA_DROP = 0.20  # CLIMS under baseline co-bg FA (measured -0.31, torch 2.15 -0.52; OTM sign flipped -0.14)
MIN_CLIMS_COVERAGE = 0.15  # CLIMS still covers its objects (measured 0.41; BTM flipped 0.06, fg/bg swapped 0.00)
# CLIMS from random weights over the untrained network: measured +0.113 AUC / +0.039 mIoU (training seeds 1 and 2:
# +0.031 / +0.009 and +0.137 / +0.045); every broken variant lands below the untrained network on both
MIN_AUC_GAIN, MIN_MIOU_GAIN = 0.02, 0.005
MIN_MIOU_OVER_BASELINE = 0.05  # measured +0.107


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    from wsclip.data import open_dataset
    from wsclip.label.clims_cam import make_cams
    from wsclip.models.camnet import build_camnet
    from wsclip.train.clims import load_frozen_clip
    from wsclip.train.tiny_clip import TinyClipConfig, train_tiny_clip

    root = tmp_path_factory.mktemp("learning")
    cfg = DemoConfig(out=str(root), n_train=N_TRAIN, n_val=N_VAL, cam_steps=CAM_STEPS, clims_steps=CLIMS_STEPS,
                     workers=0)
    world = build_world(cfg, root)
    val = open_dataset(f"voc:{world}", split="val")
    backgrounds = _bg_of_val(cfg, val.ids)

    clip_file = root / "tiny-clip.safetensors"
    summary = train_tiny_clip(clip_file, TinyClipConfig(steps=CLIP_STEPS, batch_size=CLIP_BATCH, warmup=5, arch="rn",
                                                        checkpoint_every=0), eval_n=N_VAL)
    clip = load_frozen_clip(str(clip_file), "cpu")

    cam_ckpt = train_baseline(cfg, world, root / "runs")
    clims_ckpt = train_variant(cfg, "OTM+BTM+REG+CBS", world, root / "runs", cam_ckpt, clip_file, clip)
    scratch_ckpt = train_variant(cfg, "OTM+BTM+REG+CBS", world, root / "runs", None, clip_file, clip,
                                 steps=SCRATCH_STEPS)
    torch.manual_seed(0)
    nets = {"untrained": build_camnet("tiny", len(val.classes)).eval(), "baseline": cam_ckpt, "clims": clims_ckpt,
            "clims_scratch": scratch_ckpt}
    scores = {}
    for name, net in nets.items():
        make_cams(net, val, root / "cams" / name, split="val", scales=(1.0, 2.0), device="cpu", num_workers=0)
        scores[name] = cam_metrics(root / "cams" / name, val, backgrounds)
    report = {"clip": summary["eval"], **{k: {m: v[m] for m in ("cam_miou", "threshold", "co_bg_fa", "object_coverage",
                                                                     "object_auc")}
                                          for k, v in scores.items()}}
    print("learning test figures:", json.dumps(report))
    return report


def test_tiny_clip_ranks_a_right_class_first_for_most_val_images(learned):
    assert learned["clip"]["top1_in_labels"] >= MIN_CLIP_TOP1, learned["clip"]


def test_tiny_clip_recognises_masked_objects_without_their_background(learned):
    assert learned["clip"]["object_top1"] >= MIN_OBJECT_TOP1, learned["clip"]


def test_the_baseline_cam_fires_on_co_occurring_background(learned):
    assert learned["baseline"]["co_bg_fa"] >= learned["untrained"]["co_bg_fa"] + MIN_BASELINE_EXCESS_FA, learned


def test_clims_suppresses_the_co_occurring_background(learned):
    assert learned["clims"]["co_bg_fa"] <= learned["baseline"]["co_bg_fa"] - MIN_CLIMS_FA_DROP, learned


def test_clims_still_covers_its_objects(learned):
    assert learned["clims"]["object_coverage"] >= MIN_CLIMS_COVERAGE, learned


def test_clims_localises_objects_better_than_untrained_and_baseline(learned):
    auc = {k: learned[k]["object_auc"] for k in ("untrained", "baseline", "clims_scratch")}
    assert auc["clims_scratch"] >= auc["untrained"] + MIN_AUC_GAIN, learned
    assert auc["clims_scratch"] >= auc["baseline"] + MIN_AUC_GAIN, learned


def test_clims_cam_miou_beats_untrained_and_baseline(learned):
    miou = {k: learned[k]["cam_miou"] for k in ("untrained", "baseline", "clims_scratch")}
    assert miou["clims_scratch"] >= miou["untrained"] + MIN_MIOU_GAIN, learned
    assert miou["clims_scratch"] >= miou["baseline"] + MIN_MIOU_OVER_BASELINE, learned
