"""COCO 2014 (or 2017) instances: image-level labels from the annotations, semantic masks
from a folder of pre-rendered PNGs when there is one, else rendered from polygons / RLE.

    coco/annotations/instances_{train,val}2014.json
    coco/{train,val}2014/*.jpg          (or coco/images/{train,val}2014/)
    coco/SegmentationClass/{split}2014/<stem>.png  (or mask/, masks/; optional)

Category ids (1..90 with gaps) map to labels 1..80 in the standard order; a JSON with a
subset of the standard categories keeps the 80-class indexing, any other category set uses
its own names sorted by id.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from wsclip.data.base import LabeledImageDataset, multi_hot
from wsclip.data.coco_masks import render_semantic_mask
from wsclip.data.splits import split_positions
from wsclip.errors import BadFileError, DatasetLayoutError, MissingFileError
from wsclip.io import read_image, read_mask
from wsclip.vocab import COCO_CLASSES

MASK_DIRS = ("SegmentationClass", "mask", "masks")


def find_annotation_file(root: Path, split: str) -> Path:
    """annotations/instances_<split>2014.json (2017, or <split> as written, also accepted)."""
    names = [f"instances_{split}.json"] if split[-4:].isdigit() else [
        f"instances_{split}2014.json", f"instances_{split}2017.json", f"instances_{split}.json"]
    looked = [root / "annotations" / n for n in names] + [root / n for n in names]
    for p in looked:
        if p.is_file():
            return p
    raise MissingFileError(
        f"COCO annotations for split '{split}' not found: looked for {', '.join(str(p) for p in looked)}"
    )


def is_coco_root(path: Path) -> bool:
    return any(Path(path).glob("annotations/instances_*.json"))


class COCODataset(LabeledImageDataset):
    """COCO instances as a wsclip dataset (ids are image file stems, e.g. COCO_val2014_000000000042).

    `masks`: None/True render or read masks, False skips them. `subset`: a list file restricting
    (and ordering) the ids. `skip_empty`: drop images without annotations.
    """

    def __init__(
        self,
        root,
        split: str = "train",
        transform: Callable[[dict], dict] | None = None,
        masks: bool | None = None,
        annotations=None,
        image_dir=None,
        mask_dir=None,
        subset=None,
        skip_empty: bool = False,
    ):
        super().__init__(transform)
        self.root = Path(root)
        if not self.root.is_dir():
            raise MissingFileError(f"COCO dataset folder not found: {self.root}")
        self.split = str(split)
        self.annotation_file = Path(annotations) if annotations else find_annotation_file(self.root, self.split)
        if not self.annotation_file.is_file():
            raise MissingFileError(f"COCO annotation file not found: {self.annotation_file}")
        name = self.annotation_file.stem.removeprefix("instances_")  # e.g. val2014
        data = self._read_json(self.annotation_file)

        cats = sorted(data["categories"], key=lambda c: c["id"])
        names = [str(c["name"]) for c in cats]
        if all(n in COCO_CLASSES for n in names):
            self.classes = COCO_CLASSES
            cat_to_label = {c["id"]: COCO_CLASSES.index(c["name"]) + 1 for c in cats}
        else:
            self.classes = tuple(names)
            cat_to_label = {c["id"]: k + 1 for k, c in enumerate(cats)}

        per_image: dict[int, list[dict]] = defaultdict(list)
        for a in data["annotations"]:
            try:
                label = cat_to_label[a["category_id"]]
            except KeyError:
                raise BadFileError(
                    f"{self.annotation_file}: annotation {a.get('id')} has category_id "
                    f"{a.get('category_id')} which is not in 'categories'"
                ) from None
            per_image[a["image_id"]].append(
                {"label": label, "segmentation": a.get("segmentation"), "iscrowd": a.get("iscrowd", 0),
                 "area": a.get("area", 0)}
            )
        images = sorted(data["images"], key=lambda im: im["file_name"])
        if skip_empty:
            images = [im for im in images if per_image.get(im["id"])]
        if subset is not None:
            images = [images[n] for n in split_positions(subset, [Path(im["file_name"]).stem for im in images],
                                                         self.annotation_file)]
        self.ids = [Path(im["file_name"]).stem for im in images]
        self._meta = images
        self._anns = [per_image.get(im["id"], []) for im in images]

        cands = [Path(image_dir)] if image_dir else [self.root / name, self.root / "images" / name,
                                                     self.root / self.split, self.root / "images"]
        self.image_dir = next((c for c in cands if c.is_dir()), None)
        if self.image_dir is None:
            raise DatasetLayoutError(
                f"COCO image folder not found: looked for {', '.join(str(c) for c in cands)}"
            )
        mcands = [Path(mask_dir)] if mask_dir else [
            self.root / d / name for d in MASK_DIRS] + [self.root / d for d in MASK_DIRS]
        if mask_dir and not Path(mask_dir).is_dir():
            raise MissingFileError(f"mask folder not found: {mask_dir}")
        self.mask_dir = next((c for c in mcands if c.is_dir() and any(c.glob("*.png"))), None)
        self.with_masks = masks is not False

    @staticmethod
    def _read_json(path: Path) -> dict:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadFileError(f"{path} is not valid JSON: {exc}") from None
        missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data]
        if missing:
            raise BadFileError(f"{path} is not a COCO instances file: missing {missing}")
        return data

    def load_image(self, i: int) -> np.ndarray:
        path = self.image_dir / self._meta[i]["file_name"]
        if not path.is_file():
            path = self.image_dir / Path(self._meta[i]["file_name"]).name
        return read_image(path)

    def _mask_file(self, i: int) -> Path | None:
        if self.mask_dir is None:
            return None
        image_id = self._meta[i]["id"]
        for n in (self.ids[i], f"{image_id:012d}", str(image_id)):
            p = self.mask_dir / f"{n}.png"
            if p.is_file():
                return p
        return None

    def load_mask(self, i: int) -> np.ndarray:
        """The pre-rendered PNG if there is one, else the mask rendered from the annotations."""
        path = self._mask_file(i)
        if path is not None:
            return read_mask(path)
        meta = self._meta[i]
        try:
            return render_semantic_mask(self._anns[i], int(meta["height"]), int(meta["width"]))
        except BadFileError as exc:
            raise BadFileError(f"{self.annotation_file}: image {self.ids[i]}: {exc}") from None

    def label_vector(self, i: int, mask: np.ndarray | None = None) -> torch.Tensor:
        return multi_hot(sorted({a["label"] - 1 for a in self._anns[i]}), len(self.classes))

