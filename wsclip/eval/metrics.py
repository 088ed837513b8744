"""Dataset-level segmentation metrics (METHODS.md section 8)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from wsclip.errors import ShapeError


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class ConfusionMatrix:
    """Accumulates a (num_classes x num_classes) confusion matrix over a whole dataset.

    Rows are ground truth, columns prediction. Pixels whose ground truth is
    `ignore_index` are skipped; predictions outside [0, num_classes) count as wrong.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.mat = np.zeros((num_classes, num_classes), dtype=np.int64)
        # per ground-truth class: valid pixels predicted outside [0, num_classes) (false negatives)
        self.out_of_range = np.zeros(num_classes, dtype=np.int64)

    def update(self, pred, gt) -> "ConfusionMatrix":
        """Add one prediction/ground-truth pair (integer arrays or tensors of equal shape)."""
        pred = _as_numpy(pred).astype(np.int64).ravel()
        gt = _as_numpy(gt).astype(np.int64).ravel()
        if pred.shape != gt.shape:
            raise ShapeError(f"prediction has {pred.size} pixels but ground truth has {gt.size}")
        valid = gt != self.ignore_index
        if (gt[valid] >= self.num_classes).any() or (gt[valid] < 0).any():
            bad = np.unique(gt[valid][(gt[valid] >= self.num_classes) | (gt[valid] < 0)])
            raise ShapeError(f"ground truth has labels {bad.tolist()} outside 0..{self.num_classes - 1} (255 = ignore)")
        in_range = valid & (pred >= 0) & (pred < self.num_classes)
        n = self.num_classes
        self.mat += np.bincount(gt[in_range] * n + pred[in_range], minlength=n * n).reshape(n, n)
        out = valid & ~in_range
        if out.any():
            self.out_of_range += np.bincount(gt[out], minlength=n)
        return self

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another matrix's counts (e.g. from another worker)."""
        if other.num_classes != self.num_classes:
            raise ShapeError("cannot merge confusion matrices of different sizes")
        self.mat += other.mat
        self.out_of_range += other.out_of_range
        return self

    def iou(self) -> np.ndarray:
        """Per-class IoU = TP / (TP + FP + FN); NaN for classes absent from both GT and prediction."""
        tp = np.diag(self.mat).astype(np.float64)
        fp = self.mat.sum(0) - np.diag(self.mat)
        fn = self.mat.sum(1) - np.diag(self.mat) + self.out_of_range
        denom = tp + fp + fn
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)
        return out

    def miou(self) -> float:
        """Mean IoU over classes that appear in ground truth or prediction (0.0 if none)."""
        iou = self.iou()
        if np.all(np.isnan(iou)):
            return 0.0
        return float(np.nanmean(iou))

    def pixel_accuracy(self) -> float:
        total = self.mat.sum() + self.out_of_range.sum()
        return float(np.diag(self.mat).sum() / total) if total else 0.0

    def table(self, class_names: Sequence[str] | None = None) -> str:
        """A per-class IoU table as text, ending with the mIoU line."""
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ShapeError(f"{len(names)} class names for {self.num_classes} classes")
        width = max(10, max(len(n) for n in names))
        lines = [f"{'class':<{width}}  IoU"]
        for name, v in zip(names, self.iou()):
            lines.append(f"{name:<{width}}  {'  n/a' if np.isnan(v) else f'{100 * v:5.1f}'}")
        lines.append(f"{'mIoU':<{width}}  {100 * self.miou():5.1f}")
        return "\n".join(lines)

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict:
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        return {
            "miou": self.miou(),
            "pixel_accuracy": self.pixel_accuracy(),
            "iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, self.iou())},
        }
