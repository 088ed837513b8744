"""Any folder of images + a JSON or CSV labels file."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from wsclip.data import FolderDataset, detect_layout, open_dataset
from wsclip.errors import BadFileError, DatasetLayoutError, MissingFileError, UnknownClassError
from wsclip.io import write_mask


def make_folder(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, hw in (("a.jpg", (5, 7)), ("sub/b.png", (6, 4)), ("c.jpeg", (3, 3))):
        Image.fromarray(rng.integers(0, 255, hw + (3,), dtype=np.uint8)).save(root / name)
    return root


def vec(ds, i):
    return [ds.classes[k] for k in torch.nonzero(ds[i]["labels"])[:, 0].tolist()]


def test_folder_json_labels_and_sorted_classes(tmp_path):
    root = make_folder(tmp_path)
    (root / "labels.json").write_text(json.dumps({"a.jpg": ["dog", "cat"], "sub/b.png": ["potted plant"], "c": []}))
    for ds in (open_dataset(str(root)), open_dataset(f"folder:{root}"), FolderDataset(root)):
        assert isinstance(ds, FolderDataset)
        assert ds.classes == ("cat", "dog", "potted plant")
        assert ds.ids == ["a", "sub/b", "c"]
        assert vec(ds, 0) == ["cat", "dog"] and vec(ds, 1) == ["potted plant"] and vec(ds, 2) == []
        assert ds[1]["image"].shape == (6, 4, 3) and ds[1]["image"].dtype == np.uint8
    assert detect_layout(root) == "folder"


def test_folder_csv_with_given_classes_and_masks(tmp_path):
    root = make_folder(tmp_path)
    (root / "labels.csv").write_text(
        "image,labels\na.jpg,cat;potted plant\nsub/b.png,dog cat\nc.jpeg,potted plant\n")
    masks = tmp_path / "masks"
    write_mask(masks / "a.png", np.ones((5, 7), np.uint8))
    write_mask(masks / "sub" / "b.png", np.full((6, 4), 2, np.uint8))
    write_mask(masks / "c.png", np.zeros((3, 3), np.uint8))
    ds = FolderDataset(root, classes=["dog", "cat", "potted plant", "bird"], masks=masks)
    assert ds.classes == ("dog", "cat", "potted plant", "bird")
    assert vec(ds, 0) == ["cat", "potted plant"]
    assert vec(ds, 1) == ["dog", "cat"]
    assert vec(ds, 2) == ["potted plant"]  # a known multi-word name is not split on spaces
    assert ds[1]["mask"].shape == (6, 4) and (ds[1]["mask"] == 2).all()
    (tmp_path / "sel.txt").write_text("c\na\n")
    sub = FolderDataset(root, classes=["dog", "cat", "potted plant"], split=tmp_path / "sel.txt")
    assert sub.ids == ["c", "a"] and vec(sub, 1) == ["cat", "potted plant"]
    with pytest.raises(UnknownClassError, match=r"labels.csv: image 'a.jpg'.*Did you mean 'pottedplant'"):
        FolderDataset(root, classes="voc")


def test_folder_without_labels_file(tmp_path):
    root = make_folder(tmp_path)
    ds = open_dataset(root, classes=["x", "y"])
    assert ds.ids == ["a", "c", "sub/b"]
    assert ds[0]["labels"].tolist() == [0.0, 0.0]


def test_folder_errors(tmp_path):
    root = make_folder(tmp_path)
    (root / "labels.json").write_text(json.dumps({"a.jpg": ["dog", "kitten"]}))
    with pytest.raises(UnknownClassError, match=r"labels.json: image 'a.jpg': unknown class name 'kitten'"):
        FolderDataset(root, classes=["dog", "cat"])
    (root / "labels.json").write_text(json.dumps({"missing.jpg": ["dog"]}))
    with pytest.raises(MissingFileError, match=r"labels.json: image 'missing.jpg' not found"):
        FolderDataset(root)
    (root / "labels.json").write_text("{oops")
    with pytest.raises(BadFileError, match="labels.json is not valid JSON"):
        open_dataset(f"folder:{root}")
    (root / "labels.json").write_text(json.dumps({"a.jpg": 3}))
    with pytest.raises(BadFileError, match="'a.jpg' must have a list of class names"):
        FolderDataset(root)
    (root / "labels.json").unlink()
    with pytest.raises(MissingFileError, match="labels file not found"):
        FolderDataset(root, labels=root / "nope.csv")
    with pytest.raises(MissingFileError, match="class list not found"):
        FolderDataset(root, classes=str(root / "classes_missing.txt"))
    (root / "x.png").write_bytes(b"not a png")
    ds = FolderDataset(root)
    with pytest.raises(BadFileError, match=r"x.png"):
        ds[ds.ids.index("x")]
    (root / "a.png").write_bytes(b"")
    with pytest.raises(DatasetLayoutError, match="share the id 'a'"):
        FolderDataset(root)
    with pytest.raises(MissingFileError):
        FolderDataset(tmp_path / "none")
