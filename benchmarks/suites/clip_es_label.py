"""clip-es-label: CLIP-ES CAMs, wsclip's batched labeler against the public labeler's structure, same run."""

from __future__ import annotations

import json

import numpy as np
import torch

from benchmarks.suites import _models
from wsclip.bench.suite import Skip, SuiteContext, SuiteResult
from wsclip.bench.timing import rel_err

NAME = "clip-es-label"
DESCRIPTION = ("CLIP-ES CAMs with CAA for VOC images and their ground-truth classes. wsclip: images of one "
               "rounded size batched (on the CPU one image per ViT pass), every class of every image from one "
               "batched backward, attention maps averaged in place, CAA as (V S) S on the device; fp32, and "
               "compute auto (bf16 blocks 1..n-1 where the CPU has bf16 and the maps match fp32). Baseline "
               "(public structure): batch 1, the last block forward and one backward per class, maps copied to the CPU, the CAA transition (N^3) recomputed per class on the CPU. "
               "GradCAM and refined maps are compared before timing.")

SETUPS = {
    "gpu": dict(clip="ViT-B-16", precision="fp16", images=14, side=None, batch=8),
    "cpu": dict(clip="ViT-B-16", precision="fp32", images=4, side=None, batch=4),
    "cpu_quick": dict(clip="ViT-B-16", clip_width=256, precision="fp32", images=3, side=224, batch=3),
    "tiny": dict(clip="tiny-vit", precision="fp32", images=2, side=48, batch=2),
}


def voc_images(ctx: SuiteContext, n: int, side: int | None) -> tuple[list[np.ndarray], list[list[int]]]:
    """The first n VOC val images of tests/data (resized so the long side is `side` when given) and their
    0-based classes."""
    from PIL import Image

    from wsclip.io import read_image

    root = ctx.root / "tests" / "data" / "voc12_val14"
    if not (root / "labels.json").is_file():
        raise Skip(f"the VOC sample images are missing ({root})")
    table = json.loads((root / "labels.json").read_text())
    ids = sorted(table)[:n]
    images, keys = [], []
    for i in ids:
        im = read_image(root / "JPEGImages" / f"{i}.jpg")
        if side:
            h, w = im.shape[:2]
            scale = side / max(h, w)
            im = np.asarray(Image.fromarray(im).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                       Image.BICUBIC))
        images.append(im)
        keys.append(sorted({int(c) - 1 for c in table[i]}))
    return images, keys


def run(ctx: SuiteContext, res: SuiteResult) -> None:
    try:
        from wsclip.label.clip_es import ClipEs, ClipEsConfig, rounded_size
    except ImportError as exc:
        raise Skip(f"wsclip's CLIP-ES labeler is not available: {exc}") from None
    from benchmarks.baselines.clip_es_public import PublicClipEs
    from wsclip.vocab import VOC_CLASSES

    s = ctx.pick(gpu=SETUPS["gpu"], cpu=SETUPS["cpu"], cpu_quick=SETUPS["cpu_quick"], tiny=SETUPS["tiny"])
    cfg = _models.clip_config(s["clip"], width=s.get("clip_width"))
    clip = _models.random_clip(cfg, s["clip"], ctx.device, s["precision"], seed=0)
    images, keys = voc_images(ctx, s["images"], s["side"])
    patch = int(clip.patch_size)
    sizes = {rounded_size(im.shape[:2], patch) for im in images}
    if len(sizes) > 1:  # keep one bucket: crop to the smallest rounded size
        h = min(sz[0] for sz in sizes)
        w = min(sz[1] for sz in sizes)
        images = [np.ascontiguousarray(im[:h, :w]) for im in images]
    hh, ww = images[0].shape[:2]
    grid = (rounded_size((hh, ww), patch)[0] // patch, rounded_size((hh, ww), patch)[1] // patch)
    n_img, n_cls = len(images), sum(len(k) for k in keys)
    case = (f"{n_img} VOC images {hh}x{ww}, {s['clip']}{' (reduced)' if s.get('clip_width') else ''} "
            f"{s['precision']}")
    res.setup.update({"images": n_img, "image_size": f"{hh}x{ww}", "patch_grid": f"{grid[0]}x{grid[1]}",
                      "classes_labelled": n_cls, "clip": _models.describe(s["clip"], cfg),
                      "precision": s["precision"], "wsclip_batch": s["batch"],
                      "weights": "random (speed does not depend on them)"})
    if not ctx.gpu and not ctx.tiny:
        res.setup["cpu"] = ((f"reduced: {n_img} images with the long side at {s['side']} px (VOC: ~500); "
                             if s["side"] else f"{n_img} full-size VOC images; ")
                            + f"torch threads: {torch.get_num_threads()}")

    # ---- same maps before timing (a mild logit scale: with random weights at 100 the softmax saturates and
    # every GradCAM vanishes, which would make the comparison empty)
    from wsclip.label.clip_es import BF16_TOLERANCE

    tol = 1e-3 if s["precision"] == "fp32" else 5e-2
    computes = {"fp32": None} if ctx.gpu or ctx.tiny else {"fp32": None, "auto": None}
    n_check = min(2, n_img)
    check_pub = None
    for compute in computes:
        check_lab = ClipEs(clip, VOC_CLASSES, ClipEsConfig(logit_scale=3.0, compute=compute))
        if check_pub is None:
            check_pub = PublicClipEs(clip, check_lab.fg_text, check_lab.bg_text, check_lab.attn_layers,
                                     check_lab.box_threshold, logit_scale=3.0)
        ours = check_lab.label(images[:n_check], keys[:n_check])
        computes[compute] = check_lab.compute  # what auto chose (its parity probe)
        raw_err = ref_err = 0.0
        for im, k, w in zip(images[:n_check], keys[:n_check], ours):
            p = check_pub.label(im, k)
            up = torch.nn.functional.interpolate(p["raw"][None], size=im.shape[:2], mode="bilinear",
                                                 align_corners=False)[0]
            raw_err = max(raw_err, rel_err(up, w["high_res_raw"].float()))
            ref_err = max(ref_err, rel_err(p["cam"], w["cam"].float()))
        low = check_lab.compute == "bf16"
        name = _wsclip_name(compute, check_lab.compute)
        # CAA: A = S S (baseline) vs (V S) S (wsclip) in float32; a random network's nearly uniform attention
        # gives refined maps with a small range, which the min-max normalisation stretches, rounding included
        ok = res.check(case, f"GradCAM maps: baseline vs {name}", rel_err=raw_err,
                       tolerance=BF16_TOLERANCE if low else tol, detail=f"{n_check} images, logit scale 3 for the check")
        ok &= res.check(case, f"CAA-refined maps: baseline vs {name}", rel_err=ref_err,
                        tolerance=BF16_TOLERANCE if low else 5 * tol)
        if not ok:
            computes[compute] = False
        del check_lab, ours

    ref = ClipEs(clip, VOC_CLASSES, ClipEsConfig(compute="fp32"))
    public = PublicClipEs(clip, ref.fg_text, ref.bg_text, ref.attn_layers, ref.box_threshold)

    def wsclip_run(labeler):
        out = []
        for i in range(0, n_img, s["batch"]):
            for r in labeler.label(images[i:i + s["batch"]], keys[i:i + s["batch"]]):
                out.append({k: v.cpu() for k, v in r.items()})  # the maps on the host, as the files need them
        return out

    def public_run():
        return [public.label(im, k) for im, k in zip(images, keys)]

    runs = []
    for compute, chosen in computes.items():
        name = _wsclip_name(compute, chosen or "fp32")
        if chosen is False:
            res.skip(case, name, "wsclip", "not timed: its maps differ from the baseline's")
            continue
        lab = ClipEs(clip, VOC_CLASSES, ClipEsConfig(batch_size=s["batch"], compute=chosen))
        wsclip_run(lab)  # warm-up at these sizes
        runs.append((name, "wsclip", lambda lab=lab: wsclip_run(lab)))
    runs.append((PUBLIC, "baseline", public_run))
    for variant, role, fn in runs:
        # on the CPU the checks and warm-ups above ran every path once
        timing = ctx.meter.measure(fn, reps=ctx.reps, warmup=ctx.warmup if ctx.gpu else 0, budget_s=ctx.budget_s,
                                   track_memory=True)
        res.timed(case, variant, role, timing, items=n_img, batch=s["batch"] if role == "wsclip" else 1,
                  peak_mem_MB=timing.peak_mem_MB, classes_per_s=n_cls / timing.median_s)
        ctx.log(f"{variant}: {n_img / timing.median_s:.3g} img/s, peak {timing.peak_mem_MB} MB")
    for variant, role, _ in runs:
        if role == "wsclip":
            res.compare(case, variant, PUBLIC, target=10.0 if ctx.gpu else 1.5 if "bf16" in variant else None)
            res.compare(case, variant, PUBLIC, metric="peak memory")


PUBLIC = "public-structure labeler"


def _wsclip_name(compute: str, chosen: str) -> str:
    """Row name: the fp32 labeler keeps its old name (comparable across runs); auto says what it chose."""
    return "wsclip batched labeler" if compute == "fp32" else f"wsclip labeler, compute auto ({chosen})"
