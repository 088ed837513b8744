"""Per-mask quality score: which labelled images a person should look at first.

Computed from signals the labelling pipeline already has, without ground truth (each in [0, 1],
1 = bad):

    dropped      share of pixels the confidence filter (CGL) set to 255 (ignore)
    crf_changed  share of the kept (not 255) pixels whose label the dense CRF changed from the CAM
                 argmax (None: no CRF)
    blur         1 - mean CAM sharpness over the labelled classes; a class's sharpness is the contrast
                 of its CAM between the pixels it won and the rest of the image (mean inside minus
                 mean outside, CAMs in [0, 1]); 1 when the class won no pixel (None: no CAMs)
    degenerate   share of the labelled classes whose mask is empty or covers (almost) the whole image
    coverage     share of the image the classes claim (not background, not ignore): the graded form of
                 "a class covers the whole image". CAMs bleed: a weakly supervised mask that claims most
                 of the photo is usually wrong (on the synthetic world this one signal ranks best, see
                 BENCHMARKS.md); on photos where objects fill the frame it flags correct masks too

score = 1 - sum_i w_i * signal_i / (sum of the weights of the signals present), in [0, 1];
higher is better, so sorting by score ascending lists the worst first. Where ground truth exists,
`image_iou` gives the per-class IoU and per-image mIoU (the eval rule: wsclip.eval.metrics).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from wsclip.errors import ShapeError

__all__ = ["WEIGHTS", "WHOLE_IMAGE", "quality_signals", "quality_score", "assess", "image_iou", "worst_first",
           "format_worst"]

#: weights of the signals in the score (set a priori, not fitted: see BENCHMARKS.md for the ranking figures)
WEIGHTS = {"dropped": 1.0, "crf_changed": 1.0, "blur": 1.0, "degenerate": 1.0, "coverage": 1.0}
#: a class mask covering at least this share of the image counts as "the whole image"
WHOLE_IMAGE = 0.95


def _sharpness(cam: np.ndarray, won: np.ndarray) -> float:
    """Contrast of one CAM (H, W) in [0, 1] between the pixels its class won and the others."""
    n_in = int(won.sum())
    if n_in == 0:
        return 0.0
    inside = float(cam[won].mean())
    outside = float(cam[~won].mean()) if n_in < won.size else 0.0
    return float(np.clip(inside - outside, 0.0, 1.0))


def quality_signals(mask: np.ndarray, keys: Sequence[int], cams: np.ndarray | None = None,
                    mask_before: np.ndarray | None = None) -> dict:
    """The signals of one mask (H, W) uint8 (0 background, k + 1 class k, 255 ignore).

    keys: 0-based labelled classes; cams: (len(keys), H', W') maps in [0, 1] in keys order (resized
    to the mask when their size differs); mask_before: the mask before the CRF (same size).
    Returns {"dropped", "coverage", "crf_changed", "blur", "degenerate", "sharpness": {class: value},
    "area": {class: share}}.
    """
    mask = np.asarray(mask)
    keys = [int(k) for k in np.asarray(keys).reshape(-1)]
    n = mask.size
    valid = mask != 255
    sig: dict = {"dropped": float((~valid).mean()) if n else 0.0,
                 "coverage": float((valid & (mask != 0)).mean()) if n else 0.0}
    if mask_before is not None:
        before = np.asarray(mask_before)
        sig["crf_changed"] = float((before != mask)[valid].mean()) if valid.any() else 0.0
    else:
        sig["crf_changed"] = None
    area, bad = {}, 0
    for k in keys:
        share = float((mask == k + 1).sum()) / max(1, n)
        area[str(k)] = round(share, 6)
        bad += share == 0.0 or share >= WHOLE_IMAGE
    sig["degenerate"] = bad / len(keys) if keys else 0.0
    sig["area"] = area
    if cams is not None and len(keys) and len(cams) == len(keys):
        cams = _resize_to(np.asarray(cams, dtype=np.float32), mask.shape)
        sharp = {str(k): round(_sharpness(cams[j], mask == k + 1), 6) for j, k in enumerate(keys)}
        sig["sharpness"] = sharp
        sig["blur"] = 1.0 - float(np.mean(list(sharp.values())))
    else:
        sig["sharpness"] = {}
        sig["blur"] = None
    return sig


def _resize_to(cams: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if cams.shape[1:] == tuple(hw):
        return cams
    import torch
    import torch.nn.functional as F

    return F.interpolate(torch.from_numpy(cams)[None], size=tuple(hw), mode="bilinear", align_corners=False)[0].numpy()


def quality_score(signals: dict, weights: dict | None = None) -> float:
    """1 - the weighted mean of the signals present (None ones are left out), in [0, 1]; higher is better."""
    weights = weights or WEIGHTS
    num = den = 0.0
    for name, w in weights.items():
        v = signals.get(name)
        if v is None:
            continue
        num += w * float(v)
        den += w
    return float(np.clip(1.0 - num / den, 0.0, 1.0)) if den else 1.0


def image_iou(mask: np.ndarray, gt: np.ndarray, num_classes: int) -> dict:
    """{"iou": {class value: IoU} over the values present in the mask or the ground truth, "miou"} of one image.

    Class values as in the masks (0 background, k + 1 class k); gt 255 is ignored, a predicted 255
    counts as a miss (the rule of wsclip.eval.metrics.ConfusionMatrix).
    """
    from wsclip.eval.metrics import ConfusionMatrix

    if np.shape(mask) != np.shape(gt):
        raise ShapeError(f"mask {np.shape(mask)} and ground truth {np.shape(gt)} differ in size; "
                         "the ground truth belongs to other images")
    cm = ConfusionMatrix(num_classes).update(np.asarray(mask), np.asarray(gt))
    iou = cm.iou()
    per = {str(v): round(float(x), 6) for v, x in enumerate(iou) if not np.isnan(x)}
    return {"iou": per, "miou": round(float(np.mean(list(per.values()))), 6) if per else None}


def assess(mask: np.ndarray, keys: Sequence[int], cams: np.ndarray | None = None,
           mask_before: np.ndarray | None = None, gt: np.ndarray | None = None,
           num_classes: int | None = None) -> dict:
    """The "quality" entry of one image's record: {"score", the signals, and "iou"/"miou" with ground truth}."""
    sig = quality_signals(mask, keys, cams, mask_before)
    out = {"score": round(quality_score(sig), 6)}
    out.update({k: (round(v, 6) if isinstance(v, float) else v) for k, v in sig.items()})
    if gt is not None:
        if num_classes is None:
            raise ValueError("the IoU needs num_classes (background included)")
        out.update(image_iou(mask, gt, num_classes))
    return out


def worst_first(records: Iterable[dict], n: int | None = None) -> list[dict]:
    """Records (each with "id" and "quality": {"score"}) sorted by score, worst first (ties by id); the first n."""
    scored = [r for r in records if isinstance(r.get("quality"), dict) and r["quality"].get("score") is not None]
    scored.sort(key=lambda r: (r["quality"]["score"], str(r["id"])))
    return scored if n is None else scored[: max(0, int(n))]


def format_worst(records: Sequence[dict]) -> str:
    """A table for the terminal: rank, score, the main signals, mIoU when known, id."""
    lines = [f"{'rank':>4}  {'score':>5}  {'drop':>5}  {'cover':>5}  {'crf':>5}  {'blur':>5}  {'degen':>5}  {'mIoU':>5}  id"]

    def f(v):
        return "    -" if v is None else f"{v:5.2f}"

    for i, r in enumerate(records, 1):
        q = r["quality"]
        lines.append(f"{i:>4}  {f(q['score'])}  {f(q.get('dropped'))}  {f(q.get('coverage'))}  {f(q.get('crf_changed'))}  "
                     f"{f(q.get('blur'))}  "
                     f"{f(q.get('degenerate'))}  {f(q.get('miou'))}  {r['id']}")
    return "\n".join(lines)
