"""VOC layouts: the 14 real images through every route, a synthetic VOCdevkit, and bad inputs."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsclip.data import VOCDataset, detect_layout, open_dataset
from wsclip.data.labelfiles import load_npy_safely
from wsclip.errors import BadFileError, DatasetLayoutError, MissingFileError, UnknownClassError
from wsclip.io import write_mask
from wsclip.vocab import VOC_CLASSES


def _expected_labels(voc14: Path) -> dict:
    table = json.loads((voc14 / "labels.json").read_text())
    return {k: sorted(v) for k, v in table.items()}


@pytest.mark.parametrize("route", ["auto", "auto-default-split", "scheme", "class"])
def test_voc14_opens_by_every_route(voc14, route):
    ds = {
        "auto": lambda: open_dataset(str(voc14), split="val"),
        "auto-default-split": lambda: open_dataset(voc14),  # val is the only split there
        "scheme": lambda: open_dataset(f"voc:{voc14}", split="val"),
        "class": lambda: VOCDataset(voc14, split="val"),
    }[route]()
    assert isinstance(ds, VOCDataset)
    assert ds.classes == VOC_CLASSES
    assert ds.ids == (voc14 / "val.txt").read_text().split()
    assert ds.with_masks and len(ds) == 14
    assert ds.root == voc14


def test_voc14_items_match_labels_and_masks(voc14):
    ds = open_dataset(f"voc:{voc14}", split="val")
    expected = _expected_labels(voc14)
    for i in range(len(ds)):
        s = ds[i]
        assert set(s) == {"id", "image", "labels", "mask"}
        assert s["image"].dtype == np.uint8 and s["image"].shape == (513, 513, 3)
        assert s["mask"].dtype == np.uint8 and s["mask"].shape == (513, 513)
        assert s["labels"].dtype == torch.float32 and s["labels"].shape == (20,)
        got = (torch.nonzero(s["labels"])[:, 0] + 1).tolist()
        assert got == expected[s["id"]]
        in_mask = sorted(set(np.unique(s["mask"]).tolist()) - {0, 255})
        assert got == in_mask
    assert detect_layout(voc14) == "voc"
    with pytest.raises(IndexError):
        ds[14]


def test_voc14_labels_from_masks_agree_with_labels_json(voc14, tmp_path):
    # a copy without labels.json: labels must then come from the masks
    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    ids = (voc14 / "val.txt").read_text().split()[:4]
    for i in ids:
        os.symlink(voc14 / "JPEGImages" / f"{i}.jpg", root / "JPEGImages" / f"{i}.jpg")
        os.symlink(voc14 / "SegmentationClass" / f"{i}.png", root / "SegmentationClass" / f"{i}.png")
    (root / "val.txt").write_text("\n".join(ids) + "\n")
    ds = VOCDataset(root, split="val", masks=False)
    assert not ds.with_masks
    expected = _expected_labels(voc14)
    for i in range(len(ds)):
        assert ds.label_source(i).endswith(".png")
        s = ds[i]
        assert "mask" not in s
        assert (torch.nonzero(s["labels"])[:, 0] + 1).tolist() == expected[s["id"]]


# ----------------------------------------------------------------------------- synthetic VOCdevkit
XML = """<annotation><filename>{id}.jpg</filename>{objects}</annotation>"""
OBJ = "<object><name>{}</name><difficult>0</difficult><part><name>head</name></part></object>"


def make_vocdevkit(tmp_path: Path) -> Path:
    """VOCdevkit/VOC2012 with 4 tiny images, masks (Aug for some), XMLs, split lists, cls_labels.npy."""
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "Annotations",
              "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    specs = {  # id -> classes present (1-based)
        "2007_000001": [1], "2007_000002": [15, 12], "2008_000003": [20], "2009_000004": [7, 8],
    }
    for n, (i, labels) in enumerate(specs.items()):
        h, w = 9 + n, 13 - n
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        if n == 3:
            Image.fromarray(img).save(voc / "JPEGImages" / f"{i}.png")  # png images are accepted
        else:
            Image.fromarray(img).save(voc / "JPEGImages" / f"{i}.jpg", quality=95)
        mask = np.zeros((h, w), np.uint8)
        for k, c in enumerate(labels):
            mask[k * 3:k * 3 + 3, 2:6] = c
        mask[-1, :] = 255
        write_mask(voc / "SegmentationClass" / f"{i}.png", mask)
        if n % 2 == 0:  # Aug masks for some ids, with a visible difference (an extra ignore column)
            aug = mask.copy()
            aug[:, 0] = 255
            write_mask(voc / "SegmentationClassAug" / f"{i}.png", aug)
        objects = "".join(OBJ.format(VOC_CLASSES[c - 1]) for c in labels)
        (voc / "Annotations" / f"{i}.xml").write_text(XML.format(id=i, objects=objects))
    ids = list(specs)
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids[:3]) + "\n")
    # DeepLab-style pair lines are accepted too
    (voc / "ImageSets/Segmentation/val.txt").write_text(
        f"/JPEGImages/{ids[3]}.jpg /SegmentationClassAug/{ids[3]}.png\n")
    return voc, specs


def test_synthetic_vocdevkit_with_irn_cls_labels(tmp_path):
    voc, specs = make_vocdevkit(tmp_path)
    # IRN's cls_labels.npy: {int id: 20-dim float vector}, covering only two ids here
    table = {}
    for i in list(specs)[:2]:
        vec = np.zeros(20, np.float32)
        vec[[c - 1 for c in specs[i]]] = 1
        table[int(i.replace("_", ""))] = vec
    np.save(voc / "cls_labels.npy", table)

    ds = open_dataset(tmp_path)  # auto-detects VOCdevkit/VOC2012, default split "train"
    assert isinstance(ds, VOCDataset) and ds.root == voc and ds.split == "train"
    assert ds.ids == list(specs)[:3]
    assert ds.labels_file == voc / "cls_labels.npy"
    assert ds.label_source(0).endswith("cls_labels.npy")
    assert ds.label_source(2).endswith("2008_000003.xml")  # not in the npy: falls back to the XML
    for i in range(3):
        s = ds[i]
        assert (torch.nonzero(s["labels"])[:, 0] + 1).tolist() == sorted(specs[s["id"]])
        # SegmentationClassAug wins where it has the id
        has_aug = (voc / "SegmentationClassAug" / f"{s['id']}.png").exists()
        assert (s["mask"][:, 0] == 255).all() == has_aug
        assert s["mask"].shape == s["image"].shape[:2]

    val = open_dataset(f"voc:{tmp_path / 'VOCdevkit'}", split="val")
    assert val.ids == ["2009_000004"]
    assert val[0]["image"].shape == (12, 10, 3)  # the .png image
    assert val[0]["labels"][[6, 7]].tolist() == [1.0, 1.0]


def test_cls_labels_json_and_xml_only(tmp_path):
    voc, specs = make_vocdevkit(tmp_path)
    ids = list(specs)
    (voc / "cls_labels.json").write_text(json.dumps({ids[0]: [0] * 19 + [1]}))  # 0/1 vector form
    ds = VOCDataset(voc, "train", masks=False)
    assert ds[0]["labels"].nonzero()[:, 0].tolist() == [19]  # the json, not the XML (which says class 1)
    assert ds[1]["labels"].nonzero()[:, 0].tolist() == [11, 14]  # XML: dog, person
    assert "mask" not in ds[1]


def test_cls_labels_npy_pickle_is_restricted(tmp_path):
    target = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.makedirs, (str(target),))

    np.save(tmp_path / "evil.npy", np.array({"x": Evil()}, dtype=object), allow_pickle=True)
    with pytest.raises(BadFileError, match="evil.npy"):
        load_npy_safely(tmp_path / "evil.npy")
    assert not target.exists()
    # plain arrays still load
    np.save(tmp_path / "plain.npy", np.arange(5))
    assert load_npy_safely(tmp_path / "plain.npy").tolist() == [0, 1, 2, 3, 4]


def test_voc_errors_name_the_file(tmp_path):
    voc, specs = make_vocdevkit(tmp_path)
    with pytest.raises(MissingFileError, match=r"split 'trainaug' not found.*Available splits: train, val"):
        VOCDataset(voc, "trainaug")

    (voc / "labels.json").write_text("{not json")
    with pytest.raises(BadFileError, match="labels.json"):
        VOCDataset(voc, "train")
    (voc / "labels.json").write_text(json.dumps({"2007_000001": [21]}))
    with pytest.raises(BadFileError, match=r"labels.json.*2007_000001.*21"):
        VOCDataset(voc, "train")
    (voc / "labels.json").write_text(json.dumps({"2007_000001": ["kitten"]}))
    with pytest.raises(UnknownClassError, match=r"labels.json.*kitten"):
        VOCDataset(voc, "train")
    (voc / "labels.json").unlink()

    (voc / "Annotations" / "2007_000002.xml").write_text(XML.format(id="x", objects=OBJ.format("unicorn")))
    ds = VOCDataset(voc, "train")
    with pytest.raises(UnknownClassError, match=r"2007_000002\.xml.*unicorn"):
        ds[1]
    (voc / "Annotations" / "2007_000002.xml").write_text("<annotation><object>")
    with pytest.raises(BadFileError, match=r"2007_000002\.xml"):
        ds[1]

    (voc / "ImageSets/Segmentation/train.txt").write_text("2007_000001\n2010_999999\n")
    with pytest.raises(MissingFileError, match=r"train\.txt.*2010_999999"):
        VOCDataset(voc, "train")
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n\n")
    with pytest.raises(DatasetLayoutError, match=r"train\.txt lists no ids"):
        VOCDataset(voc, "train")

    with pytest.raises(MissingFileError, match="masks missing"):
        VOCDataset(voc, "val", masks=True, mask_dir=voc / "Annotations")

    (voc / "JPEGImages").rename(voc / "Images")
    with pytest.raises(DatasetLayoutError, match="no JPEGImages"):
        VOCDataset(voc, "train")
    with pytest.raises(DatasetLayoutError, match=r"looks like a VOC layout.*no JPEGImages"):
        open_dataset(str(tmp_path / "VOCdevkit"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    with pytest.raises(DatasetLayoutError, match=r"looked for a VOC layout.*COCO.*labels file"):
        open_dataset(str(tmp_path / "empty"))
    with pytest.raises(MissingFileError, match="not found"):
        open_dataset(f"voc:{tmp_path / 'nowhere'}")
