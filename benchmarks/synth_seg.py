"""The final segmentation network on the synthetic world: pseudo-mask mIoU vs network mIoU.

Stages (each resumable: re-running skips finished work under --work):
1. a synthetic world on disk (`wsclip.data.synth.write_voc_layout`);
2. pseudo masks for the train split, from one of
   - "cam" (default, the real pipeline): baseline CAM network (`wsclip train cam --preset synth`),
     multi-scale CAMs (`wsclip cam`), background threshold chosen by the CAM sweep on train
     (as the papers do), dense CRF, CGL confidence filter (posterior < 0.95 -> 255).
     `wsclip pseudo` (label/pseudo.py) is used when it exists; otherwise the same steps run
     here through wsclip.refine.crf;
   - "degraded-gt" (FALLBACK, not a WSSS result): ground truth with each object randomly
     eroded or dilated, a few blobs relabelled, and a 255 ring on object borders;
3. tiny DeepLab-v2 trained on them (`wsclip train seg --preset synth`);
4. `wsclip segment` on val (and train) and `wsclip eval`.
Writes benchmarks/results/synth_seg[_<pseudo>].json.

    .venv/bin/python benchmarks/synth_seg.py [--pseudo cam|degraded-gt] [--seg-steps N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 7  # background + the 6 synth classes


def log(msg: str) -> None:
    print(f"[synth_seg {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def miou_of(pred_dir, gt_dir, split_file) -> float:
    from wsclip.eval.evaluate import evaluate_folders

    cm, _ = evaluate_folders(pred_dir, gt_dir, NUM_CLASSES, split=split_file)
    return cm.miou()


# ----------------------------------------------------------------------------- pseudo masks: CAM pipeline
def cam_pseudo_masks(world: Path, work: Path, cam_steps: int, crf: bool, confidence: float) -> dict:
    """Baseline CAMs -> threshold sweep on train -> [CRF] -> CGL pseudo masks in work/pseudo."""
    from wsclip.config import CamConfig, from_preset
    from wsclip.io import read_image, write_mask
    from wsclip.label.clims_cam import evaluate_cams, make_cams, read_cam_file
    from wsclip.train.baseline_cam import train_cam

    info: dict = {"source": "cam", "cam_steps": cam_steps}
    cam_ckpt = work / "cam" / "camnet.safetensors"
    t0 = time.time()
    if not cam_ckpt.is_file():
        log(f"training the baseline CAM network ({cam_steps} steps)")
        cfg = from_preset(CamConfig, "synth", data=f"voc:{world}", split="train", out=str(work / "cam"),
                          max_steps=cam_steps, device="cpu", ckpt_every=200)
        resume = (work / "cam" / "checkpoints").is_dir()
        train_cam(cfg, resume=resume)
    info["cam_train_s"] = round(time.time() - t0, 1)
    t0 = time.time()
    log("multi-scale CAMs of the train split")
    make_cams(cam_ckpt, f"voc:{world}", work / "cams", split="train", device="cpu", num_workers=1)
    info["cam_infer_s"] = round(time.time() - t0, 1)
    gt_dir, split = world / "SegmentationClass", world / "ImageSets" / "Segmentation" / "train.txt"
    thresholds = [round(0.05 * i, 2) for i in range(1, 20)]
    cms = evaluate_cams(work / "cams", gt_dir, thresholds, NUM_CLASSES, split=split)
    sweep = {t: cm.miou() for t, cm in cms.items()}
    best = max(sweep, key=sweep.get)
    info.update(cam_miou_by_threshold=sweep, bg_threshold=best, cam_miou=sweep[best])
    log(f"CAM mIoU on train {100 * sweep[best]:.1f} at background threshold {best}")

    try:  # G's `wsclip pseudo`, when it has landed
        import wsclip.label.pseudo  # noqa: F401
        info["pseudo_tool_available"] = True
    except ImportError:
        info["pseudo_tool_available"] = False
    # The steps of `wsclip pseudo` (constant background, CRF, CGL filter), via wsclip.refine.crf.
    from wsclip.refine.crf import dense_crf

    full, cgl = work / "pseudo_argmax", work / "pseudo"
    stamp = work / "pseudo_settings.json"
    settings = {"bg_threshold": best, "crf": crf, "confidence": confidence}
    if stamp.is_file() and json.loads(stamp.read_text()) != settings:
        import shutil

        for d in (full, cgl, work / "seg", work / "pred_val", work / "pred_train"):  # and what was built on them
            shutil.rmtree(d, ignore_errors=True)
    ids = [ln.strip() for ln in split.read_text().splitlines() if ln.strip()]
    t0 = time.time()
    for i in ids:
        if (cgl / f"{i}.png").is_file() and (full / f"{i}.png").is_file():
            continue
        z = read_cam_file(work / "cams" / f"{i}.npz")
        keys, cams = z["keys"].astype(np.int64), z["high_res"].astype(np.float32)
        h, w = cams.shape[1:]
        scores = np.concatenate([np.full((1, h, w), best, np.float32), cams.reshape(-1, h, w)])
        labels = np.concatenate([[0], keys + 1]).astype(np.uint8)
        if crf:
            q = dense_crf(read_image(world / "JPEGImages" / f"{i}.jpg"), scores / scores.sum(0, keepdims=True))
        else:
            q = scores / scores.sum(0, keepdims=True)
        lab = labels[q.argmax(0)]
        write_mask(full / f"{i}.png", lab)
        write_mask(cgl / f"{i}.png", np.where(q.max(0) < confidence, 255, lab).astype(np.uint8))
    stamp.write_text(json.dumps(settings))
    info.update(crf=crf, confidence=confidence, pseudo_s=round(time.time() - t0, 1))
    return info


# ----------------------------------------------------------------------------- pseudo masks: fallback
def degraded_gt_pseudo_masks(world: Path, work: Path) -> dict:
    """FALLBACK: ground truth degraded into pseudo-mask-like labels (not a weakly supervised result)."""
    from scipy import ndimage

    from wsclip.io import read_mask, write_mask

    gt_dir, split = world / "SegmentationClass", world / "ImageSets" / "Segmentation" / "train.txt"
    ids = [ln.strip() for ln in split.read_text().splitlines() if ln.strip()]
    for i in ids:
        if (work / "pseudo" / f"{i}.png").is_file() and (work / "pseudo_argmax" / f"{i}.png").is_file():
            continue
        rng = np.random.default_rng(zlib.crc32(i.encode()))
        gt = read_mask(gt_dir / f"{i}.png")
        out = np.zeros_like(gt)
        for c in np.unique(gt):
            if c in (0, 255):
                continue
            m = gt == c
            op = ndimage.binary_dilation if rng.random() < 0.5 else ndimage.binary_erosion
            out[op(m, iterations=int(rng.integers(1, 4)))] = c
        for _ in range(int(rng.integers(0, 3))):  # a few blobs given a wrong class
            cy, cx = rng.integers(0, gt.shape[0]), rng.integers(0, gt.shape[1])
            yy, xx = np.ogrid[: gt.shape[0], : gt.shape[1]]
            out[(yy - cy) ** 2 + (xx - cx) ** 2 < int(rng.integers(9, 50))] = int(rng.integers(0, NUM_CLASSES))
        write_mask(work / "pseudo_argmax" / f"{i}.png", out)
        fg = out > 0
        ring = ndimage.binary_dilation(fg, iterations=1) & ~ndimage.binary_erosion(fg, iterations=1)
        write_mask(work / "pseudo" / f"{i}.png", np.where(ring, 255, out).astype(np.uint8))
    return {"source": "degraded-gt (FALLBACK: ground truth degraded, not a WSSS pipeline)"}


def kept_pixels_miou(pseudo_dir, gt_dir, ids) -> tuple[float, float]:
    """(mIoU over the pixels a CGL mask keeps, fraction of pixels kept)."""
    from wsclip.eval.metrics import ConfusionMatrix
    from wsclip.io import read_mask

    cm, kept, total = ConfusionMatrix(NUM_CLASSES), 0, 0
    for i in ids:
        p, g = read_mask(Path(pseudo_dir) / f"{i}.png"), read_mask(Path(gt_dir) / f"{i}.png")
        keep = p != 255
        cm.update(p[keep], g[keep])
        kept, total = kept + int(keep.sum()), total + p.size
    return cm.miou(), kept / max(total, 1)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench" / "synth_seg")
    ap.add_argument("--train", type=int, default=1000, help="train images of the world")
    ap.add_argument("--val", type=int, default=200, help="val images of the world")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pseudo", choices=("cam", "degraded-gt"), default="cam")
    ap.add_argument("--cam-steps", type=int, default=600)
    ap.add_argument("--no-crf", action="store_true", help="cam pseudo masks without the CRF")
    ap.add_argument("--confidence", type=float, default=0.95, help="CGL: posterior below this -> 255")
    ap.add_argument("--seg-steps", type=int, default=800)
    ap.add_argument("--seg-batch", type=int, default=16)
    ap.add_argument("--scales", default="0.75,1.0,1.25", help="test scales of `wsclip segment` (with flip)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    ap.add_argument("--quick", action="store_true", help="a tiny run to check the script works")
    ap.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/synth_seg[_<pseudo>].json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.train, args.val, args.cam_steps, args.seg_steps = 64, 16, 20, 20
        args.work = args.work.with_name(args.work.name + "_quick")

    import torch

    from wsclip.config import from_preset
    from wsclip.data.synth import write_voc_layout
    from wsclip.label.segment import parse_scales, segment
    from wsclip.train.seg import SegConfig, train_seg

    torch.set_num_threads(args.threads)
    work = args.work / args.pseudo
    world = args.work / "world"
    t_all = time.time()
    log(f"world: {args.train} train + {args.val} val scenes in {world}")
    write_voc_layout(world, args.train, args.val, seed=args.seed, size=64)
    gt_dir = world / "SegmentationClass"
    split_train = world / "ImageSets" / "Segmentation" / "train.txt"
    split_val = world / "ImageSets" / "Segmentation" / "val.txt"
    train_ids = [ln.strip() for ln in split_train.read_text().splitlines() if ln.strip()]

    if args.pseudo == "cam":
        info = cam_pseudo_masks(world, work, args.cam_steps, not args.no_crf, args.confidence)
    else:
        info = degraded_gt_pseudo_masks(world, work)
    pseudo_miou = miou_of(work / "pseudo_argmax", gt_dir, split_train)
    kept_miou, kept = kept_pixels_miou(work / "pseudo", gt_dir, train_ids)
    log(f"pseudo masks on train: mIoU {100 * pseudo_miou:.1f}; CGL keeps {100 * kept:.1f}% of pixels "
        f"at mIoU {100 * kept_miou:.1f}")

    seg_out = work / "seg"
    cfg = from_preset(SegConfig, "synth", data=f"voc:{world}", pseudo=str(work / "pseudo"), out=str(seg_out),
                      max_steps=args.seg_steps, batch_size=args.seg_batch, device="cpu", seed=args.seed)
    t0 = time.time()
    log(f"training tiny DeepLab-v2 on the pseudo masks ({args.seg_steps} steps, batch {args.seg_batch})")
    ckpt = train_seg(cfg, resume=True)
    seg_s = time.time() - t0
    scales = parse_scales(args.scales)
    res = {}
    for split, split_file in (("val", split_val), ("train", split_train)):
        t0 = time.time()
        segment(ckpt, f"voc:{world}", work / f"pred_{split}", split=split, scales=scales, flip=True,
                device="cpu", num_workers=1)
        res[split] = (miou_of(work / f"pred_{split}", gt_dir, split_file), time.time() - t0)
        log(f"network mIoU on {split}: {100 * res[split][0]:.1f}")
    pseudo_val_note = "pseudo masks exist for train only (as in the papers: pseudo mIoU on train, network on val)"
    out = {
        "benchmark": "synth_seg",
        "machine": "2-core CPU dev box (shared)",
        "python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
        "command": "python benchmarks/synth_seg.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "world": {"train": args.train, "val": args.val, "size": 64, "seed": args.seed},
        "pseudo": info,
        "pseudo_miou_train": pseudo_miou,
        "pseudo_cgl_kept_fraction": kept,
        "pseudo_cgl_kept_miou_train": kept_miou,
        "seg": {"arch": cfg.arch, "backbone": cfg.backbone, "rates": list(cfg.rates), "steps": cfg.max_steps,
                "batch": cfg.batch_size, "crop": cfg.crop, "lr": cfg.lr, "train_s": round(seg_s, 1),
                "test_scales": scales, "flip": True},
        "network_miou_val": res["val"][0],
        "network_miou_train": res["train"][0],
        "segment_s": {k: round(v[1], 1) for k, v in res.items()},
        "note": pseudo_val_note,
        "total_s": round(time.time() - t_all, 1),
    }
    name = f"synth_seg{'' if args.pseudo == 'cam' else '_' + args.pseudo}.json"
    path = args.out or (work / name if args.quick else ROOT / "benchmarks" / "results" / name)
    from wsclip.io import atomic_write_json

    atomic_write_json(path, out)
    log(f"pseudo {100 * pseudo_miou:.1f} (train) -> network {100 * res['val'][0]:.1f} (val), "
        f"{100 * res['train'][0]:.1f} (train); wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
