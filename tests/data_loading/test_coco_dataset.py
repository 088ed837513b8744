"""COCO: polygon rasterisation and RLE decoding against hand-computed pixels and references."""

import json

import numpy as np
import pytest
import torch
from matplotlib.path import Path as MplPath
from PIL import Image

from wsclip.data import COCODataset, open_dataset
from wsclip.data.coco_masks import decode_rle_string, polygon_to_mask, rle_to_mask, segmentation_to_mask
from wsclip.errors import BadFileError, DatasetLayoutError, MissingFileError
from wsclip.formats import rle_counts_string as encode_rle_string  # the writer of `wsclip label --rle`
from wsclip.io import write_mask
from wsclip.vocab import COCO_CLASSES


def runs_of(mask):
    flat = mask.T.ravel().astype(np.int8)  # column-major
    counts, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(n)
            cur, n = v, 0
        n += 1
    counts.append(n)
    return counts


def test_rle_string_hand_computed():
    assert decode_rle_string("237") == [2, 3, 7]
    assert decode_rle_string("1234") == [1, 2, 3, 2 + 4]  # 4th value is a delta from the 2nd
    assert decode_rle_string("X1") == [40]  # 40 = 8 + 1 * 32: a continuation group
    assert decode_rle_string("5:3H") == [5, 10, 3, 2]  # 'H' = -8 delta: 10 - 8
    # 3x4 mask, column-major runs 2 zeros, 3 ones, 7 zeros
    m = rle_to_mask([2, 3, 7], 3, 4)
    assert m.astype(int).tolist() == [[0, 1, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]]
    with pytest.raises(BadFileError, match="12"):
        rle_to_mask([2, 3], 3, 4)
    with pytest.raises(BadFileError):
        decode_rle_string("X")  # truncated continuation


@pytest.mark.parametrize("hw", [(1, 1), (7, 5), (13, 31), (40, 3)])
def test_rle_round_trip_random(hw):
    rng = np.random.default_rng(hw[0] * 100 + hw[1])
    for density in (0.0, 0.5, 1.0, 0.1):
        mask = rng.random(hw) < density
        counts = runs_of(mask)
        assert encode_rle_string(counts) and decode_rle_string(encode_rle_string(counts)) == counts
        got = segmentation_to_mask({"size": list(hw), "counts": encode_rle_string(counts)}, *hw)
        assert np.array_equal(got, mask)
        assert np.array_equal(segmentation_to_mask({"size": list(hw), "counts": counts}, *hw), mask)


def test_polygon_hand_computed():
    # axis-aligned 4x3 box: exactly the 12 pixels with centres inside
    m = polygon_to_mask([2, 1, 6, 1, 6, 4, 2, 4], 6, 8)
    exp = np.zeros((6, 8), bool)
    exp[1:4, 2:6] = True
    assert np.array_equal(m, exp)
    # right triangle (1,1), (7,1), (1,7): centre (c+.5, r+.5) inside when c + r + 1 < 8, c >= 1, r >= 1
    m = polygon_to_mask([1, 1, 7, 1, 1, 7], 8, 8)
    r, c = np.mgrid[:8, :8]
    assert np.array_equal(m, (r >= 1) & (c >= 1) & (r + c + 1 < 8))
    # polygon hanging over the border is clipped, and degenerate input is empty
    m = polygon_to_mask([-3, -3, 2.2, -3, 2.2, 2.2, -3, 2.2], 4, 5)
    assert m.sum() == 4 and m[:2, :2].all()
    assert not polygon_to_mask([1, 1, 3, 3], 4, 4).any()


@pytest.mark.parametrize("hw", [(17, 23), (32, 9), (5, 64)])
def test_polygon_matches_point_in_polygon_reference(hw):
    h, w = hw
    rng = np.random.default_rng(h * w)
    centres = np.stack(np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5), -1).reshape(-1, 2)
    for _ in range(5):  # random star-shaped (simple) polygons, partly outside the image
        n = rng.integers(3, 12)
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        rad = rng.uniform(1, max(h, w) * 0.7, n)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1)
        ref = MplPath(pts).contains_points(centres).reshape(h, w)
        assert np.array_equal(polygon_to_mask(pts.ravel().tolist(), h, w), ref)


def make_coco(tmp_path):
    """Two 6x8 images: a person box + dog triangle, and a crowd RLE (uncompressed) + compressed RLE cat."""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2014").mkdir()
    for n in (1, 2):
        Image.fromarray(np.full((6, 8, 3), 40 * n, np.uint8)).save(root / "val2014" / f"COCO_val2014_{n:012d}.jpg")
    crowd = np.zeros((6, 8), bool)
    crowd[:, 6:] = True  # the last two columns
    cat = np.zeros((6, 8), bool)
    cat[2:4, 1:3] = True
    data = {
        "images": [
            {"id": 2, "file_name": "COCO_val2014_000000000002.jpg", "height": 6, "width": 8},
            {"id": 1, "file_name": "COCO_val2014_000000000001.jpg", "height": 6, "width": 8},
        ],
        "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 17, "name": "cat"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 15,
             "segmentation": [[2, 1, 7, 1, 7, 4, 2, 4]]},
            {"id": 11, "image_id": 1, "category_id": 18, "iscrowd": 0, "area": 2,
             "segmentation": [[5.2, 3, 8, 3, 8, 5.8]]},
            {"id": 12, "image_id": 2, "category_id": 1, "iscrowd": 1, "area": 12,
             "segmentation": {"size": [6, 8], "counts": runs_of(crowd)}},
            {"id": 13, "image_id": 2, "category_id": 17, "iscrowd": 0, "area": 4,
             "segmentation": {"size": [6, 8], "counts": encode_rle_string(runs_of(cat))}},
        ],
    }
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps(data))
    return root


def test_coco_renders_masks_and_labels(tmp_path):
    root = make_coco(tmp_path)
    ds = open_dataset(str(root), split="val")
    assert isinstance(ds, COCODataset)
    assert ds.classes == COCO_CLASSES  # a subset of the standard categories keeps 80-class indexing
    assert ds.ids == ["COCO_val2014_000000000001", "COCO_val2014_000000000002"]
    person, dog, cat = 1, COCO_CLASSES.index("dog") + 1, COCO_CLASSES.index("cat") + 1
    assert (dog, cat) == (17, 16)

    s = ds[0]
    assert s["image"].shape == (6, 8, 3) and s["labels"].shape == (80,)
    assert torch.nonzero(s["labels"])[:, 0].tolist() == [person - 1, dog - 1]
    exp = np.zeros((6, 8), np.uint8)
    exp[1:4, 2:7] = person
    # dog triangle (5.2,3),(8,3),(8,5.8): centres with y > 3, x < 8, y - 3 < x - 5.2; painted on top
    for r in range(6):
        for c in range(8):
            x, y = c + 0.5, r + 0.5
            if y > 3 and x < 8 and (y - 3) < (x - 5.2):
                exp[r, c] = dog
    assert np.array_equal(s["mask"], exp)
    assert s["mask"][3, 6] == dog  # the smaller object stays on top where they overlap

    s = ds[1]
    assert torch.nonzero(s["labels"])[:, 0].tolist() == [person - 1, cat - 1]
    exp = np.zeros((6, 8), np.uint8)
    exp[:, 6:] = person
    exp[2:4, 1:3] = cat
    assert np.array_equal(s["mask"], exp)

    # a pre-rendered PNG folder takes precedence over rendering
    pre = np.full((6, 8), 5, np.uint8)
    write_mask(root / "SegmentationClass" / "val2014" / "COCO_val2014_000000000002.png", pre)
    ds = COCODataset(root, split="val")
    assert np.array_equal(ds[1]["mask"], pre)
    assert np.array_equal(ds[0]["mask"][1:3, 2:5], np.full((2, 3), person))  # no PNG: rendered
    assert "mask" not in COCODataset(root, split="val", masks=False)[0]


def test_coco_errors(tmp_path):
    root = make_coco(tmp_path)
    with pytest.raises(MissingFileError, match="instances_train2014.json"):
        COCODataset(root, split="train")
    ann = root / "annotations" / "instances_val2014.json"
    data = json.loads(ann.read_text())
    data["annotations"][0]["category_id"] = 99
    ann.write_text(json.dumps(data))
    with pytest.raises(BadFileError, match=r"instances_val2014.json.*category_id 99"):
        COCODataset(root, split="val")
    ann.write_text('{"images": [')
    with pytest.raises(BadFileError, match="instances_val2014.json is not valid JSON"):
        open_dataset(f"coco:{root}", split="val")
    ann.write_text("{}")
    with pytest.raises(BadFileError, match="not a COCO instances file"):
        open_dataset(f"coco:{root}", split="val")


def test_coco_custom_categories(tmp_path):
    root = make_coco(tmp_path)
    ann = root / "annotations" / "instances_val2014.json"
    data = json.loads(ann.read_text())
    data["categories"] = [{"id": 18, "name": "hound"}, {"id": 1, "name": "human"}, {"id": 17, "name": "cat"}]
    ann.write_text(json.dumps(data))
    ds = COCODataset(root, split="val")
    assert ds.classes == ("human", "cat", "hound")  # own names, sorted by category id
    assert torch.nonzero(ds[0]["labels"])[:, 0].tolist() == [0, 2]
    assert set(np.unique(ds[0]["mask"]).tolist()) == {0, 1, 3}


def test_coco_default_split_subset_and_empty_images(tmp_path):
    root = make_coco(tmp_path)
    ann = root / "annotations" / "instances_val2014.json"
    data = json.loads(ann.read_text())
    data["images"].append({"id": 3, "file_name": "COCO_val2014_000000000003.jpg", "height": 4, "width": 4})
    ann.write_text(json.dumps(data))
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "val2014" / "COCO_val2014_000000000003.jpg")
    ds = open_dataset(root)  # the only split there is: val
    assert ds.split == "val" and len(ds) == 3
    assert ds[2]["labels"].sum() == 0 and (ds[2]["mask"] == 0).all()
    assert len(COCODataset(root, "val", skip_empty=True)) == 2
    (tmp_path / "sub.txt").write_text("COCO_val2014_000000000002\n")
    assert COCODataset(root, "val", subset=tmp_path / "sub.txt").ids == ["COCO_val2014_000000000002"]
    (tmp_path / "sub.txt").write_text("COCO_val2014_000000000009\n")
    with pytest.raises(DatasetLayoutError, match="sub.txt"):
        COCODataset(root, "val", subset=tmp_path / "sub.txt")
