"""`wsclip demo` and the synthetic ablation: the whole pipeline on the synthetic world.

Stages (each resumable: a re-run skips finished outputs under `out`):

1. the world (`wsclip.data.synth.write_voc_layout`, lossless PNG) in <out>/world;
2. the tiny CLIP (`wsclip.train.tiny_clip.ensure_tiny_clip`, cached in the cache folder);
3. the baseline CAM network (`train_cam`), and an untrained network as the floor;
4. CLIMS from the baseline with the loss variants OTM; OTM+BTM; OTM+BTM+REG; OTM+BTM+REG+CBS
   (the synth preset's weights, switched-off terms weighted 0), and the full loss once more from
   random weights (`scratch_steps`; the baseline here has learned the co-occurring backgrounds,
   which CLIMS started from it must first unlearn);
5. multi-scale CAMs of the val split for every network (`make_cams`), CLIP-ES with the tiny
   CLIP (GradCAM and CAA maps, `make_clip_es_cams`);
6. refinement: dense CRF pseudo masks (`make_pseudo_masks`), optionally the IRN random walk
   (boundary network trained on CAM seeds of the train split);
7. the table (CAM mIoU with the best background threshold, pseudo-mask mIoU, and the
   fraction of co-occurring-background pixels wrongly activated), a bar chart and overlays.

Co-occurring-background false activation ("co-bg FA"): for each val image and each class c
present whose preferred background (SYNTH_PREFERRED) is the image's background, the share of
ground-truth background pixels at least `fa_margin` px away from every object where c's CAM
exceeds `fa_threshold`; pooled over all such (image, class) pairs. Its counterpart "object
coverage" is the share of ground-truth object pixels where the object's own class CAM exceeds
`fa_threshold` (pooled over every present class): a map that switches off everywhere has no
co-bg FA and no coverage either. "Object AUC" needs no threshold: for each present class, the
probability that a random pixel of that class's objects scores higher in its CAM than a random
ground-truth background pixel (ties count half), averaged over (image, class) pairs; 0.5 is chance.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from wsclip.demo_report import (  # noqa: F401 - EFFECTS, COLUMNS, ranking_auc: part of the demo's API
    COLUMNS, EFFECTS, SWEEP, cam_metrics, effects, format_effects, format_table, mask_miou, pick_examples,
    pseudo_masks, ranking_auc, save_overlays)
from wsclip.errors import WsclipError

#: CLIMS loss variants: name -> which of (OTM, BTM, CBS, REG) are on
VARIANTS: dict[str, tuple[bool, bool, bool, bool]] = {
    "OTM": (True, False, False, False),
    "OTM+BTM": (True, True, False, False),
    "OTM+BTM+REG": (True, True, False, True),
    "OTM+BTM+REG+CBS": (True, True, True, True),
}
MARKER = "demo.json"


def default_cache_dir() -> Path:
    """$WSCLIP_CACHE, else $XDG_CACHE_HOME/wsclip, else ~/.cache/wsclip."""
    from wsclip.io import cache_dir

    return cache_dir()


@dataclass
class DemoConfig:
    """Settings of a demo / ablation run; `demo()` is the reduced run, `full()` the benchmark."""

    out: str = "demo_out"
    cache_dir: str | None = None  # tiny CLIP cache (default: default_cache_dir())
    seed: int = 0  # world and tiny CLIP
    train_seed: int | None = None  # CAM / CLIMS / IRN training (default: seed)
    size: int = 128  # wsclip.data.synth.SYNTH_SIZE
    n_train: int = 1000
    n_val: int = 100
    clip_steps: int = 200  # the ResNet tiny CLIP CLIMS trains against
    clip_es_steps: int = 600  # the ViT tiny CLIP CLIP-ES labels with (0 with clip_es off); see BENCHMARKS.md: with
    #                           one masked view, 200 steps give masked objects their class 28% of the time, 600 82%
    clip_es_lr: float = 2e-3  # the ViT learns the objects slowly at the default 1e-3
    clip_es_masked_views: int = 2  # masked-object views per scene for the ViT: 600 steps give masked objects their
    #                                class 91% of the time instead of 82% with one (BENCHMARKS.md)
    clip_batch: int = 32
    cam_steps: int = 150
    clims_steps: int = 300  # from the baseline; at 150 the all-terms row moved 22.5-37.8 over three seeds (BENCHMARKS.md)
    scratch_steps: int = 0  # CLIMS (all terms) from random weights as one more row (0: off)
    batch_size: int = 16
    cam_lr: float | None = None  # None: the synth preset's (CamConfig)
    clims_lr: float | None = None  # None: the synth preset's (ClimsConfig: the paper's 2.5e-4)
    # alpha OTM, beta BTM, gamma CBS, delta REG: the synth preset's (REG at the CLIMS paper's 1.15)
    weights: tuple[float, float, float, float] = (10.0, 24.0, 1.0, 1.15)
    tau: float = 0.26
    variants: tuple[str, ...] = tuple(VARIANTS)
    scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)
    clip_es: bool = True
    crf: bool = True
    irn: bool = False
    irn_steps: int = 150
    irn_images: int = 0  # train images the IRN boundary network learns from (0: all)
    threshold_images: int = 300  # train images the IRN seed thresholds are chosen on
    rw_images: int = 100  # train images the random walk's background threshold is chosen on
    fa_threshold: float = 0.15
    fa_margin: int = 3
    overlays: int = 6
    workers: int = 1

    @classmethod
    def demo(cls, **kw) -> "DemoConfig":
        return cls(**kw)

    @classmethod
    def full(cls, **kw) -> "DemoConfig":
        base = dict(out="runs/synth_ablation", irn=True, irn_images=300)
        return cls(**{**base, **kw})

    @property
    def tseed(self) -> int:
        return self.seed if self.train_seed is None else int(self.train_seed)

    def key(self) -> dict:
        """Settings that change results (a finished folder made with others is not reused)."""
        d = dataclasses.asdict(self)
        for k in ("out", "cache_dir", "overlays", "workers"):
            d.pop(k)
        return json.loads(json.dumps(d))


# ============================================================================ small helpers
def _stage(n: int, total: int, text: str) -> None:
    print(f"[{n}/{total}] {text}", file=sys.stderr, flush=True)


def _check_out(cfg: DemoConfig, fresh: bool) -> Path:
    """The output folder; refuses to mix results of other settings unless `fresh` (which clears it)."""
    from wsclip.io import atomic_write_json

    out = Path(cfg.out)
    marker = out / MARKER
    if out.exists() and any(out.iterdir()):
        if not marker.is_file():
            if fresh:
                raise WsclipError(f"{out} is not a wsclip demo folder: refusing to delete it; choose another --out")
            raise WsclipError(f"{out} exists and is not a wsclip demo folder: choose another --out")
        old = json.loads(marker.read_text()).get("settings")
        if fresh:
            shutil.rmtree(out)
        elif old != cfg.key():
            changed = sorted(k for k in cfg.key() if (old or {}).get(k) != cfg.key()[k])
            raise WsclipError(f"{out} holds a run with other settings ({', '.join(changed)}): pass --fresh to "
                              "start over, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, {"settings": cfg.key()})
    return out


def _fit(train_fn, cfg, **kw) -> Path:
    """Run a train_* function unless its final checkpoint exists; resume a killed run."""
    from wsclip.train.baseline_cam import FINAL_NAME

    out = Path(cfg.out)
    final = out / FINAL_NAME
    if final.is_file():
        return final
    return train_fn(cfg, resume=(out / "checkpoints").is_dir(), **kw)


def _bg_of_val(cfg: DemoConfig, ids: Sequence[str], split: str = "val") -> dict[str, int]:
    """Background index of every scene of `split` (the generator knows it)."""
    from wsclip.data.synth import generate_scene

    return {i: generate_scene(cfg.seed, split, int(i.rsplit("_", 1)[1]), cfg.size).background for i in ids}


# ============================================================================ stages
def build_world(cfg: DemoConfig, out: Path) -> Path:
    """The synthetic world as a VOC-layout folder (lossless PNG images); resumes."""
    from wsclip.data.synth import write_voc_layout

    return write_voc_layout(out / "world", cfg.n_train, cfg.n_val, seed=cfg.seed, size=cfg.size, image_format="png")


def tiny_clip_path(cfg: DemoConfig, arch: str = "rn") -> Path:
    """A trained tiny CLIP ("rn" for CLIMS, "vit" for CLIP-ES) for these settings, from the cache or trained now."""
    from wsclip.train.tiny_clip import TinyClipConfig, ensure_tiny_clip

    steps = cfg.clip_steps if arch == "rn" else cfg.clip_es_steps
    base = TinyClipConfig()
    warmup = base.warmup if steps >= base.steps else min(base.warmup, max(1, steps // 15))
    tc = TinyClipConfig(steps=steps, batch_size=cfg.clip_batch, warmup=warmup, seed=cfg.seed, size=cfg.size, arch=arch,
                        **({"lr": cfg.clip_es_lr, "masked_views": cfg.clip_es_masked_views} if arch == "vit" else {}))
    return ensure_tiny_clip(Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(), seed=cfg.seed, cfg=tc)


def loss_weights(cfg: DemoConfig, variant: str) -> dict[str, float]:
    """alpha/beta/gamma/delta of a CLIMS variant: the configured weights with the terms it omits at 0."""
    if variant not in VARIANTS:
        raise WsclipError(f"unknown CLIMS variant '{variant}': use one of {', '.join(VARIANTS)}")
    on = VARIANTS[variant]
    a, b, g, d = cfg.weights
    return {"alpha": a if on[0] else 0.0, "beta": b if on[1] else 0.0, "gamma": g if on[2] else 0.0,
            "delta": d if on[3] else 0.0}


def _crops(cfg: DemoConfig) -> dict:
    """Training crop and long-side resize range for the world's size (the synth preset's, 128 px, scaled)."""
    return {"crop": cfg.size, "resize_long": (3 * cfg.size // 4, 5 * cfg.size // 4)}


def _lr(lr: float | None) -> dict:
    """The learning-rate override of a demo setting (none: the synth preset's)."""
    return {} if lr is None else {"lr": float(lr)}


def untrained_net(num_classes: int):
    """The floor row: a randomly initialised CAM network of the synth preset's backbone (seed it first)."""
    from wsclip.config import CamConfig, from_preset
    from wsclip.models.camnet import build_camnet

    return build_camnet(from_preset(CamConfig, "synth").backbone, num_classes).eval()


def train_baseline(cfg: DemoConfig, world: Path, runs: Path) -> Path:
    from wsclip.config import CamConfig, from_preset
    from wsclip.train.baseline_cam import train_cam

    c = from_preset(CamConfig, "synth", data=f"voc:{world}", split="train", out=str(runs / "cam"), **_crops(cfg),
                    max_steps=cfg.cam_steps, batch_size=cfg.batch_size, seed=cfg.tseed, **_lr(cfg.cam_lr),
                    device="cpu", num_workers=cfg.workers, ckpt_every=max(50, cfg.cam_steps // 3))
    return _fit(train_cam, c)


def train_variant(cfg: DemoConfig, variant: str, world: Path, runs: Path, init: Path | None, clip_file: Path, clip,
                  steps: int | None = None) -> Path:
    """CLIMS with one loss variant from the baseline checkpoint (`init`; None: from random weights).

    Returns the final checkpoint; `steps` defaults to cfg.clims_steps.
    """
    from wsclip.config import ClimsConfig, from_preset
    from wsclip.train.clims import train_clims

    steps = int(steps or cfg.clims_steps)
    name = slug(f"CLIMS {variant}") + ("" if init else "-scratch")
    c = from_preset(ClimsConfig, "synth", data=f"voc:{world}", split="train", out=str(runs / name), **_crops(cfg),
                    max_steps=steps, batch_size=cfg.batch_size, seed=cfg.tseed, **_lr(cfg.clims_lr),
                    init=str(init) if init else None, clip=str(clip_file), tau=cfg.tau, text="synth", device="cpu",
                    num_workers=cfg.workers, ckpt_every=max(50, steps // 3), **loss_weights(cfg, variant))
    return _fit(train_clims, c, clip=clip)


def slug(name: str) -> str:
    """File-name form of a method name: 'CLIMS OTM+BTM' -> 'clims-otm-btm'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ============================================================================ run
def run_demo(cfg: DemoConfig | None = None, fresh: bool = False) -> dict:
    """Run every stage (skipping finished ones) and write table.md/json, a bar chart and overlays under cfg.out."""
    import torch

    from wsclip.data import open_dataset
    from wsclip.eval.viz import bar_chart
    from wsclip.io import atomic_write_json, atomic_write_text
    from wsclip.label.clims_cam import make_cams
    from wsclip.train.clims import load_frozen_clip

    cfg = cfg or DemoConfig()
    for v in cfg.variants:
        loss_weights(cfg, v)  # unknown names fail before any work
    t_start = time.time()
    times: dict[str, float] = {}
    out = _check_out(cfg, fresh)
    runs, cams_root, masks_root = out / "runs", out / "cams", out / "masks"
    total = 7 + (1 if cfg.irn else 0)
    step = 0

    def stage(text):
        nonlocal step
        step += 1
        _stage(step, total, text)
        return time.time()

    t = stage(f"synthetic world: {cfg.n_train} train + {cfg.n_val} val scenes, {cfg.size} px")
    world = build_world(cfg, out)
    val = open_dataset(f"voc:{world}", split="val")
    backgrounds = _bg_of_val(cfg, val.ids)
    times["world"] = time.time() - t

    what = f"ResNet {cfg.clip_steps} steps for CLIMS" + (f", ViT {cfg.clip_es_steps} steps for CLIP-ES" if cfg.clip_es else "")
    t = stage(f"tiny CLIPs ({what}; cached after the first run)")
    clip_file = tiny_clip_path(cfg, "rn")
    clip = load_frozen_clip(str(clip_file), "cpu")
    vit_file = tiny_clip_path(cfg, "vit") if cfg.clip_es else None
    zero_shot = {"ResNet (CLIMS)": _zero_shot(clip_file)}
    if vit_file is not None:
        zero_shot["ViT (CLIP-ES)"] = _zero_shot(vit_file)
    times["tiny_clip"] = time.time() - t

    t = stage(f"baseline CAM network ({cfg.cam_steps} steps)")
    cam_ckpt = train_baseline(cfg, world, runs)
    times["baseline"] = time.time() - t

    t = stage(f"CLIMS variants ({cfg.clims_steps} steps each): {', '.join(cfg.variants)}")
    ckpts = {}
    for v in cfg.variants:
        print(f"  CLIMS {v}: {loss_weights(cfg, v)}", file=sys.stderr, flush=True)
        ckpts[v] = train_variant(cfg, v, world, runs, cam_ckpt, clip_file, clip)
    last = "all" if cfg.variants[-1] == "OTM+BTM+REG+CBS" else cfg.variants[-1]
    scratch_name = f"CLIMS {last}, random init"  # short: it titles the overlay panels
    if cfg.scratch_steps:
        print(f"  {scratch_name}: {cfg.scratch_steps} steps", file=sys.stderr, flush=True)
        scratch = train_variant(cfg, cfg.variants[-1], world, runs, None, clip_file, clip, steps=cfg.scratch_steps)
    times["clims"] = time.time() - t

    t = stage("val CAMs (multi-scale + flip) and CLIP-ES")
    torch.manual_seed(cfg.tseed)
    nets: dict[str, object] = {"untrained": untrained_net(len(val.classes)), "baseline CAM": cam_ckpt}
    nets.update({f"CLIMS {v}": p for v, p in ckpts.items()})
    if cfg.scratch_steps:
        nets[scratch_name] = scratch
    for name, net in nets.items():
        make_cams(net, val, cams_root / slug(name), split="val", scales=cfg.scales, device="cpu", num_workers=0)
    if cfg.clip_es:
        from wsclip.data.synth import SYNTH_BACKGROUND_WORDS
        from wsclip.label.clip_es import ClipEsConfig, make_clip_es_cams

        make_clip_es_cams(load_frozen_clip(str(vit_file), "cpu"), val, cams_root / "clip-es", split="val", device="cpu", num_workers=0,
                          cfg=ClipEsConfig(background=tuple(SYNTH_BACKGROUND_WORDS)))
    times["cams"] = time.time() - t

    irn_ckpt, irn_thresholds = None, None
    if cfg.irn:
        t = stage(f"IRN boundary network from the seeds of CLIMS {cfg.variants[-1]} ({cfg.irn_steps} steps)")
        irn_ckpt, irn_thresholds = train_boundary(cfg, world, runs, cams_root, ckpts[cfg.variants[-1]], cam_ckpt)
        times["irn"] = time.time() - t

    t = stage("pseudo masks" + (" (dense CRF)" if cfg.crf else "") + (" and random walk" if cfg.irn else ""))
    rows: dict[str, dict] = {}
    refine = "CRF" if cfg.crf else "threshold"
    for name in nets:
        r = cam_metrics(cams_root / slug(name), val, backgrounds, fa_threshold=cfg.fa_threshold, fa_margin=cfg.fa_margin)
        r.update(cams=str(cams_root / slug(name)), refinement=refine)
        mdir = pseudo_masks(cams_root / slug(name), masks_root / slug(name), val, threshold=r["threshold"], crf=cfg.crf)
        r.update(masks=str(mdir), mask_miou=mask_miou(mdir, world))
        rows[name] = r
    if irn_ckpt is not None:
        src = f"CLIMS {cfg.variants[-1]}"
        r = dict(rows[src])
        mdir = pseudo_masks(cams_root / slug(src), masks_root / (slug(src) + "-rw"), val, crf=False, irn=irn_ckpt,
                            rw_threshold=irn_thresholds["rw_bg_threshold"])
        r.update(masks=str(mdir), mask_miou=mask_miou(mdir, world), refinement="IRN random walk")
        rows[f"{src} + RW"] = r
    if cfg.clip_es:
        d = cams_root / "clip-es"
        # the paper's steps: GradCAM, + CAA, + CRF (pseudo masks with the (1 - max) background)
        steps = [("CLIP-ES GradCAM", "high_res_raw", False), ("CLIP-ES + CAA", "high_res", False)]
        if cfg.crf:
            steps.append(("CLIP-ES + CAA + CRF", "high_res", True))
        for name, key, crf in steps:
            r = cam_metrics(d, val, backgrounds, key=key, fa_threshold=cfg.fa_threshold, fa_margin=cfg.fa_margin)
            mdir = pseudo_masks(d, masks_root / slug(name), val, key=key, bg="power", crf=crf)
            r.update(cams=str(d), key=key, masks=str(mdir), mask_miou=mask_miou(mdir, world),
                     refinement="(1-max) bg" + (" + CRF" if crf else ""))
            rows[name] = r
    times["pseudo"] = time.time() - t

    t = stage("table, bar chart and overlays")
    found = effects(rows)
    table = format_table(rows) + "\n\n" + format_effects(found)
    atomic_write_text(out / "table.md", _table_doc(cfg, table, zero_shot))
    bar_chart(out / "table.png", {n.replace("CLIMS ", "").replace("+", "+\n"): {
        "CAM mIoU": 100 * r["cam_miou"], "pseudo-mask mIoU": 100 * r["mask_miou"], "co-bg FA": 100 * r["co_bg_fa"]}
        for n, r in rows.items()}, title=f"synthetic world, val split ({cfg.n_val} images)", ylabel="%")
    picks = pick_examples(val, backgrounds, cfg.overlays)
    (out / "overlays").mkdir(exist_ok=True)
    for name, r in rows.items():
        save_overlays(out / "overlays" / f"{slug(name)}.png", val, {name: r}, picks)
    clip_es_row = "CLIP-ES + CAA + CRF" if cfg.crf else "CLIP-ES + CAA"
    compare = {k: rows[k] for k in ("baseline CAM", f"CLIMS {cfg.variants[-1]}", scratch_name, clip_es_row)
               if k in rows}
    save_overlays(out / "overlays.png", val, compare, picks)
    times["report"] = time.time() - t
    times["total"] = time.time() - t_start
    result = {"settings": cfg.key(), "tiny_clip": str(clip_file), "tiny_clip_zero_shot": zero_shot,
              "irn_thresholds_from_train": irn_thresholds, "effects": found,
              "rows": rows, "seconds": {k: round(v, 1) for k, v in times.items()},
              "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    atomic_write_json(out / "table.json", result)
    return result


def train_boundary(cfg: DemoConfig, world: Path, runs: Path, cams_root: Path, cam_source: Path,
                   cam_ckpt: Path) -> tuple[Path, dict]:
    """IRN boundary network from the seeds of `cam_source`'s CAMs on the train split (backbone: the baseline's).

    The seed thresholds come from the train split (never val): with t the best CAM background
    threshold on train, fg = t + 0.15 and bg = t - 0.05 (IRN's 0.30 / 0.10 around its CAMs' ~0.15).
    Returns (checkpoint, {"train_cam_threshold", "fg_threshold", "bg_threshold", "train_cam_miou"}).
    """
    from wsclip.config import IrnConfig, from_preset
    from wsclip.data import open_dataset
    from wsclip.label.clims_cam import make_cams
    from wsclip.train.irn import FINAL_NAME, train_irn

    from wsclip.data.synth import scene_id
    from wsclip.io import atomic_write_text

    split = "train"
    if 0 < cfg.irn_images < cfg.n_train:  # a split list of the first irn_images train scenes
        split = f"train{cfg.irn_images}"
        atomic_write_text(world / "ImageSets" / "Segmentation" / f"{split}.txt",
                          "".join(f"{scene_id('train', i)}\n" for i in range(cfg.irn_images)))
    train_cams = cams_root / "train-for-irn"
    make_cams(cam_source, f"voc:{world}", train_cams, split=split, scales=cfg.scales, device="cpu", num_workers=0)
    train = _Subset(open_dataset(f"voc:{world}", split=split), cfg.threshold_images)
    r = cam_metrics(train_cams, train, _bg_of_val(cfg, train.ids, "train"), fa_threshold=cfg.fa_threshold,
                    fa_margin=cfg.fa_margin)
    t = r["threshold"]
    chosen = {"train_cam_threshold": t, "train_cam_miou": r["cam_miou"],
              "fg_threshold": round(min(0.95, t + 0.15), 2), "bg_threshold": round(max(0.05, t - 0.05), 2)}
    c = from_preset(IrnConfig, "synth", data=f"voc:{world}", split=split, out=str(runs / "irn"), cams=str(train_cams),
                    **_crops(cfg), max_steps=cfg.irn_steps, seed=cfg.tseed, device="cpu", num_workers=cfg.workers,
                    backbone_from=str(cam_ckpt), seed_workers=1, ckpt_every=max(50, cfg.irn_steps // 3),
                    fg_threshold=chosen["fg_threshold"], bg_threshold=chosen["bg_threshold"])
    final = Path(c.out) / FINAL_NAME
    if not final.is_file():
        final = train_irn(c, resume=(Path(c.out) / "checkpoints").is_dir())
    chosen["rw_bg_threshold"] = rw_threshold_on_train(final, train_cams, train, cfg.rw_images)
    return final, chosen


class _Subset:
    """The first `n` images of a dataset (ids, classes, load_image, load_mask): threshold choices on train."""

    def __init__(self, ds, n: int):
        self.ds, self.ids, self.classes = ds, list(ds.ids[:n]), ds.classes

    def load_image(self, i: int):
        return self.ds.load_image(i)

    def load_mask(self, i: int):
        return self.ds.load_mask(i)


def rw_threshold_on_train(irn_ckpt: Path, cam_dir: Path, train, n: int, thresholds=SWEEP) -> float:
    """The random walk's background threshold with the best pseudo-mask mIoU on the first `n` train images."""
    from wsclip.eval.metrics import ConfusionMatrix
    from wsclip.label.pseudo import PseudoConfig, random_walk_scores, read_cams, scores_to_mask
    from wsclip.models.irn import load_irn, predict_boundary

    net, _ = load_irn(irn_ckpt, "cpu")
    cms = {t: ConfusionMatrix(len(train.classes) + 1) for t in thresholds}
    for i, image_id in enumerate(train.ids[:n]):
        f = read_cams(cam_dir / f"{image_id}.npz")
        edge = predict_boundary(train.load_image(i), net).numpy()
        scores = random_walk_scores(f["cams"], edge, PseudoConfig(), low=f["file"].get("cam"))
        gt = train.load_mask(i)
        for t, cm in cms.items():
            scores[0] = t  # the background channel is the constant threshold
            cm.update(scores_to_mask(scores, f["keys"]), gt)
    return max(thresholds, key=lambda t: cms[t].miou())


def _zero_shot(clip_file: Path) -> dict:
    """The zero-shot figures a tiny CLIP's sidecar records (empty when it has none)."""
    from wsclip.io import sidecar_path

    side = sidecar_path(clip_file)
    return json.loads(side.read_text()).get("summary", {}).get("eval", {}) if side.is_file() else {}


def zero_shot_text(zero_shot: dict) -> str:
    """One sentence per tiny CLIP: best class prompt is a present class / masked objects get their class,
    and the cosine spread CLIMS's losses read (when the CLIP's summary has it)."""
    parts = []
    for name, z in zero_shot.items():
        if not z:
            continue
        text = (f"Tiny CLIP {name} zero-shot on val: the best class prompt is a present class for "
                f"{100 * z['top1_in_labels']:.0f}% of images, masked single objects get their own class "
                f"{100 * z['object_top1']:.0f}% of the time.")
        if "median_s_fg" in z:
            text += (f" Cosine spread (medians over objects, prompt 'a photo of {{}}.'): masked object vs its class "
                     f"s_fg {z['median_s_fg']:.2f}, image without it s_bg {z['median_s_bg']:.2f} (s_fg > s_bg for "
                     f"{100 * z['s_fg_gt_s_bg']:.0f}%), whole image {z['median_s_full']:.2f}; masked object vs its "
                     f"background word {z['median_c_fg_bg']:.2f}, whole image vs it {z['median_c_full_bg']:.2f}.")
        parts.append(text)
    return " ".join(parts)


def _table_doc(cfg: DemoConfig, table: str, zero_shot: dict) -> str:
    zs = zero_shot_text(zero_shot)
    zs = zs + "\n\n" if zs else ""
    return (f"# wsclip demo: synthetic world, val split ({cfg.n_val} images, {cfg.size} px)\n\n{table}\n\n"
            f"CAM mIoU: best background threshold of {SWEEP[0]}..{SWEEP[-1]} (column 'bg thr'). Pseudo masks: "
            f"that threshold (CLIP-ES: (1 - max) background), then the listed refinement. co-bg FA: share of "
            f"ground-truth background pixels (>= {cfg.fa_margin} px from objects) of a class's preferred background "
            f"where that class's CAM exceeds {cfg.fa_threshold}.\n\n{zs}"
            f"Settings: {json.dumps(cfg.key())}\n")


def print_summary(result: dict, out) -> None:
    print(format_table(result["rows"]))
    if result.get("effects"):
        print("\n" + format_effects(result["effects"]))
    secs = result["seconds"]
    print(f"\ntotal {secs['total']:.0f} s ({', '.join(f'{k} {v:.0f}' for k, v in secs.items() if k != 'total')})")
    print(f"wrote {Path(out) / 'table.md'}, table.json, table.png, overlays.png and overlays/")


__all__ = ["DemoConfig", "VARIANTS", "run_demo", "cam_metrics", "loss_weights", "format_table", "print_summary",
           "default_cache_dir", "tiny_clip_path", "train_variant", "train_baseline", "pseudo_masks", "save_overlays"]
