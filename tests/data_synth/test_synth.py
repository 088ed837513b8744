"""The synthetic world: determinism, masks vs labels, co-occurrence, VOC layout round trip."""

import json

import numpy as np
import pytest
import torch

from wsclip.data.synth import (
    SYNTH_BACKGROUND_WORDS,
    SYNTH_BACKGROUNDS,
    SYNTH_CLASSES,
    SYNTH_PREFERRED,
    SynthDataset,
    caption_for,
    generate_scene,
    write_voc_layout,
)
from wsclip.errors import WsclipError


def test_vocabulary_shape():
    assert len(SYNTH_CLASSES) >= 6 and len(set(SYNTH_CLASSES)) == len(SYNTH_CLASSES)
    assert len(SYNTH_BACKGROUNDS) >= 4
    assert set(SYNTH_BACKGROUND_WORDS) <= set(SYNTH_BACKGROUNDS)
    assert set(SYNTH_PREFERRED) == set(range(len(SYNTH_CLASSES)))
    assert SYNTH_BACKGROUNDS[SYNTH_PREFERRED[SYNTH_CLASSES.index("boat")]] == "water"
    assert SYNTH_BACKGROUNDS[SYNTH_PREFERRED[SYNTH_CLASSES.index("train")]] == "rails"


def test_captions():
    assert caption_for(["boat", "bird"], "water") == "a photo of a boat and a bird on water."
    assert caption_for(["boat", "bird", "car"], "road") == "a photo of a boat, a bird and a car on a road."
    assert caption_for(["cow"]) == "a photo of a cow."
    assert caption_for([], "sky") == "a photo of sky."


def test_same_seed_same_scene_different_seed_differs():
    for i in (0, 7, 123):
        a, b = generate_scene(3, "train", i), generate_scene(3, "train", i)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.caption == b.caption
    a, b = generate_scene(3, "train", 5), generate_scene(4, "train", 5)
    assert not np.array_equal(a.image, b.image)
    assert not np.array_equal(generate_scene(3, "train", 5).image, generate_scene(3, "val", 5).image)
    # the dataset is a pure function of (seed, split, index), whatever the access order
    d1, d2 = SynthDataset("val", n=6, seed=1), SynthDataset("val", n=6, seed=1)
    for i in (5, 0, 3):
        x, y = d1[i], d2[i]
        np.testing.assert_array_equal(x["image"], y["image"])
        assert torch.equal(x["labels"], y["labels"])


def test_items_follow_the_dataset_interface():
    ds = SynthDataset("train", n=4, seed=0, size=96)
    assert ds.classes == SYNTH_CLASSES and len(ds) == 4 and ds.ids[0] == "train_000000"
    item = ds[-1]
    assert item["id"] == "train_000003"
    assert item["image"].dtype == np.uint8 and item["image"].shape == (96, 96, 3)
    assert item["mask"].dtype == np.uint8 and item["mask"].shape == (96, 96)
    assert item["labels"].dtype == torch.float32 and item["labels"].shape == (len(SYNTH_CLASSES),)
    assert isinstance(item["caption"], str) and item["background"] in SYNTH_BACKGROUNDS
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(WsclipError):
        SynthDataset("test")
    flipped = SynthDataset("train", n=4, transform=lambda s: {**s, "image": s["image"][:, ::-1]})
    np.testing.assert_array_equal(flipped[1]["image"], SynthDataset("train", n=4)[1]["image"][:, ::-1])


def test_masks_labels_and_captions_agree():
    ds = SynthDataset("train", n=80, seed=2)
    n_multi = 0
    for i in range(len(ds)):
        sc = ds.scene(i)
        item = ds[i]
        present = sorted(set(np.unique(item["mask"]).tolist()) - {0, 255})
        assert present, "every scene has at least one object"
        assert max(present) <= len(SYNTH_CLASSES)
        assert np.flatnonzero(item["labels"].numpy()).tolist() == [p - 1 for p in present]
        # the instance map refines the mask, and each object keeps enough visible pixels
        assert 1 <= len(sc.object_classes) <= 3
        for j, c in enumerate(sc.object_classes):
            obj = sc.instances == j + 1
            assert obj.sum() >= 30 and (sc.mask[obj] == c + 1).all()
        assert ((sc.instances > 0) == (sc.mask > 0)).all()
        # the caption names exactly the present classes and the background
        words = set(item["caption"].replace(",", " ").replace(".", " ").split())
        assert {c for c in SYNTH_CLASSES if c in words} == {SYNTH_CLASSES[p - 1] for p in present}
        assert item["background"] in words
        n_multi += len(present) > 1
    assert n_multi >= 8, "the world must be multi-label"


def test_classes_co_occur_with_their_preferred_background():
    K = len(SYNTH_CLASSES)
    on_pref, total = np.zeros(K), np.zeros(K)
    bgs = np.zeros(len(SYNTH_BACKGROUNDS))
    for i in range(500):
        sc = generate_scene(0, "train", i)
        bgs[sc.background] += 1
        for c in sc.classes:
            total[c] += 1
            on_pref[c] += SYNTH_PREFERRED[c] == sc.background
    frac = on_pref / total
    assert (total > 40).all() and (bgs > 30).all()
    assert (frac > 0.6).all(), dict(zip(SYNTH_CLASSES, frac.round(2)))
    assert (frac < 0.95).all(), "classes must also appear elsewhere"


def test_colour_alone_does_not_identify_the_class():
    """A nearest-mean classifier on an object's mean colour stays far below perfect."""
    feats, ys = [], []
    for i in range(300):
        sc = generate_scene(0, "val", i)
        for j, c in enumerate(sc.object_classes):
            feats.append(sc.image[sc.instances == j + 1].mean(0))
            ys.append(c)
    feats, ys = np.array(feats), np.array(ys)
    half = len(ys) // 2
    means = np.stack([feats[:half][ys[:half] == k].mean(0) for k in range(len(SYNTH_CLASSES))])
    pred = np.argmin(((feats[half:, None] - means[None]) ** 2).sum(-1), 1)
    assert (pred == ys[half:]).mean() < 0.5


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_voc_layout_round_trip(tmp_path, fmt):
    from wsclip.data import open_dataset

    out = write_voc_layout(tmp_path / "w", n_train=6, n_val=4, seed=5, size=64, image_format=fmt)
    assert (out / "ImageSets" / "Segmentation" / "val.txt").read_text().split() == [f"val_{i:06d}" for i in range(4)]
    assert (out / "classes.txt").read_text().split() == list(SYNTH_CLASSES)
    captions = json.loads((out / "captions.json").read_text())
    ref = SynthDataset("val", n=4, seed=5)
    ds = open_dataset(str(out), split="val")
    assert tuple(ds.classes) == SYNTH_CLASSES and list(ds.ids) == ref.ids
    for i in range(4):
        got, want = ds[i], ref[i]
        np.testing.assert_array_equal(got["mask"], want["mask"])
        assert torch.equal(got["labels"], want["labels"])
        assert captions[want["id"]] == want["caption"]
        diff = np.abs(got["image"].astype(int) - want["image"].astype(int))
        if fmt == "png":
            assert diff.max() == 0
        else:
            assert diff.mean() < 4
    # a re-run resumes: finished files are kept as they are
    img = out / "JPEGImages" / f"train_000000.{fmt}"
    before = img.stat().st_mtime_ns
    write_voc_layout(out, n_train=6, n_val=4, seed=5, size=64, image_format=fmt)
    assert img.stat().st_mtime_ns == before
    with pytest.raises(WsclipError, match="seed"):
        write_voc_layout(out, n_train=6, n_val=4, seed=6, size=64, image_format=fmt)


def test_synth_cli_and_open_dataset_scheme(tmp_path):
    from wsclip.cli import main
    from wsclip.data import open_dataset

    assert main(["synth", "--out", str(tmp_path / "s"), "--train", "3", "--val", "2", "--seed", "1"]) == 0
    assert len(list((tmp_path / "s" / "JPEGImages").glob("*.jpg"))) == 5
    labels = json.loads((tmp_path / "s" / "labels.json").read_text())
    assert labels["val_000001"] == [c + 1 for c in sorted(generate_scene(1, "val", 1).classes)]
    ds = open_dataset("synth:", split="val", n=3, seed=1)
    assert isinstance(ds, SynthDataset) and len(ds) == 3
