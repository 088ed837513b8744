"""What `wsclip label` reads: a folder, glob, list file of paths or a dataset spec as an `ImageSource`
(ids, how to load each image, image-level labels where known), and labels files (JSON or CSV)."""

from __future__ import annotations

import glob as globlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from wsclip.errors import DatasetLayoutError, MissingFileError, WsclipError
from wsclip.io import read_json

_GLOB_CHARS = "*?["

@dataclass
class ImageSource:
    """The images to label: ids, how to load each, and image-level labels where known.

    Built by `open_source`; picklable (DataLoader workers and Ray actors load from it).
    """

    ids: list[str]
    paths: list[Path] | None = None
    dataset: object | None = None
    labels: dict[str, np.ndarray] | None = None   # explicit labels (a file), by id
    dataset_labels: bool = False                  # use the dataset's own image-level labels
    classes: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None or self.dataset_labels

    def load(self, i: int) -> np.ndarray:
        """RGB uint8 (H, W, 3) of image i (a WsclipError for a missing or corrupt file)."""
        from wsclip.io import read_image

        if self.paths is not None:
            return read_image(self.paths[i])
        return np.ascontiguousarray(np.asarray(self.dataset.load_image(i), dtype=np.uint8))

    def index_of(self, image_id: str) -> int | None:
        """Position of an id in the inputs (None when absent)."""
        if getattr(self, "_index", None) is None:
            self._index = {i: n for n, i in enumerate(self.ids)}
        return self._index.get(image_id)

    def file_of(self, image_id: str) -> str | None:
        """The absolute path of an image's file (None for images without one): what manifests record."""
        n = self.index_of(image_id)
        p = self.path(n) if n is not None else None
        return str(Path(p).resolve()) if p is not None else None

    def path(self, i: int) -> Path | None:
        if self.paths is not None:
            return self.paths[i]
        files = getattr(self.dataset, "_images", None) or getattr(self.dataset, "_files", None)
        return Path(files[i]) if files is not None else None

    def label(self, i: int) -> np.ndarray | None:
        """(K,) 0/1 labels of image i, or None when unknown."""
        if self.labels is not None:
            return self.labels.get(self.ids[i])
        if self.dataset_labels:
            return np.asarray(self.dataset.label_vector(i), dtype=np.float32)
        return None


def _is_glob(spec: str) -> bool:
    return any(c in spec for c in _GLOB_CHARS)


def _ids_for(paths: Sequence[Path], base: Path | None) -> list[str]:
    """Ids: paths relative to `base` (else the common parent) without extension; clashes are errors."""
    if base is None:
        base = Path(os.path.commonpath([str(p.parent.resolve()) for p in paths])) if paths else Path(".")
    ids = []
    for p in paths:
        try:
            rel = p.resolve().relative_to(base.resolve())
        except ValueError:
            rel = Path(p.name)
        ids.append(rel.with_suffix("").as_posix())
    seen: dict[str, Path] = {}
    for i, p in zip(ids, paths):
        if i in seen:
            raise DatasetLayoutError(f"two inputs map to the same output id '{i}': {seen[i]} and {p}; rename one")
        seen[i] = p
    return ids


def _glob_base(pattern: str) -> Path:
    parts = Path(pattern).parts
    fixed = [p for p in parts[: next((n for n, p in enumerate(parts) if _is_glob(p)), len(parts))]]
    return Path(*fixed) if fixed else Path(".")


def _list_file(path: Path) -> list[Path]:
    from wsclip.data.splits import IMAGE_EXTS

    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        p = Path(line.split()[0]).expanduser()
        p = p if p.is_absolute() else path.parent / p
        if p.suffix.lower() not in IMAGE_EXTS:
            raise DatasetLayoutError(f"{path}: '{line}' is not an image file ({', '.join(IMAGE_EXTS)}); "
                                     "a list file names one image path per line")
        out.append(p)
    if not out:
        raise DatasetLayoutError(f"list file {path} names no images")
    return out


def read_labels_file(path, classes: Sequence[str], ids: Sequence[str]) -> dict[str, np.ndarray]:
    """{id: (K,) 0/1} from JSON ({image or id: [names or indices 1..K or a K-long 0/1 vector]}) or CSV (image,names)."""
    from wsclip.data.labelfiles import parse_label_value, read_name_labels

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"labels file not found: {path}")
    if path.suffix.lower() == ".json":
        table = read_json(path)
        if isinstance(table, list):
            table = read_name_labels(path, classes)
    else:
        table = read_name_labels(path, classes)
    if not isinstance(table, dict):
        raise WsclipError(f"{path} must map images (or ids) to their labels")
    known = set(ids)
    out = {}
    for key, value in table.items():
        k = str(key)
        cand = [k, Path(k).with_suffix("").as_posix(), Path(k).name, Path(k).stem]
        image_id = next((c for c in cand if c in known), None)
        if image_id is not None:
            out[image_id] = parse_label_value(value, classes, f"{path}: '{k}'").numpy().astype(np.float32)
    if not out:
        raise WsclipError(f"no entry of {path} matches an input image (ids look like '{next(iter(ids), '')}')")
    return out


def open_source(spec, split: str | None = None, labels=None, classes: Sequence[str] | None = None,
                limit: int | None = None) -> ImageSource:
    """An ImageSource from a folder, a glob ('photos/**/*.jpg'), a list file (.txt of paths), one image,
    or a dataset ('voc:PATH', 'coco:PATH', 'folder:PATH', 'synth:', or a VOC/COCO folder) with `split`.

    `labels`: a labels file (JSON or CSV) overriding any dataset labels; `classes` the labeler's classes.
    """
    from wsclip.data.splits import IMAGE_EXTS

    spec = str(spec)
    scheme = spec.partition(":")[0].lower() if ":" in spec and not Path(spec).exists() else None
    src: ImageSource
    if scheme in ("voc", "coco", "folder", "synth") or (Path(spec).is_dir() and not _is_glob(spec)):
        from wsclip.data.factory import detect_layout

        layout = scheme or detect_layout(spec)
        from wsclip.data import open_dataset

        kw = {"masks": False} if layout in ("voc", "coco") else {}
        if layout == "folder" and classes is not None:
            kw["classes"] = tuple(classes)  # the labels file's names map onto the model's classes by name
        ds = open_dataset(spec, split=split, **kw)
        own = layout in ("voc", "coco", "synth") or getattr(ds, "labels_file", None) is not None
        src = ImageSource(ids=list(ds.ids), dataset=ds, dataset_labels=own, classes=tuple(ds.classes))
    else:
        if split is not None:
            raise WsclipError("--split applies to datasets (voc:, coco:, folder:); for files use a list file as the input")
        if _is_glob(spec):
            paths = sorted(Path(p) for p in globlib.glob(spec, recursive=True)
                           if Path(p).suffix.lower() in IMAGE_EXTS and Path(p).is_file())
            if not paths:
                raise MissingFileError(f"no image files match '{spec}'")
            base = _glob_base(spec)
        else:
            p = Path(spec)
            if not p.exists():
                raise MissingFileError(f"input not found: {spec} (give a folder, a glob, a list file or voc:/coco:PATH)")
            if p.suffix.lower() in IMAGE_EXTS:
                paths, base = [p], p.parent
            else:
                paths, base = _list_file(p), None
        src = ImageSource(ids=_ids_for(paths, base), paths=paths)
    if limit is not None:
        src = _head(src, int(limit))
    return attach_labels(src, labels, classes) if (labels is not None or classes is not None) else src


def attach_labels(src: ImageSource, labels=None, classes: Sequence[str] | None = None) -> ImageSource:
    """Check a source against the model's classes and read a labels file (which overrides dataset labels)."""
    if classes is not None and src.dataset_labels and src.classes and tuple(src.classes) != tuple(classes):
        src.labels, src.dataset_labels = _labels_by_name(src, tuple(classes)), False
    if labels is not None:
        if classes is None:
            raise WsclipError("a labels file needs the model's class list")
        src.labels = read_labels_file(labels, classes, src.ids)
        src.dataset_labels = False
    return src


def _labels_by_name(src: ImageSource, classes: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The dataset's image-level labels mapped onto the model's classes by name ({id: (K,) 0/1}); a label
    whose name the model does not know is an UnknownClassError naming the image."""
    from wsclip.errors import UnknownClassError

    pos = {c: k for k, c in enumerate(classes)}
    out = {}
    for i, image_id in enumerate(src.ids):
        y = np.zeros(len(classes), np.float32)
        for k in np.flatnonzero(np.asarray(src.dataset.label_vector(i)) > 0.5):
            name = src.classes[int(k)]
            if name not in pos:
                raise UnknownClassError(f"image '{image_id}' is labelled '{name}', a class the model does not know; "
                                        f"the model's classes: {', '.join(classes)}")
            y[pos[name]] = 1.0
        out[image_id] = y
    return out


def _head(src: ImageSource, n: int) -> ImageSource:
    if n >= len(src.ids):
        return src
    if src.paths is not None:
        return ImageSource(ids=src.ids[:n], paths=src.paths[:n], labels=src.labels, classes=src.classes)
    from torch.utils.data import Subset

    class _Head(Subset):
        def load_image(self, i):
            return self.dataset.load_image(self.indices[i])

        def label_vector(self, i, mask=None):
            return self.dataset.label_vector(self.indices[i])

        @property
        def _images(self):  # the files of the kept images, as ImageSource.path reads them
            files = getattr(self.dataset, "_images", None) or getattr(self.dataset, "_files", None)
            return [files[j] for j in self.indices] if files is not None else None

    return ImageSource(ids=src.ids[:n], dataset=_Head(src.dataset, range(n)), dataset_labels=src.dataset_labels,
                       labels=src.labels, classes=src.classes)
