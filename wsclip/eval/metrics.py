"""Dataset-level segmentation metrics (METHODS.md section 8)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from wsclip.errors import ShapeError, WsclipError

#: what a predicted `ignore_index` (e.g. 255 of a confidence-filtered pseudo mask) counts as:
#: "background" (class 0, as the CLIMS/IRN evaluation does; the default), "miss" (a false negative of
#: the ground-truth class), "ignore" (the pixel is left out: mIoU over the kept pixels)
PRED_IGNORE = ("background", "miss", "ignore")


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class ConfusionMatrix:
    """Accumulates a (num_classes x num_classes) confusion matrix over a whole dataset.

    Rows are ground truth, columns prediction. Pixels whose ground truth is `ignore_index` are
    skipped. A predicted `ignore_index` counts as `pred_ignore` says (PRED_IGNORE; every policy can
    also be asked for afterwards: `iou(policy)`, `miou(policy)`); other predictions outside
    [0, num_classes) count as wrong. `coverage()` is the share of evaluated ground-truth pixels
    given a label other than `ignore_index`.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, pred_ignore: str = "background"):
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        if pred_ignore not in PRED_IGNORE:
            raise WsclipError(f"unknown policy for predicted {ignore_index}: {pred_ignore!r}; use one of "
                              f"{', '.join(PRED_IGNORE)}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.pred_ignore = pred_ignore
        # pixels whose prediction is a class (the kept pixels)
        self.mat = np.zeros((num_classes, num_classes), dtype=np.int64)
        # per ground-truth class: valid pixels predicted outside [0, num_classes), ignore_index apart (misses)
        self.out_of_range = np.zeros(num_classes, dtype=np.int64)
        # per ground-truth class: valid pixels predicted ignore_index (counted as `pred_ignore` says)
        self.pred_ignored = np.zeros(num_classes, dtype=np.int64)

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
        dropped = valid & (pred == self.ignore_index) & ~in_range
        if dropped.any():
            self.pred_ignored += np.bincount(gt[dropped], minlength=n)
        out = valid & ~in_range & ~dropped
        if out.any():
            self.out_of_range += np.bincount(gt[out], minlength=n)
        return self

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another matrix's counts (e.g. from another worker)."""
        if other.num_classes != self.num_classes:
            raise ShapeError("cannot merge confusion matrices of different sizes")
        self.mat += other.mat
        self.out_of_range += other.out_of_range
        self.pred_ignored += other.pred_ignored
        return self

    def _counts(self, policy: str | None) -> tuple[np.ndarray, np.ndarray]:
        """(confusion matrix, extra false negatives per class) under a policy for predicted ignore_index."""
        policy = policy or self.pred_ignore
        if policy not in PRED_IGNORE:
            raise WsclipError(f"unknown policy {policy!r}: use one of {', '.join(PRED_IGNORE)}")
        mat, misses = self.mat, self.out_of_range
        if policy == "background":
            mat = mat.copy()
            mat[:, 0] += self.pred_ignored
        elif policy == "miss":
            misses = misses + self.pred_ignored
        return mat, misses

    def iou(self, policy: str | None = None) -> np.ndarray:
        """Per-class IoU = TP / (TP + FP + FN); NaN for classes absent from both GT and prediction.

        `policy`: how predicted ignore_index counts (PRED_IGNORE; default the matrix's `pred_ignore`).
        """
        mat, misses = self._counts(policy)
        tp = np.diag(mat).astype(np.float64)
        fp = mat.sum(0) - np.diag(mat)
        fn = mat.sum(1) - np.diag(mat) + misses
        denom = tp + fp + fn
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)
        return out

    def miou(self, policy: str | None = None) -> float:
        """Mean IoU over classes that appear in ground truth or prediction (0.0 if none)."""
        iou = self.iou(policy)
        if np.all(np.isnan(iou)):
            return 0.0
        return float(np.nanmean(iou))

    def pixel_accuracy(self, policy: str | None = None) -> float:
        mat, misses = self._counts(policy)
        total = mat.sum() + misses.sum()
        return float(np.diag(mat).sum() / total) if total else 0.0

    def coverage(self) -> float:
        """Share of evaluated ground-truth pixels whose prediction is not ignore_index (1.0 when none were seen)."""
        total = self.mat.sum() + self.out_of_range.sum() + self.pred_ignored.sum()
        return float(1.0 - self.pred_ignored.sum() / total) if total else 1.0

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
        if self.pred_ignored.any():
            lines.append(f"predicted {self.ignore_index} counted as {self.pred_ignore}; coverage "
                         f"{100 * self.coverage():.1f}% of pixels, mIoU over the kept pixels {100 * self.miou('ignore'):.1f}")
        return "\n".join(lines)

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict:
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        return {
            "miou": self.miou(),
            "pixel_accuracy": self.pixel_accuracy(),
            "iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, self.iou())},
            "pred_ignore": self.pred_ignore,
            "coverage": self.coverage(),
            "miou_kept": self.miou("ignore"),
        }
