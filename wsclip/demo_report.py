"""What `make demo` measures and shows: CAM and mask metrics on the synthetic world's val split,
overlay pictures, the results table and the papers' effects (used by `wsclip.demo` and
benchmarks/synth_ablation.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

SWEEP = tuple(round(0.05 * i, 2) for i in range(1, 20))  # CAM background thresholds 0.05 .. 0.95


# ============================================================================ metrics
def cam_metrics(cam_dir, val, backgrounds: dict[str, int], key: str = "high_res", thresholds=SWEEP,
                fa_threshold: float = 0.15, fa_margin: int = 3) -> dict:
    """CAM mIoU for each background threshold (best one picked) and the co-occurring-background FA.

    val: a dataset with masks (val split); backgrounds: id -> background index of the scene.
    """
    from scipy import ndimage

    from wsclip.data.synth import SYNTH_PREFERRED
    from wsclip.eval.metrics import ConfusionMatrix
    from wsclip.formats import read_cam_file

    k = len(val.classes)
    cms = {t: ConfusionMatrix(k + 1) for t in thresholds}
    hits = {t: 0 for t in (*thresholds, fa_threshold)}
    pixels = 0
    covered = object_pixels = 0
    aucs: list[float] = []
    cam_dir = Path(cam_dir)
    for n, image_id in enumerate(val.ids):
        z = read_cam_file(cam_dir / f"{image_id}.npz")
        cams = np.asarray(z[key], dtype=np.float32)
        keys = np.asarray(z["keys"], dtype=np.int64)
        gt = val.load_mask(n)
        if len(keys):
            best, label = cams.max(0), (keys + 1)[cams.argmax(0)]
        else:
            best, label = np.full(gt.shape, -np.inf, np.float32), np.zeros(gt.shape, np.int64)
        for t, cm in cms.items():
            cm.update(np.where(best > t, label, 0), gt)
        far = ~ndimage.binary_dilation(gt != 0, iterations=fa_margin) if fa_margin > 0 else gt == 0
        far &= gt == 0
        for j, c in enumerate(keys):
            own = cams[j][gt == c + 1]
            covered += int((own > fa_threshold).sum())
            object_pixels += own.size
            if own.size and (gt == 0).any():
                aucs.append(ranking_auc(own, cams[j][gt == 0]))
            if SYNTH_PREFERRED.get(int(c)) != backgrounds[image_id] or not far.any():
                continue
            vals = cams[j][far]
            pixels += vals.size
            for t in hits:
                hits[t] += int((vals > t).sum())
    miou = {t: cm.miou() for t, cm in cms.items()}
    best_t = max(miou, key=miou.get)
    fa = {t: (hits[t] / pixels if pixels else float("nan")) for t in hits}
    return {"miou_by_threshold": miou, "threshold": best_t, "cam_miou": miou[best_t],
            "cam_iou": cms[best_t].to_dict(["background", *val.classes])["iou"],
            "co_bg_fa": fa[fa_threshold], "co_bg_fa_at_best": fa[best_t], "co_bg_pixels": pixels,
            "object_coverage": covered / object_pixels if object_pixels else float("nan"),
            "object_auc": float(np.mean(aucs)) if aucs else float("nan")}


def ranking_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a random `pos` value > a random `neg` value), ties counted half (Mann-Whitney U / (n_pos n_neg))."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([np.ravel(pos), np.ravel(neg)]))
    n_pos, n_neg = np.size(pos), np.size(neg)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def mask_miou(pred_dir, world: Path) -> float:
    from wsclip.eval.evaluate import evaluate_folders

    cm, _ = evaluate_folders(pred_dir, world / "SegmentationClass", 7,
                             split=world / "ImageSets" / "Segmentation" / "val.txt")
    return cm.miou()


def pseudo_masks(cam_dir, out_dir, val, key: str = "high_res", bg: str = "threshold", threshold: float = 0.15,
                 crf: bool = True, irn=None, rw_threshold: float = 0.20) -> Path:
    """Val pseudo masks from CAM files (threshold or (1 - max) background, optional CRF / IRN random walk)."""
    from wsclip.label.pseudo import PseudoConfig, make_pseudo_masks

    pc = PseudoConfig(key=key, bg=bg, bg_threshold=threshold, crf=crf, workers=0, rw_bg_threshold=rw_threshold)
    make_pseudo_masks(cam_dir, out_dir, data=val, split="val", cfg=pc, irn=irn, device="cpu")
    return Path(out_dir)


# ============================================================================ pictures
def _up(img: np.ndarray, f: int) -> np.ndarray:
    return np.repeat(np.repeat(img, f, axis=0), f, axis=1)


def save_overlays(path: Path, val, rows: dict[str, dict], picks: Sequence[int], zoom: int = 3) -> Path:
    """One PNG: per picked val image, the image, its ground truth and each method's CAM and pseudo mask."""
    from wsclip.eval.viz import cam_heatmap, grid, overlay, save_png
    from wsclip.io import read_mask
    from wsclip.formats import read_cam_file

    panels, titles = [], []
    for i in picks:
        image_id = val.ids[i]
        img, gt = val.load_image(i), val.load_mask(i)
        panels += [_up(img, zoom), _up(overlay(img, gt, alpha=0.75), zoom)]
        titles += [image_id, "ground truth"]
        for name, row in rows.items():
            z = read_cam_file(Path(row["cams"]) / f"{image_id}.npz")
            cams = np.asarray(z[row.get("key", "high_res")], dtype=np.float32)
            heat = cams.max(0) if len(cams) else np.zeros(img.shape[:2], np.float32)
            panels.append(_up(cam_heatmap(img, heat), zoom))
            titles.append(f"{name}: CAM")
            if row.get("masks"):
                panels.append(_up(overlay(img, read_mask(Path(row["masks"]) / f"{image_id}.png"), alpha=0.75), zoom))
                titles.append(f"{name}: mask")
    ncols = len(panels) // max(1, len(picks))
    return save_png(path, grid(panels, ncols=ncols, titles=titles))


def pick_examples(val, backgrounds: dict[str, int], n: int) -> list[int]:
    """Val images whose first class sits on its preferred background (where CBS should matter), then others."""
    from wsclip.data.synth import SYNTH_PREFERRED

    preferred, other = [], []
    for i, image_id in enumerate(val.ids):
        keys = np.flatnonzero(val.label_vector(i).numpy() > 0.5)
        on_pref = any(SYNTH_PREFERRED[int(c)] == backgrounds[image_id] for c in keys)
        (preferred if on_pref else other).append(i)
    return (preferred + other)[:n]


# ============================================================================ table
COLUMNS = ("CAM mIoU", "thr", "pseudo mIoU", "refinement", "co-bg FA")


def format_table(rows: dict[str, dict]) -> str:
    """Markdown table of the rows (percentages)."""

    def pct(v):
        return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.1f}"

    lines = ["| method | CAM mIoU | bg thr | pseudo-mask mIoU | pseudo mask | co-bg FA % |",
             "|---|---:|---:|---:|---|---:|"]
    for name, r in rows.items():
        thr = "-" if r.get("threshold") is None else f"{r['threshold']:.2f}"
        lines.append(f"| {name} | {pct(r.get('cam_miou'))} | {thr} | {pct(r.get('mask_miou'))} | "
                     f"{r.get('refinement', '-')} | {pct(r.get('co_bg_fa'))} |")
    return "\n".join(lines)


#: the effects the papers report, as (name, row a, row b, metric, target): value = metric(a) - metric(b),
#: target the least difference (in fractions) the issue asks the synthetic world to show
EFFECTS = (
    ("CLIMS (all terms) over the untrained network, CAM mIoU", "CLIMS OTM+BTM+REG+CBS", "untrained", "cam_miou", 0.10),
    ("CLIMS (all terms) over the baseline CAM, CAM mIoU", "CLIMS OTM+BTM+REG+CBS", "baseline CAM", "cam_miou", 0.10),
    ("OTM+BTM over OTM alone, CAM mIoU", "CLIMS OTM+BTM", "CLIMS OTM", "cam_miou", 0.0),
    ("CBS lowers the co-occurring-background FA (OTM+BTM+REG -> +CBS)", "CLIMS OTM+BTM+REG", "CLIMS OTM+BTM+REG+CBS",
     "co_bg_fa", 0.0),
    ("CLIP-ES: CAA over GradCAM, pseudo-mask mIoU", "CLIP-ES + CAA", "CLIP-ES GradCAM", "mask_miou", 0.02),
    ("CLIP-ES: CRF over CAA, pseudo-mask mIoU", "CLIP-ES + CAA + CRF", "CLIP-ES + CAA", "mask_miou", 0.02),
    ("IRN random walk over the CAMs it starts from (pseudo-mask vs CAM mIoU)", "CLIMS OTM+BTM+REG+CBS + RW",
     "CLIMS OTM+BTM+REG+CBS", ("mask_miou", "cam_miou"), 0.0),
)


def effects(rows: dict[str, dict]) -> list[dict]:
    """The EFFECTS present in `rows`: [{"effect", "value", "target", "met"}] (values in fractions)."""
    found = []
    for name, a, b, metric, target in EFFECTS:
        ma, mb = (metric, metric) if isinstance(metric, str) else metric
        if a in rows and b in rows and rows[a].get(ma) is not None and rows[b].get(mb) is not None:
            value = float(rows[a][ma]) - float(rows[b][mb])
            found.append({"effect": name, "value": value, "target": target,
                          "met": bool(value >= target if target > 0 else value > 0)})
    return found


def format_effects(found: list[dict]) -> str:
    """Markdown table of the effects (points)."""
    lines = ["| effect (the papers' claim) | measured (points) | target | met |", "|---|---:|---:|---|"]
    for e in found:
        target = f">= +{100 * e['target']:.0f}" if e["target"] > 0 else "> 0"
        lines.append(f"| {e['effect']} | {100 * e['value']:+.1f} | {target} | {'yes' if e['met'] else 'no'} |")
    return "\n".join(lines)
