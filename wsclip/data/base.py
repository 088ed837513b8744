"""The common dataset interface: items are dicts {"id", "image", "labels", "mask"?}."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from wsclip.errors import BadFileError, ShapeError


def multi_hot(indices: Iterable[int], num_classes: int) -> torch.Tensor:
    """float32 (K,) vector with ones at the given 0-based class indices."""
    out = torch.zeros(num_classes, dtype=torch.float32)
    idx = list(indices)
    if idx:
        out[torch.as_tensor(idx, dtype=torch.long)] = 1.0
    return out


def labels_from_mask(mask: np.ndarray, num_classes: int, where: str = "mask") -> torch.Tensor:
    """Multi-hot labels of the classes present in a mask (0 = background and 255 = ignore skipped)."""
    present = np.unique(mask)
    present = present[(present != 0) & (present != 255)]
    if present.size and present.max() > num_classes:
        raise BadFileError(
            f"{where} has label {int(present.max())} but the dataset has only {num_classes} classes "
            "(0 = background, 1..K, 255 = ignore); check the class list"
        )
    return multi_hot((int(v) - 1 for v in present), num_classes)


class LabeledImageDataset(Dataset):
    """Base of every wsclip dataset.

    Attributes: `classes` (foreground names; class k is mask label k + 1), `ids`, `root`,
    `transform` (callable taking and returning the whole sample dict), `with_masks`.
    Subclasses implement `load_image(i)`, `load_mask(i)` and `label_vector(i, mask=None)`.
    """

    classes: tuple[str, ...] = ()
    ids: list[str]
    root: Path
    with_masks: bool = False

    def __init__(self, transform: Callable[[dict], dict] | None = None):
        self.transform = transform

    @property
    def num_classes(self) -> int:
        """Number of foreground classes K."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, i: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_mask(self, i: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def label_vector(self, i: int, mask: np.ndarray | None = None) -> torch.Tensor:  # pragma: no cover
        """Multi-hot float32 (K,) labels of item i (without decoding the image)."""
        raise NotImplementedError

    def index(self, image_id: str) -> int:
        """Position of an id in `ids`."""
        if not hasattr(self, "_index"):
            self._index = {k: n for n, k in enumerate(self.ids)}
        return self._index[image_id]

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        i = int(i) % len(self)
        image = self.load_image(i)
        sample = {"id": self.ids[i], "image": image}
        mask = None
        if self.with_masks:
            mask = self.load_mask(i)
            if mask.shape[:2] != image.shape[:2]:
                raise ShapeError(
                    f"{self.ids[i]}: mask is {mask.shape[1]}x{mask.shape[0]} but image is "
                    f"{image.shape[1]}x{image.shape[0]}; masks must match their images"
                )
        sample["labels"] = self.label_vector(i, mask)
        if mask is not None:
            sample["mask"] = mask
        return self.transform(sample) if self.transform is not None else sample

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, items={len(self)}, "
                f"classes={len(self.classes)}, masks={self.with_masks})")


def read_class_list(path: Path) -> tuple[str, ...]:
    """Class names from a text file, one a line; a leading 'background' line is skipped."""
    names = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if names and names[0].lower() in ("background", "__background__", "_background_"):
        names = names[1:]
    if not names:
        raise BadFileError(f"class list {path} is empty: write one class name per line")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise BadFileError(f"class list {path} repeats {dup}")
    return tuple(names)


def resolve_classes(classes: Sequence[str] | str | Path | None) -> tuple[str, ...] | None:
    """A class list given as names, a dataset name ('voc', 'coco') or a text file; None stays None."""
    if classes is None:
        return None
    if isinstance(classes, (str, Path)):
        from wsclip.vocab import DATASET_CLASSES

        if str(classes) in DATASET_CLASSES:
            return DATASET_CLASSES[str(classes)]
        from wsclip.errors import MissingFileError

        if not Path(classes).is_file():
            raise MissingFileError(
                f"class list not found: {classes} (give 'voc', 'coco', a list of names or a text file)"
            )
        return read_class_list(Path(classes))
    return tuple(str(c) for c in classes)
