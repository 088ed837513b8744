"""Any folder of images plus a labels file (JSON or CSV: image -> class names).

    photos/a.jpg, photos/sub/b.png, ...
    photos/labels.json   {"a.jpg": ["cat", "dog"], "sub/b.png": ["dog"]}  (or class numbers 1..K with classes.txt)
    photos/labels.csv    image,labels / a.jpg,cat;dog / sub/b.png,dog
    photos/classes.txt   optional class list (else the names in the labels file, sorted)

Ids are the image paths relative to the folder without the extension ('a', 'sub/b').
Without a labels file every image is listed with all-zero labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from wsclip.data.base import LabeledImageDataset, multi_hot, read_class_list, resolve_classes
from wsclip.data.labelfiles import parse_label_value, read_name_labels
from wsclip.data.splits import IMAGE_EXTS, split_positions
from wsclip.errors import DatasetLayoutError, MissingFileError, UnknownClassError
from wsclip.io import read_image, read_mask
from wsclip.vocab import class_index

LABEL_FILES = ("labels.json", "labels.csv")


def list_images(root: Path) -> list[Path]:
    """Image files under `root` (recursive, hidden folders skipped), sorted."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.suffix.lower() in IMAGE_EXTS and p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out.append(p)
    return out


class FolderDataset(LabeledImageDataset):
    """Images of a folder with labels from `labels` (default: labels.json / labels.csv in it).

    `classes`: names, 'voc'/'coco', or a text file (default: classes.txt, else the names used
    in the labels file, sorted). `masks`: an optional folder of <id>.png masks (False or None:
    none). `split`: an optional list file restricting the ids (None: every image).
    """

    def __init__(
        self,
        root,
        labels=None,
        classes: Sequence[str] | str | Path | None = None,
        transform: Callable[[dict], dict] | None = None,
        masks=None,
        split=None,
    ):
        super().__init__(transform)
        self.root = Path(root)
        if not self.root.is_dir():
            raise MissingFileError(f"image folder not found: {self.root}")
        if labels is None:
            labels = next((self.root / n for n in LABEL_FILES if (self.root / n).is_file()), None)
        elif not Path(labels).is_file():
            raise MissingFileError(f"labels file not found: {labels}")
        self.labels_file = Path(labels) if labels is not None else None

        classes = resolve_classes(classes)
        if classes is None and (self.root / "classes.txt").is_file():
            classes = read_class_list(self.root / "classes.txt")

        if self.labels_file is not None:
            table = read_name_labels(self.labels_file, classes)
            if not table:
                raise DatasetLayoutError(f"labels file {self.labels_file} lists no images")
            files = [self._resolve_image(name) for name in table]
            names = list(table.values())
        else:
            files = list_images(self.root)
            if not files:
                raise DatasetLayoutError(
                    f"no images ({', '.join(IMAGE_EXTS)}) in {self.root} and no labels file "
                    f"({' or '.join(LABEL_FILES)})"
                )
            names = [[] for _ in files]
        if any(not isinstance(n, str) for ns in names for n in ns):
            names = self._numbers_to_names(files, names, classes)
        if classes is None:
            classes = tuple(sorted({n for ns in names for n in ns}))
        self.classes = tuple(classes)

        ids = [p.relative_to(self.root).with_suffix("").as_posix() for p in files]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise DatasetLayoutError(f"two images share the id '{dup}' in {self.root} (same name, other extension)")
        vectors = []
        for p, ns in zip(files, names):
            idx = []
            for n in ns:
                try:
                    idx.append(class_index(n, self.classes))
                except UnknownClassError as exc:
                    raise UnknownClassError(
                        f"{self.labels_file}: image '{p.relative_to(self.root).as_posix()}': {exc}"
                    ) from None
            vectors.append(multi_hot(sorted(set(idx)), len(self.classes)))

        order = list(range(len(ids)))
        if split is not None:
            order = split_positions(split, ids, self.root)
        self.ids = [ids[n] for n in order]
        self._files = [files[n] for n in order]
        self._labels = [vectors[n] for n in order]

        if masks is True:
            raise DatasetLayoutError(f"{self.root} is a folder dataset: it has masks only when given a mask folder")
        self.mask_dir = Path(masks) if masks not in (None, False) else None
        if self.mask_dir is not None:
            if not self.mask_dir.is_dir():
                raise MissingFileError(f"mask folder not found: {self.mask_dir}")
            missing = [i for i in self.ids if not (self.mask_dir / f"{i}.png").is_file()]
            if missing:
                raise MissingFileError(
                    f"{len(missing)} of {len(self.ids)} masks missing in {self.mask_dir}, e.g. '{missing[0]}.png'"
                )
        self.with_masks = self.mask_dir is not None

    def _numbers_to_names(self, files, names, classes) -> list[list[str]]:
        """Class numbers (1..K, or a K-long 0/1 vector) in the labels file as names of `classes`."""
        if classes is None:
            raise DatasetLayoutError(
                f"{self.labels_file} gives class numbers: put a classes.txt (one name per line; number 1 is the "
                f"first line) in {self.root}, pass the class list, or write class names instead")
        out = []
        for p, ns in zip(files, names):
            where = f"{self.labels_file}: image '{p.relative_to(self.root).as_posix()}'"
            y = parse_label_value(list(ns), classes, where)
            out.append([classes[int(k)] for k in torch.nonzero(y > 0.5).flatten()])
        return out

    def _resolve_image(self, name: str) -> Path:
        p = self.root / name
        if p.exists():  # a folder named like an image is reported when read, per image, not here
            return p
        for ext in IMAGE_EXTS:
            q = self.root / f"{name}{ext}"
            if q.is_file():
                return q
        raise MissingFileError(f"{self.labels_file}: image '{name}' not found in {self.root}")

    def load_image(self, i: int) -> np.ndarray:
        return read_image(self._files[i])

    def load_mask(self, i: int) -> np.ndarray:
        return read_mask(self.mask_dir / f"{self.ids[i]}.png")

    def label_vector(self, i: int, mask: np.ndarray | None = None) -> torch.Tensor:
        return self._labels[i].clone()
