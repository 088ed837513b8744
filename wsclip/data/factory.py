"""open_dataset: one entry point for every dataset layout."""

from __future__ import annotations

from pathlib import Path

from wsclip.errors import DatasetLayoutError, MissingFileError

SCHEMES = ("voc", "coco", "folder", "synth")
VOC_MARKERS = ("SegmentationClass", "SegmentationClassAug", "Annotations", "ImageSets")


def _split_spec(spec: str) -> tuple[str | None, str]:
    scheme, sep, rest = str(spec).partition(":")
    if sep and scheme.lower() in SCHEMES:
        return scheme.lower(), rest
    return None, str(spec)


def detect_layout(path) -> str:
    """'voc', 'coco' or 'folder' for a dataset folder; DatasetLayoutError saying what was looked for."""
    from wsclip.data.coco import is_coco_root
    from wsclip.data.folder import LABEL_FILES, list_images
    from wsclip.data.voc import find_voc_root

    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"dataset folder not found: {path}")
    if not path.is_dir():
        raise DatasetLayoutError(f"{path} is a file; a dataset is a folder (VOC, COCO, or images + labels file)")
    if find_voc_root(path) is not None:
        return "voc"
    for cand in (path, path / "VOC2012", path / "VOCdevkit" / "VOC2012"):
        marks = [m for m in VOC_MARKERS if (cand / m).is_dir()]
        if marks:
            raise DatasetLayoutError(
                f"{cand} looks like a VOC layout ({', '.join(marks)}) but has no JPEGImages folder: "
                "put the images in JPEGImages/<id>.jpg"
            )
    if is_coco_root(path):
        return "coco"
    if any((path / n).is_file() for n in LABEL_FILES) or list_images(path):
        return "folder"
    raise DatasetLayoutError(
        f"cannot tell the dataset layout of {path}: looked for a VOC layout (JPEGImages/ in it, in "
        "VOC2012/ or VOCdevkit/VOC2012/), a COCO layout (annotations/instances_*.json) and a folder "
        f"of images or a labels file ({', '.join(LABEL_FILES)}). Prefix the path with voc:, coco: or folder: "
        "to say which layout you mean"
    )


def _default_split(layout: str, root: Path) -> str:
    if layout == "voc":
        from wsclip.data.voc import available_splits, find_voc_root

        splits = available_splits(find_voc_root(root) or root)
    else:
        stems = [p.stem.removeprefix("instances_") for p in root.glob("annotations/instances_*.json")]
        splits = sorted({s[:-4] if len(s) > 4 and s[-4:].isdigit() else s for s in stems})
    if "train" in splits or not splits:
        return "train"
    if len(splits) == 1:
        return splits[0]
    raise DatasetLayoutError(f"{root} has splits {', '.join(splits)}: pass split=<one of them>")


def open_dataset(spec, split: str | None = None, **kw):
    """Open 'voc:PATH', 'coco:PATH', 'folder:PATH', 'synth:' or a plain PATH (layout auto-detected).

    `split` defaults to 'train' (or the only split there is); other keywords go to the
    dataset class (transform, masks, labels, classes, ...). For a folder, `split` is an
    optional list file of ids; a bare name that is no file there ('train', 'train_aug') means
    every image, and a note says so.
    """
    scheme, rest = _split_spec(spec)
    if scheme == "synth":
        try:
            from wsclip.data.synth import SynthDataset
        except ImportError:
            raise DatasetLayoutError("the synthetic dataset (wsclip.data.synth) is not available") from None
        return SynthDataset(split=split or "train", **kw)
    if not rest:
        raise DatasetLayoutError(f"dataset spec '{spec}' names no folder: write e.g. voc:/data/VOC2012")
    root = Path(rest).expanduser()
    layout = scheme or detect_layout(root)
    if layout == "voc":
        from wsclip.data.voc import VOCDataset

        if not root.exists():
            raise MissingFileError(f"VOC dataset folder not found: {root}")
        return VOCDataset(root, split=split or _default_split("voc", root), **kw)
    if layout == "coco":
        from wsclip.data.coco import COCODataset

        if not root.is_dir():
            raise MissingFileError(f"COCO dataset folder not found: {root}")
        return COCODataset(root, split=split or _default_split("coco", root), **kw)
    from wsclip.data.folder import FolderDataset

    split_file = _folder_split_file(root, split)
    ds = FolderDataset(root, split=split_file, **kw)
    if split is not None and split_file is None:
        import sys

        print(f"note: folder dataset {root} has no split file '{split}': using all its {len(ds)} images "
              "(pass --split FILE, one image id per line, to use fewer)", file=sys.stderr)
    return ds


def _folder_split_file(root: Path, split) -> Path | None:
    """The list file a folder dataset's `split` names, or None (every image) for a bare split name such
    as the training default 'train_aug' that is not a file; a path that does not exist is an error."""
    if split is None:
        return None
    split = Path(split).expanduser()
    for cand in (split, root / split, root / f"{split}.txt"):
        if cand.is_file():
            return cand
    if len(split.parts) == 1 and not split.suffix:
        return None
    raise MissingFileError(f"split file not found: {split} (a folder dataset's split is a file of image ids, "
                           "one per line; leave it out to use every image)")


def open_images(spec, split: str | None = None, masks: bool = False, classes=None):
    """`open_dataset` for its images (and, with masks=True, the dataset's own masks) whatever its layout.

    VOC and COCO skip their masks unless asked; a folder dataset has masks only when given a
    mask folder, so `masks=True` there is a clear error. `classes` (a model's class names): a
    folder dataset's labels are read by name onto these classes (only names outside them are an
    error); other layouts keep their own classes.
    """
    spec = str(spec)
    layout = layout_of(spec)
    if layout in ("voc", "coco"):
        return open_dataset(spec, split=split, masks=bool(masks))
    kw = {"classes": tuple(classes)} if layout == "folder" and classes is not None else {}
    ds = open_dataset(spec, split=split, **kw)
    if masks and not getattr(ds, "with_masks", False):
        raise DatasetLayoutError(f"{spec} has no ground-truth masks (a folder dataset needs masks=<mask folder>)")
    return ds


def layout_of(spec) -> str:
    """'voc', 'coco', 'folder' or 'synth' of a dataset spec (its scheme, else detected from the folder)."""
    spec = str(spec)
    scheme = spec.partition(":")[0].lower() if ":" in spec else None
    return scheme if scheme in SCHEMES else detect_layout(Path(spec).expanduser())
