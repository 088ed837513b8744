"""The final segmentation network on the synthetic world: pseudo-mask mIoU vs network mIoU.

Stages (each resumable: re-running skips finished work under --work):
1. a synthetic world on disk (`wsclip.data.synth.write_voc_layout`);
2. pseudo masks for the train split, from one of
   - "cam" (default, the real pipeline): baseline CAM network (`wsclip train cam --preset synth`),
     multi-scale CAMs (`wsclip cam`), background threshold chosen by the CAM sweep on train
     (as the papers do), then `wsclip pseudo` (wsclip.label.pseudo): dense CRF and the CGL
     confidence filter (posterior < 0.95 -> 255); or `--cams DIR`: CAM files made elsewhere
     (CLIMS, CLIP-ES with the tiny CLIP, ...);
   - "clip-es": CLIP-ES CAMs (GradCAM + CAA) of the tiny CLIP (`wsclip train tiny-clip`,
     cached in .cache/), background (1 - max)^1, CRF, CGL, as the CLIP-ES paper;
   - "degraded-gt" (FALLBACK, not a WSSS result): ground truth with each object randomly
     eroded or dilated, a few blobs relabelled, and a 255 ring on object borders;
3. the tiny DeepLab of `wsclip train seg --preset synth` trained on them;
4. `wsclip segment` on val (and train) and `wsclip eval`.
Writes benchmarks/results/synth_seg[_<pseudo>].json.

    .venv/bin/python benchmarks/synth_seg.py [--pseudo cam|clip-es|degraded-gt] [--seg-steps N] [--quick]
    .venv/bin/python benchmarks/synth_seg.py --world <demo out>/world \
        --cam-model <demo out>/runs/clims-otm-btm-reg-cbs/camnet.safetensors    # the demo's CLIMS masks
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
def cam_pseudo_masks(world: Path, work: Path, cam_steps: int, crf: bool, confidence: float, cams=None,
                     cam_key: str = "high_res", bg: str = "threshold", cam_model: Path | None = None,
                     val_cams: Path | None = None) -> dict:
    """CAMs (baseline CAM network trained here, `cam_model`'s, or `cams` given) -> background: the threshold
    chosen by the CAM sweep on train, or (1 - max)^1 (bg="power", CLIP-ES) -> `wsclip pseudo` (CRF, CGL) ->
    work/pseudo (with 255) and work/pseudo_argmax; the same recipe on val (`val_cams`, or `cam_model`'s)
    -> work/pseudo_val, so the network can be read against its labels on the split it is evaluated on."""
    from wsclip.label.clims_cam import evaluate_cams, make_cams
    from wsclip.label.pseudo import PseudoConfig, make_pseudo_masks

    info: dict = {"source": "cam"}
    if cam_model is not None:
        from wsclip.demo import DemoConfig  # the demo's and the ablation's CAM scales
        info.update(source=f"cam (the CAM network {cam_model})")
        t0 = time.time()
        log(f"multi-scale CAMs of the train and val splits with {cam_model}")
        cams, val_cams = work / "cams", work / "cams_val"
        for split, d in (("train", cams), ("val", val_cams)):
            make_cams(cam_model, f"voc:{world}", d, split=split, scales=DemoConfig().scales, device="cpu", num_workers=0)
        info["cam_infer_s"] = round(time.time() - t0, 1)
    elif cams is None:
        from wsclip.config import CamConfig, from_preset
        from wsclip.train.baseline_cam import train_cam

        info.update(source="cam (baseline CAM network, `wsclip train cam --preset synth`)", cam_steps=cam_steps)
        cam_ckpt = work / "cam" / "camnet.safetensors"
        t0 = time.time()
        if not cam_ckpt.is_file():
            log(f"training the baseline CAM network ({cam_steps} steps)")
            cfg = from_preset(CamConfig, "synth", data=f"voc:{world}", split="train", out=str(work / "cam"),
                              max_steps=cam_steps, device="cpu", ckpt_every=200)
            train_cam(cfg, resume=(work / "cam" / "checkpoints").is_dir())
        info["cam_train_s"] = round(_trained_seconds(work / "cam", time.time() - t0), 1)
        t0 = time.time()
        log("multi-scale CAMs of the train split")
        cams = work / "cams"
        make_cams(cam_ckpt, f"voc:{world}", cams, split="train", device="cpu", num_workers=1)
        val_cams = work / "cams_val"
        make_cams(cam_ckpt, f"voc:{world}", val_cams, split="val", device="cpu", num_workers=1)
        info["cam_infer_s"] = round(time.time() - t0, 1)
    else:
        info.update(source=f"cam files from {cams}")
    gt_dir, split = world / "SegmentationClass", world / "ImageSets" / "Segmentation" / "train.txt"
    thresholds = [round(0.05 * i, 2) for i in range(1, 20)]
    cms = evaluate_cams(cams, gt_dir, thresholds, NUM_CLASSES, split=split, key=cam_key)
    sweep = {t: cm.miou() for t, cm in cms.items()}
    best = max(sweep, key=sweep.get)
    info.update(cam_miou_by_threshold=sweep, bg_threshold=best, cam_miou=sweep[best])
    log(f"CAM mIoU on train {100 * sweep[best]:.1f} at background threshold {best}")

    full, cgl = work / "pseudo_argmax", work / "pseudo"
    stamp = work / "pseudo_settings.json"
    settings = {"cams": str(cams), "key": cam_key, "bg": bg, "bg_threshold": best, "crf": crf,
                "confidence": confidence}
    if full.exists() and (not stamp.is_file() or json.loads(stamp.read_text()) != settings):
        import shutil

        for d in (full, cgl, work / "pseudo_val", work / "seg", work / "pred_val", work / "pred_train"):  # and what was built on them
            shutil.rmtree(d, ignore_errors=True)
    t0 = time.time()
    for out, conf in ((full, None), (cgl, confidence)):
        cfg = PseudoConfig(key=cam_key, bg=bg, bg_threshold=best, crf=crf, confidence=conf, workers=1)
        make_pseudo_masks(cams, out, data=f"voc:{world}", split="train", cfg=cfg, device="cpu")
    if val_cams is not None:
        cfg = PseudoConfig(key=cam_key, bg=bg, bg_threshold=best, crf=crf, confidence=None, workers=1)
        make_pseudo_masks(val_cams, work / "pseudo_val", data=f"voc:{world}", split="val", cfg=cfg, device="cpu")
    stamp.write_text(json.dumps(settings))
    info.update(bg=bg if bg == "threshold" else "(1 - max)^1", crf=crf, confidence=confidence, pseudo_s=round(time.time() - t0, 1),
                pseudo_tool="wsclip.label.pseudo.make_pseudo_masks (`wsclip pseudo --bg threshold --crf --confidence`)")
    return info


def clip_es_cams(world: Path, work: Path, clip_steps: int | None) -> tuple[Path, dict]:
    """CLIP-ES CAMs of the train and val splits with the cached tiny CLIP (trained once into .cache/)."""
    from wsclip.data.synth import SYNTH_BACKGROUND_WORDS
    from wsclip.label.clip_es import ClipEsConfig, make_clip_es_cams
    from wsclip.train.tiny_clip import ensure_tiny_clip

    t0 = time.time()
    log("tiny CLIP (cached in .cache/ after the first run)")
    clip = ensure_tiny_clip(ROOT / ".cache", seed=0, steps=clip_steps)
    info = {"clip": clip.name, "clip_s": round(time.time() - t0, 1)}
    t0 = time.time()
    log("CLIP-ES CAMs of the train split")
    # the tiny CLIP learnt "a photo of a {}." captions; the background words are the world's
    cfg = ClipEsConfig(template="a photo of a {}.", background=tuple(SYNTH_BACKGROUND_WORDS))
    for split, d in (("train", work / "cams"), ("val", work / "cams_val")):
        make_clip_es_cams(clip, f"voc:{world}", d, split=split, cfg=cfg, device="cpu", num_workers=1)
    info.update(clip_es_s=round(time.time() - t0, 1), template=cfg.template, background=list(cfg.background))
    return work / "cams", info


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


def _trained_seconds(out: Path, fallback: float) -> float:
    """Training time of a Trainer run: the last log line's clock (this session's, when resumed)."""
    log_file = out / "log.jsonl"
    if log_file.is_file():
        lines = [ln for ln in log_file.read_text().splitlines() if ln.strip()]
        if lines:
            return float(json.loads(lines[-1]).get("time", fallback))
    return fallback


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench" / "synth_seg")
    ap.add_argument("--train", type=int, default=1000, help="train images of the world")
    ap.add_argument("--val", type=int, default=200, help="val images of the world")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=128, help="scene size in pixels (the demo's world: 128)")
    ap.add_argument("--world", type=Path, help="an existing synthetic world (e.g. <demo out>/world): its own "
                    "size, seed and splits replace --train/--val/--size/--seed")
    ap.add_argument("--cam-model", type=Path, help="CAM network whose CAMs make the pseudo masks (e.g. the demo's "
                    "runs/clims-otm-btm-reg-cbs/camnet.safetensors) instead of training a baseline here")
    ap.add_argument("--pseudo", choices=("cam", "clip-es", "degraded-gt"), default="cam")
    ap.add_argument("--clip-steps", type=int, help="tiny CLIP training steps for clip-es (default: its own)")
    ap.add_argument("--cam-steps", type=int, default=600, help="baseline CAM network training steps")
    ap.add_argument("--cams", type=Path, help="use these CAM files of the world's train split (e.g. CLIMS or "
                                              "CLIP-ES from `wsclip cam`) instead of training a baseline CAM net")
    ap.add_argument("--cam-key", default="high_res", help="which maps of the CAM files")
    ap.add_argument("--no-crf", action="store_true", help="cam pseudo masks without the CRF")
    ap.add_argument("--confidence", type=float, default=0.95, help="CGL: posterior below this -> 255")
    ap.add_argument("--seg-steps", type=int, help="segmentation training steps (default: the synth preset's)")
    ap.add_argument("--seg-batch", type=int, help="segmentation batch (default: the synth preset's)")
    ap.add_argument("--seg-crop", type=int, help="segmentation training crop (default: the synth preset's)")
    ap.add_argument("--scales", default="0.75,1.0,1.25", help="test scales of `wsclip segment` (with flip)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    ap.add_argument("--quick", action="store_true", help="a tiny run to check the script works")
    ap.add_argument("--machine", default="2-core CPU dev box", help="the machine in words, for the result file")
    ap.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/synth_seg[_<pseudo>].json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.train, args.val, args.cam_steps, args.seg_steps = 64, 16, 20, 20
        args.clip_steps = args.clip_steps or 10
        args.work = args.work.with_name(args.work.name + "_quick")

    import torch

    from wsclip.config import from_preset
    from wsclip.data.synth import write_voc_layout
    from wsclip.label.segment import parse_scales, segment
    from wsclip.train.seg import SegConfig, train_seg

    torch.set_num_threads(args.threads)
    work = args.work / args.pseudo
    t_all = time.time()
    if args.world is not None:
        from wsclip.io import read_json

        if not (args.world / "synth.json").is_file():
            sys.exit(f"{args.world} is not a synthetic world (no synth.json): give the `world` folder of a demo "
                     "or ablation run")
        meta = read_json(args.world / "synth.json")
        world = args.world
        args.train, args.val, args.size, args.seed = meta["n_train"], meta["n_val"], meta["size"], meta["seed"]
        log(f"world: {world} ({args.train} train + {args.val} val scenes, {args.size} px)")
    else:
        world = args.work / f"world{args.size}"
        log(f"world: {args.train} train + {args.val} val scenes of {args.size} px in {world}")
        write_voc_layout(world, args.train, args.val, seed=args.seed, size=args.size)
    gt_dir = world / "SegmentationClass"
    split_train = world / "ImageSets" / "Segmentation" / "train.txt"
    split_val = world / "ImageSets" / "Segmentation" / "val.txt"
    train_ids = [ln.strip() for ln in split_train.read_text().splitlines() if ln.strip()]

    if args.pseudo == "clip-es":
        cams, clip_info = clip_es_cams(world, work, args.clip_steps)
        info = cam_pseudo_masks(world, work, 0, not args.no_crf, args.confidence, cams, "high_res", bg="power",
                                val_cams=work / "cams_val")
        info.update(source="CLIP-ES CAMs (with CAA) of the tiny CLIP", **clip_info)
    elif args.pseudo == "cam":
        info = cam_pseudo_masks(world, work, args.cam_steps, not args.no_crf, args.confidence, args.cams,
                                args.cam_key, cam_model=args.cam_model)
    else:
        info = degraded_gt_pseudo_masks(world, work)
    pseudo_miou = miou_of(work / "pseudo_argmax", gt_dir, split_train)
    pseudo_val = miou_of(work / "pseudo_val", gt_dir, split_val) if (work / "pseudo_val").is_dir() else None
    kept_miou, kept = kept_pixels_miou(work / "pseudo", gt_dir, train_ids)
    log(f"pseudo masks on train: mIoU {100 * pseudo_miou:.1f}; CGL keeps {100 * kept:.1f}% of pixels "
        f"at mIoU {100 * kept_miou:.1f}")

    seg_out = work / "seg"
    over = {k: v for k, v in (("max_steps", args.seg_steps), ("batch_size", args.seg_batch), ("crop", args.seg_crop))
            if v is not None}
    cfg = from_preset(SegConfig, "synth", data=f"voc:{world}", pseudo=str(work / "pseudo"), out=str(seg_out),
                      device="cpu", seed=args.seed, **over)
    t0 = time.time()
    log(f"training tiny {cfg.arch} on the pseudo masks ({cfg.max_steps} steps, batch {cfg.batch_size})")
    ckpt = train_seg(cfg, resume=True)
    seg_s = _trained_seconds(seg_out, time.time() - t0)
    scales = parse_scales(args.scales)
    res = {}
    for split, split_file in (("val", split_val), ("train", split_train)):
        t0 = time.time()
        segment(ckpt, f"voc:{world}", work / f"pred_{split}", split=split, scales=scales, flip=True,
                device="cpu", num_workers=0)
        res[split] = (miou_of(work / f"pred_{split}", gt_dir, split_file), time.time() - t0)
        log(f"network mIoU on {split}: {100 * res[split][0]:.1f}")
    out = {
        "benchmark": "synth_seg",
        "machine": args.machine,
        "python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
        "command": "python benchmarks/synth_seg.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "world": {"train": args.train, "val": args.val, "size": args.size, "seed": args.seed, "path": str(world)},
        "pseudo": info,
        "pseudo_miou_train": pseudo_miou,
        "pseudo_miou_val": pseudo_val,  # the same recipe on val (no CGL): what the network is read against
        "pseudo_cgl_kept_fraction": kept,
        "pseudo_cgl_kept_miou_train": kept_miou,
        "seg": {"arch": cfg.arch, "backbone": cfg.backbone, "rates": list(cfg.rates), "steps": cfg.max_steps,
                "batch": cfg.batch_size, "crop": cfg.crop, "lr": cfg.lr, "train_s": round(seg_s, 1),
                "test_scales": scales, "flip": True},
        "network_miou_val": res["val"][0],
        "network_miou_train": res["train"][0],
        "segment_s": {k: round(v[1], 1) for k, v in res.items()},
        "network_minus_pseudo_val": None if pseudo_val is None else res["val"][0] - pseudo_val,
        "this_invocation_s": round(time.time() - t_all, 1),
    }
    name = f"synth_seg{'' if args.pseudo == 'cam' else '_' + args.pseudo}.json"
    path = args.out or (work / name if args.quick else ROOT / "benchmarks" / "results" / name)
    from wsclip.io import atomic_write_json

    atomic_write_json(path, out)
    val_text = "" if pseudo_val is None else f", {100 * pseudo_val:.1f} (val)"
    log(f"pseudo {100 * pseudo_miou:.1f} (train){val_text} -> network {100 * res['val'][0]:.1f} (val), "
        f"{100 * res['train'][0]:.1f} (train); wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
