"""PASCAL VOC 2012 layout (and any VOC-like folder: JPEGImages + masks / labels + split lists).

    VOC2012/JPEGImages/<id>.jpg (.png accepted)
    VOC2012/SegmentationClassAug/<id>.png, SegmentationClass/<id>.png    masks (Aug preferred)
    VOC2012/ImageSets/Segmentation/{train,val,...}.txt, or <root>/<split>.txt, or a list file
    VOC2012/Annotations/<id>.xml
    cls_labels.json | cls_labels.npy | labels.json                       image-level labels
    classes.txt                                                          class names (default VOC)

Image-level labels come from the first source that knows the id: the labels file (or
`labels=`), the annotation XML, then the mask (classes present, 0 and 255 skipped).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from wsclip.data.base import LabeledImageDataset, labels_from_mask, read_class_list, resolve_classes
from wsclip.data.labelfiles import labels_from_xml, load_label_table
from wsclip.data.splits import IMAGE_EXTS, read_split
from wsclip.errors import DatasetLayoutError, MissingFileError
from wsclip.io import read_image, read_mask
from wsclip.vocab import VOC_CLASSES

MASK_DIRS = ("SegmentationClassAug", "SegmentationClass")
SPLIT_DIRS = ("ImageSets/Segmentation", "ImageSets/SegmentationAug", "")
LABEL_FILES = ("cls_labels.json", "cls_labels.npy", "labels.json")


def find_voc_root(path) -> Path | None:
    """The folder holding JPEGImages: `path` itself, path/VOC2012 or path/VOCdevkit/VOC2012."""
    path = Path(path)
    for cand in (path, path / "VOC2012", path / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            return cand
    return None


def _stems(folder: Path, exts: Sequence[str]) -> dict[str, str]:
    """{stem: file name} for files in `folder` with one of `exts` (earlier extensions win)."""
    rank = {e: n for n, e in enumerate(exts)}
    best: dict[str, tuple[int, str]] = {}
    if folder.is_dir():
        with os.scandir(folder) as it:
            for entry in it:
                stem, dot, ext = entry.name.rpartition(".")
                r = rank.get(f".{ext.lower()}")
                if dot and stem and r is not None and (stem not in best or r < best[stem][0]):
                    best[stem] = (r, entry.name)
    return {stem: name for stem, (_, name) in best.items()}


def available_splits(root: Path) -> list[str]:
    """Split names with a list file under the usual places."""
    names = set()
    for d in SPLIT_DIRS:
        folder = root / d if d else root
        if folder.is_dir():
            names.update(p.stem for p in folder.glob("*.txt") if p.stem not in ("classes", "README", "backgrounds"))
    return sorted(names)


def find_split_file(root: Path, split: str) -> Path:
    """The list file of a split name (or the split itself when it is a path to a file)."""
    if Path(split).is_file():
        return Path(split)
    looked = [(root / d / f"{split}.txt") if d else root / f"{split}.txt" for d in SPLIT_DIRS]
    for p in looked:
        if p.is_file():
            return p
    avail = available_splits(root)
    raise MissingFileError(
        f"split '{split}' not found: looked for {', '.join(str(p) for p in looked)}. "
        + (f"Available splits: {', '.join(avail)}." if avail else "No split lists found; ")
        + " Pass split=<name> or the path of a list file (one id per line)."
    )


class VOCDataset(LabeledImageDataset):
    """A VOC-layout dataset. `masks`: None = include when every id has one, True = require, False = skip.

    `labels`: a label file to use instead of the ones found in the root; `classes`: names
    (default: root/classes.txt, else the 20 VOC classes); `mask_dir`: a folder of <id>.png
    masks replacing SegmentationClassAug/SegmentationClass.
    """

    def __init__(
        self,
        root,
        split: str = "train",
        transform: Callable[[dict], dict] | None = None,
        masks: bool | None = None,
        labels=None,
        classes: Sequence[str] | str | Path | None = None,
        mask_dir=None,
    ):
        super().__init__(transform)
        given = Path(root)
        if not given.exists():
            raise MissingFileError(f"VOC dataset folder not found: {given}")
        found = find_voc_root(given)
        if found is None:
            raise DatasetLayoutError(
                f"{given} is not a VOC layout: no JPEGImages folder in it, in {given / 'VOC2012'} "
                f"or in {given / 'VOCdevkit' / 'VOC2012'}"
            )
        self.root = found
        self.split = str(split)
        self.classes = resolve_classes(classes) or (
            read_class_list(found / "classes.txt") if (found / "classes.txt").is_file() else VOC_CLASSES
        )
        self.split_file = find_split_file(found, self.split)
        self.ids = read_split(self.split_file)

        images = _stems(found / "JPEGImages", IMAGE_EXTS)
        missing = [i for i in self.ids if i not in images]
        if missing:
            raise MissingFileError(
                f"{len(missing)} of {len(self.ids)} ids listed in {self.split_file} have no image in "
                f"{found / 'JPEGImages'}, e.g. '{missing[0]}'"
            )
        self._images = [found / "JPEGImages" / images[i] for i in self.ids]

        # masks: per id, the first mask folder that has it
        mask_dirs = [Path(mask_dir)] if mask_dir is not None else [found / d for d in MASK_DIRS]
        if mask_dir is not None and not Path(mask_dir).is_dir():
            raise MissingFileError(f"mask folder not found: {mask_dir}")
        listings = [(d, _stems(d, (".png",))) for d in mask_dirs]
        self._masks: list[Path | None] = []
        for i in self.ids:
            self._masks.append(next((d / f"{i}.png" for d, names in listings if i in names), None))
        n_missing = sum(m is None for m in self._masks)
        if masks is True and n_missing:
            first = self.ids[[m is None for m in self._masks].index(True)]
            raise MissingFileError(
                f"{n_missing} of {len(self.ids)} masks missing (looked in "
                f"{', '.join(str(d) for d in mask_dirs)}), e.g. '{first}.png'"
            )
        self.with_masks = bool(self.ids) and n_missing == 0 and masks is not False

        # image-level labels
        self.labels_file: Path | None = None
        if labels is not None:
            self.labels_file = Path(labels)
            if not self.labels_file.is_file():
                raise MissingFileError(f"labels file not found: {labels}")
        else:
            for name in LABEL_FILES:
                for folder in (found, given) if given != found else (found,):
                    if (folder / name).is_file():
                        self.labels_file = folder / name
                        break
                if self.labels_file is not None:
                    break
        self._table = load_label_table(self.labels_file, self.classes) if self.labels_file else {}
        self._xml_dir = found / "Annotations" if (found / "Annotations").is_dir() else None

    def load_image(self, i: int) -> np.ndarray:
        return read_image(self._images[i])

    def load_mask(self, i: int) -> np.ndarray:
        path = self._masks[i]
        if path is None:
            raise MissingFileError(f"no mask for '{self.ids[i]}' in {self.root}")
        return read_mask(path)

    def label_source(self, i: int) -> str:
        """Where item i's labels come from: a labels file, an annotation XML or a mask path."""
        image_id = self.ids[i]
        if image_id in self._table:
            return str(self.labels_file)
        if self._xml_dir is not None and (self._xml_dir / f"{image_id}.xml").is_file():
            return str(self._xml_dir / f"{image_id}.xml")
        if self._masks[i] is not None:
            return str(self._masks[i])
        raise MissingFileError(
            f"no image-level labels for '{image_id}': not in "
            f"{self.labels_file or 'a labels file (cls_labels.json/.npy, labels.json)'}, no "
            f"Annotations/{image_id}.xml and no mask; add one of them"
        )

    def label_vector(self, i: int, mask: np.ndarray | None = None) -> torch.Tensor:
        image_id = self.ids[i]
        if image_id in self._table:
            return self._table[image_id].clone()
        source = self.label_source(i)
        if source.endswith(".xml"):
            return labels_from_xml(Path(source), self.classes)
        if mask is None:
            mask = read_mask(source)
        return labels_from_mask(mask, len(self.classes), where=source)
