"""Image-level label files: cls_labels.npy / .json, labels.json, VOC XML, and JSON/CSV name lists.

`cls_labels.npy` (as shipped by the IRN and CLIMS repositories) is a pickled dict; it is read
with a restricted unpickler that only rebuilds numpy arrays, so a tampered file cannot run
code. Prefer `cls_labels.json` ({id: [0/1 x K]}) for new data.
"""

from __future__ import annotations

import csv
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from wsclip.data.base import multi_hot
from wsclip.errors import BadFileError, UnknownClassError
from wsclip.io import read_json
from wsclip.vocab import class_index


# ----------------------------------------------------------------------------- safe .npy
def _numpy_global(module: str, name: str):
    import importlib

    for mod in (module, module.replace("numpy.core", "numpy._core"), module.replace("numpy._core", "numpy.core")):
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"{module}.{name} not found")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            if module == "_codecs":
                import codecs

                return codecs.encode
            return _numpy_global(module, name)
        if module.startswith("numpy.dtypes") and name.endswith("DType"):
            return _numpy_global(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_npy_safely(path: Path):
    """np.load for .npy files that may hold pickled objects, allowing only numpy arrays and builtins."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"unsupported .npy version {version}")
            shape, fortran, dtype = read_header(f)
            if not dtype.hasobject:
                f.seek(0)
                return np.load(f, allow_pickle=False)
            arr = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, ValueError, EOFError, OSError, TypeError, AttributeError) as exc:
        raise BadFileError(
            f"{path} is not a plain numpy label file ({exc}); convert it to cls_labels.json "
            "({id: [0/1 per class]})"
        ) from None
    return arr


# ----------------------------------------------------------------------------- VOC-style tables
def _irn_id(key) -> str:
    """IRN stores ids as ints: 2007000032 -> '2007_000032'; strings pass through."""
    if isinstance(key, (int, np.integer)):
        s = str(int(key))
        return f"{s[:4]}_{s[4:]}" if len(s) == 10 else s
    if isinstance(key, bytes):
        return key.decode()
    return str(key)


def parse_label_value(value, classes: Sequence[str], where: str) -> torch.Tensor:
    """One image's labels as a multi-hot (K,) vector.

    Accepted: a K-long 0/1 vector, a list of class indices 1..K (0 = background is skipped), a
    list of class names, or a ';'-separated string of names.
    """
    k = len(classes)
    if isinstance(value, str):
        value = [v.strip() for v in value.split(";") if v.strip()]
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise BadFileError(f"{where}: expected a list of labels, got {type(value).__name__}")
    if all(isinstance(v, str) for v in value):
        idx = []
        for name in value:
            try:
                idx.append(class_index(name, classes))
            except UnknownClassError as exc:
                raise UnknownClassError(f"{where}: {exc}") from None
        return multi_hot(idx, k)
    if not all(isinstance(v, (int, float, bool)) and not isinstance(v, str) for v in value):
        raise BadFileError(f"{where}: labels must be class names or numbers, got {value!r}")
    if len(value) == k and all(v in (0, 1) for v in value):
        return torch.tensor([float(v) for v in value], dtype=torch.float32)
    bad = [v for v in value if v != int(v) or not 0 <= int(v) <= k]
    if bad:
        raise BadFileError(
            f"{where}: label {bad[0]!r} is not a class index 1..{k} (nor is the list a {k}-long 0/1 vector)"
        )
    return multi_hot((int(v) - 1 for v in value if int(v) != 0), k)


def load_label_table(path: Path, classes: Sequence[str]) -> dict[str, torch.Tensor]:
    """{id: multi-hot} from cls_labels.npy / .json or labels.json (see parse_label_value)."""
    path = Path(path)
    if path.suffix == ".npy":
        obj = load_npy_safely(path)
        if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
            obj = obj.item()
    else:
        obj = read_json(path)
    if not isinstance(obj, dict):
        raise BadFileError(f"{path} must map image ids to labels, got {type(obj).__name__}")
    return {_irn_id(k): parse_label_value(v, classes, f"{path}: '{_irn_id(k)}'") for k, v in obj.items()}


def labels_from_xml(path: Path, classes: Sequence[str]) -> torch.Tensor:
    """Multi-hot labels of the <object><name> entries of a VOC annotation XML (difficult ones included)."""
    import xml.etree.ElementTree as ET

    try:
        tree = ET.parse(path)
    except (ET.ParseError, OSError) as exc:
        raise BadFileError(f"cannot parse annotation {path}: {exc}") from None
    idx = []
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        try:
            idx.append(class_index(name, classes))
        except UnknownClassError as exc:
            raise UnknownClassError(f"{path}: {exc}") from None
    return multi_hot(sorted(set(idx)), len(classes))


# ----------------------------------------------------------------------------- name lists (folder)
def _split_names(field: str, known: set[str] | None) -> list[str]:
    field = field.strip()
    if not field:
        return []
    if ";" in field:
        return [n.strip() for n in field.split(";") if n.strip()]
    if known is not None and field in known:
        return [field]
    return field.split()


def _numbers(names: list[str], known: set[str] | None) -> list:
    """Tokens that are digits (and not a class name) become class numbers (1-based ints)."""
    return [int(n) if n.isdigit() and (known is None or n not in known) else n for n in names]


def read_name_labels(path: Path, classes: Sequence[str] | None = None) -> dict[str, list]:
    """{image path: [class names or 1-based class numbers]} from JSON ({"a.jpg": ["cat", "dog"]} or
    {"a.jpg": [8, 12]}, or a list of {"image": ..., "labels": [...]}) or CSV (image, labels separated
    by ';' or spaces). Numbers are resolved against a class list by the caller."""
    path = Path(path)
    known = set(classes) if classes is not None else None
    out: dict[str, list[str]] = {}
    if path.suffix.lower() == ".json":
        obj = read_json(path)
        if isinstance(obj, list):
            try:
                obj = {str(e["image"]): e["labels"] for e in obj}
            except (TypeError, KeyError):
                raise BadFileError(
                    f"{path}: a list must hold {{'image': ..., 'labels': [...]}} entries"
                ) from None
        if not isinstance(obj, dict):
            raise BadFileError(f"{path} must map image files to lists of class names")
        for img, names in obj.items():
            if isinstance(names, str):
                names = _numbers(_split_names(names, known), known)
            if not isinstance(names, list) or not all(isinstance(n, (str, int)) and not isinstance(n, bool)
                                                      for n in names):
                raise BadFileError(f"{path}: image '{img}' must have a list of class names or class numbers 1..K, "
                                   f"got {names!r}")
            out[str(img)] = [n.strip() if isinstance(n, str) else n for n in names if not isinstance(n, str) or n.strip()]
        return out
    if path.suffix.lower() in (".csv", ".tsv", ".txt"):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise BadFileError(f"{path} is not a text file: {exc}") from None
        delim = "\t" if path.suffix.lower() == ".tsv" else ","
        rows = [r for r in csv.reader(text.splitlines(), delimiter=delim) if r and any(c.strip() for c in r)]
        if rows and rows[0][0].strip().lower() in ("image", "file", "filename", "path", "id"):
            rows = rows[1:]
        for n, row in enumerate(rows, 1):
            img = row[0].strip()
            names = _numbers([name for field in row[1:] for name in _split_names(field, known)], known)
            if img in out:
                raise BadFileError(f"{path}: image '{img}' is listed twice (row {n})")
            out[img] = names
        return out
    raise BadFileError(f"labels file {path} must be .json or .csv")
