"""Does the per-mask quality score (wsclip.label.quality) rank bad masks first? Measured on the synthetic world.

Stages (each resumable under --work):
1. a synthetic world in VOC layout (`wsclip.data.synth.write_voc_layout`; ground truth exists);
2. the baseline CAM network (`wsclip train cam --preset synth`, --cam-steps steps on the train split);
3. `wsclip label` of the val split with that network, the dataset's image-level labels, dense CRF,
   --cams and --gt (the quality score and the per-image IoU land in manifest.jsonl);
4. `wsclip pseudo --crf --cgl` from the CAM files the label run kept (quality.json);
5. for each of the two folders: Spearman rank correlation between the score and the per-image mIoU
   (over the classes present in the mask or the ground truth), and the share of the worst decile by
   mIoU that the score's worst decile finds (random order: 0.10 expected). Each signal alone too.

    python benchmarks/quality_rank.py [--val 300] [--cam-steps 150] [--seed 1] [--work runs/quality_rank] [--tiny]

Writes benchmarks/results/quality_rank.json (or --json). The signals' weights were set looking at
seed 0 (benchmarks/results/quality_rank_seed0.json: the coverage signal was added then); seed 1 is a
fresh world and CAM network, the held-out figures.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIGNALS = ("dropped", "coverage", "crf_changed", "blur", "degenerate")


def log(msg: str) -> None:
    print(f"[quality_rank {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ranking(scores: np.ndarray, miou: np.ndarray) -> dict:
    """Spearman rho of score vs mIoU and the worst-decile capture (lowest mIoU found among the lowest scores)."""
    from scipy.stats import spearmanr

    n = len(scores)
    k = max(1, math.ceil(n / 10))
    worst_true = set(np.argsort(miou, kind="stable")[:k].tolist())
    worst_score = set(np.argsort(scores, kind="stable")[:k].tolist())
    rho = spearmanr(scores, miou).statistic if np.ptp(scores) > 0 else float("nan")  # constant: undefined
    return {"n": int(n), "decile": int(k), "spearman": None if np.isnan(rho) else round(float(rho), 4),
            "worst_decile_found": round(len(worst_true & worst_score) / k, 4)}


def evaluate(folder: Path, gt_dir: Path, num_classes: int, ids: list[str]) -> dict:
    """Ranking figures of one labelled folder (label or pseudo layout), overall and per signal."""
    from wsclip.io import read_mask
    from wsclip.label.quality import image_iou
    from wsclip.serve.folder import LabeledFolder

    lf = LabeledFolder(folder, classes=[str(k) for k in range(num_classes - 1)])
    rows = []
    for i in ids:
        q = lf.records[i].get("quality") or {}
        m = image_iou(lf.mask(i), read_mask(gt_dir / f"{i}.png"), num_classes)["miou"]
        rows.append((q, m))
    miou = np.array([m for _, m in rows], dtype=np.float64)
    out = {"score": ranking(np.array([q["score"] for q, _ in rows]), miou),
           "mean_image_miou": round(float(miou.mean()), 4)}
    for s in SIGNALS:
        vals = [q.get(s) for q, _ in rows]
        if all(v is not None for v in vals):
            out[f"signal_{s}"] = ranking(-np.array(vals, dtype=np.float64), miou)  # signals: 1 = bad
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "quality_rank")
    ap.add_argument("--train", type=int, default=1000, help="train scenes (the CAM network's data)")
    ap.add_argument("--val", type=int, default=300, help="val scenes labelled and ranked")
    ap.add_argument("--cam-steps", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="toy sizes: checks the script runs (figures mean nothing)")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "quality_rank.json")
    args = ap.parse_args(argv)
    if args.tiny:
        args.train, args.val, args.cam_steps = 16, 10, 2
    sys.path.insert(0, str(ROOT))
    import torch

    from wsclip.config import CamConfig, from_preset
    from wsclip.data.synth import SYNTH_CLASSES, write_voc_layout
    from wsclip.label.pseudo import PseudoConfig, make_pseudo_masks
    from wsclip.serve.batch import LabelRunConfig, label_images
    from wsclip.serve.labelers import LabelerConfig
    from wsclip.train.baseline_cam import train_cam

    torch.manual_seed(args.seed)
    t_start = time.time()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    log(f"synthetic world ({args.train} train, {args.val} val)")
    world = write_voc_layout(work / "world", n_train=args.train, n_val=args.val, seed=args.seed)
    ckpt = work / "cam" / "camnet.safetensors"
    if not ckpt.is_file():
        log(f"baseline CAM network, {args.cam_steps} steps")
        cfg = from_preset(CamConfig, "synth", data=f"voc:{world}", split="train", out=str(work / "cam"),
                          max_steps=args.cam_steps, device="cpu", num_workers=1, seed=args.seed,
                          ckpt_every=max(50, args.cam_steps))
        train_cam(cfg, resume=(work / "cam" / "checkpoints").is_dir())
    gt = world / "SegmentationClass"
    log("wsclip label --refine crf --cams --gt on val")
    lab = LabelerConfig(model=str(ckpt), method="cam", refine="crf", device="cpu", batch_size=8,
                        scales=(1.0, 0.5, 1.5, 2.0), flip=True)
    run = LabelRunConfig(out=work / "label", workers=0, post_workers=0, cams=True, gt=gt)
    summary = label_images(lab, f"voc:{world}", run, split="val")
    log("wsclip pseudo --crf --cgl from the kept CAM files")
    make_pseudo_masks(work / "label" / "cams", work / "pseudo", data=f"voc:{world}", split="val",
                      cfg=PseudoConfig(crf=True, confidence=0.95, workers=0), device="cpu")
    ids = [ln.strip() for ln in (world / "ImageSets" / "Segmentation" / "val.txt").read_text().splitlines() if ln.strip()]
    k = len(SYNTH_CLASSES) + 1
    result = {
        "benchmark": "quality_rank",
        "command": "python benchmarks/quality_rank.py" + (" --tiny" if args.tiny else
                                                          f" --train {args.train} --val {args.val} --cam-steps {args.cam_steps}"
                                                          f" --seed {args.seed}"),
        "machine": f"{platform.machine()} {torch.get_num_threads()}-thread CPU ({platform.platform()})",
        "tiny": bool(args.tiny),
        "world": {"train": args.train, "val": args.val, "seed": args.seed, "size": 64},
        "cam_steps": args.cam_steps,
        "label": {"what": "wsclip label --method cam --refine crf (scales 1, .5, 1.5, 2 + flip), dataset labels",
                  **evaluate(work / "label", gt, k, ids)},
        "pseudo": {"what": "wsclip pseudo --crf --cgl (confidence 0.95) from the same CAMs",
                   **evaluate(work / "pseudo", gt, k, ids)},
        "labelled": summary["labelled"] + summary["skipped_done"],
        "seconds": round(time.time() - t_start, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for name in ("label", "pseudo"):
        s = result[name]["score"]
        log(f"{name}: Spearman(score, image mIoU) = {s['spearman']:+.3f}; worst decile found = "
            f"{100 * s['worst_decile_found']:.0f}% of {s['decile']} (random: 10%)")
    log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
