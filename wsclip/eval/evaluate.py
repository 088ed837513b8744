"""Evaluate folders of predicted masks against ground truth."""

from __future__ import annotations

from pathlib import Path

from wsclip.data.splits import read_split  # noqa: F401 - re-exported (ids, or file paths, one a line)
from wsclip.errors import DatasetLayoutError, MissingFileError, ShapeError
from wsclip.eval.metrics import ConfusionMatrix
from wsclip.io import read_mask
from wsclip.progress import progress


def resolve_class_names(dataset: str, num_classes: int | None = None) -> list[str]:
    """['background', *classes] for 'voc', 'coco', a file of names (one a line), or N numbered classes."""
    from wsclip.vocab import DATASET_CLASSES

    if dataset in DATASET_CLASSES:
        names = ["background", *DATASET_CLASSES[dataset]]
    elif Path(dataset).is_file():
        names = [ln.strip() for ln in Path(dataset).read_text().splitlines() if ln.strip()]
        if names and names[0] != "background":
            names = ["background", *names]
    else:
        raise DatasetLayoutError(
            f"--dataset '{dataset}' is neither 'voc', 'coco' nor a file of class names (one per line)"
        )
    if num_classes is not None:
        if num_classes < len(names):
            names = names[:num_classes]
        else:
            names += [str(i) for i in range(len(names), num_classes)]
    return names


def evaluate_folders(pred_dir, gt_dir, num_classes: int, split=None, ignore_index: int = 255,
                     pred_ignore: str | None = None, compat: str = "wsclip"):
    """Confusion matrix over every id in `split` (or every PNG in gt_dir); returns (cm, count).

    `pred_ignore`: how a predicted `ignore_index` counts (wsclip.eval.metrics.PRED_IGNORE); None: as
    `compat` says (both: background, as the CLIMS/IRN evaluation). The matrix also gives coverage
    and the mIoU over the kept pixels.
    """
    from wsclip import compat as compat_rule

    pred_ignore = pred_ignore or compat_rule.value("pred_ignore", compat)
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for d, what in ((pred_dir, "prediction"), (gt_dir, "ground-truth")):
        if not d.is_dir():
            raise MissingFileError(f"{what} folder not found: {d}")
    ids = read_split(split) if split else sorted(p.stem for p in gt_dir.glob("*.png"))
    if not ids:
        raise DatasetLayoutError(f"no ground-truth masks (*.png) in {gt_dir}")
    missing = [i for i in ids if not (pred_dir / f"{i}.png").is_file()]
    if missing:
        raise MissingFileError(
            f"{len(missing)} of {len(ids)} predictions missing in {pred_dir}, e.g. {missing[0]}.png"
        )
    cm = ConfusionMatrix(num_classes, ignore_index, pred_ignore=pred_ignore)
    for i in progress(ids, desc="eval", unit="img"):
        pred, gt = read_mask(pred_dir / f"{i}.png"), read_mask(gt_dir / f"{i}.png")
        if pred.shape != gt.shape:
            raise ShapeError(f"{i}: prediction is {pred.shape[1]}x{pred.shape[0]}, ground truth {gt.shape[1]}x{gt.shape[0]}")
        cm.update(pred, gt)
    return cm, len(ids)
