"""Real-image check of the dense CRF on the 14 VOC val images shipped in tests/data.

Each ground-truth mask is degraded into a CAM-like map (per class: random erosion or
dilation, coarse stride-32 resampling, Gaussian blur, noise, max-normalised), turned
into a pseudo mask with background (1 - max)^alpha, and refined with the CRF using the
real image. Prints and writes (benchmarks/results/crf_voc14.json) mIoU before and after.

    .venv/bin/python benchmarks/crf_voc14.py [--workers N] [--uint8-wrap]
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VOC14 = ROOT / "tests" / "data" / "voc12_val14"


def degrade_mask(mask: np.ndarray, seed: int, stride: int = 32, sigma: float = 12.0, noise: float = 0.05, morph: int = 6):
    """CAM-like maps (K, H, W) in [0,1] and their class labels (K,) from a ground-truth mask (H, W)."""
    import torch
    import torch.nn.functional as F
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    h, w = mask.shape
    labels = [int(c) for c in np.unique(mask) if c not in (0, 255)]
    cams = []
    for c in labels:
        m = mask == c
        steps = int(rng.integers(2, morph))
        grow = rng.random() < 0.5
        m = (ndimage.binary_dilation if grow else ndimage.binary_erosion)(m, iterations=steps)
        x = torch.from_numpy(m.astype(np.float32))[None, None]
        coarse = F.adaptive_avg_pool2d(x, ((h + stride - 1) // stride, (w + stride - 1) // stride))
        coarse = coarse + noise * torch.from_numpy(rng.standard_normal(coarse.shape).astype(np.float32))
        up = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
        up = ndimage.gaussian_filter(up, sigma).clip(0, None)
        cams.append(up / max(float(up.max()), 1e-5))
    return np.stack(cams) if cams else np.zeros((0, h, w), np.float32), np.array(labels, dtype=np.int64)


def evaluate(ids, workers: int | None = None, uint8_wrap: bool = False, alpha: float = 1.0, root: Path = VOC14):
    """(mIoU before CRF, mIoU after CRF, CRF seconds) over `ids`; each image's degradation is seeded by its id."""
    from wsclip.eval.metrics import ConfusionMatrix
    from wsclip.io import read_image, read_mask
    from wsclip.refine.crf import CRFParams, dense_crf_many, posterior_labels

    before, after = ConfusionMatrix(21), ConfusionMatrix(21)
    images, scores, gts, keys = [], [], [], []
    for i in ids:
        gt = read_mask(root / "SegmentationClass" / f"{i}.png")
        cams, labels = degrade_mask(gt, seed=zlib.crc32(i.encode()))
        bg = (1.0 - cams.max(0, initial=0.0)) ** alpha
        stacked = np.concatenate([bg[None], cams]).astype(np.float32)
        lut = np.concatenate([[0], labels])
        before.update(lut[stacked.argmax(0)], gt)
        images.append(read_image(root / "JPEGImages" / f"{i}.jpg"))
        scores.append(stacked)
        gts.append(gt)
        keys.append(lut)
    t0 = time.perf_counter()
    posts = list(dense_crf_many(images, scores, CRFParams(uint8_wrap=uint8_wrap), workers=workers))
    seconds = time.perf_counter() - t0
    for q, gt, lut in zip(posts, gts, keys):
        after.update(lut[posterior_labels(q)], gt)
    return before.miou(), after.miou(), seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=None, help="CRF worker processes (default: all cores)")
    p.add_argument("--uint8-wrap", action="store_true", help="public CLIP-ES compatibility image")
    p.add_argument("--ids", nargs="*", help="image ids (default: all 14)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "crf_voc14.json")
    args = p.parse_args(argv)
    ids = args.ids or (VOC14 / "val.txt").read_text().split()
    b, a, sec = evaluate(ids, workers=args.workers, uint8_wrap=args.uint8_wrap)
    import os
    import platform

    result = {
        "images": len(ids),
        "miou_before_crf": round(100 * b, 2),
        "miou_after_crf": round(100 * a, 2),
        "crf_seconds_total": round(sec, 2),
        "workers": args.workers,
        "uint8_wrap": args.uint8_wrap,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
    }
    print(json.dumps(result, indent=2))
    from wsclip.io import atomic_write_json

    atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
