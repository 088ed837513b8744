"""Sample-dict transforms keep image and mask aligned, pad correctly and are reproducible."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from wsclip.data import collate, open_dataset
from wsclip.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    Normalize,
    RandomCrop,
    RandomHFlip,
    RandomLongSideResize,
    Resize,
    ToTensor,
    clims_train_transform,
    eval_transform,
)
from wsclip.errors import ShapeError


def coded_sample(h, w, seed=0):
    """Image whose channels 0/1 hold the row/column index; mask = a function of (row, col)."""
    rng = np.random.default_rng(seed)
    r, c = np.mgrid[:h, :w]
    img = np.stack([r, c, rng.integers(0, 255, (h, w))], -1).astype(np.uint8)
    mask = ((r * 3 + c) % 21).astype(np.uint8)
    return {"id": "x", "image": img, "mask": mask, "labels": torch.zeros(20)}


def test_flip_matches_numpy():
    s = coded_sample(5, 9)
    out = RandomHFlip(p=1.0)(s)
    assert np.array_equal(out["image"], s["image"][:, ::-1]) and np.array_equal(out["mask"], s["mask"][:, ::-1])
    assert RandomHFlip(p=0.0)(s)["image"] is s["image"]
    t = ToTensor()(s)
    tf = RandomHFlip(p=1.0)(t)  # tensors (CHW) too
    assert torch.equal(tf["image"], t["image"].flip(-1)) and torch.equal(tf["mask"], t["mask"].flip(-1))


@pytest.mark.parametrize("hw,crop", [((20, 30), 32), ((40, 50), 32), ((31, 17), (16, 24)), ((1, 1), 3)])
def test_crop_keeps_alignment_and_pads(hw, crop):
    s = coded_sample(*hw)
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    for seed in range(6):
        out = Compose([Normalize(), RandomCrop(crop, generator=seed)])(s)
        img, mask = out["image"], out["mask"]
        assert img.shape == (ch, cw, 3) and mask.shape == (ch, cw)
        pad = mask == 255
        assert (img[pad] == 0).all()  # zero after normalisation = the mean colour
        assert (img[~pad] != 0).all()
        assert pad.sum() == ch * cw - min(ch, hw[0]) * min(cw, hw[1])
        # undo the normalisation and check every kept pixel's mask against its coordinates
        raw = np.rint((img[~pad] * IMAGENET_STD + IMAGENET_MEAN) * 255).astype(int)
        assert np.array_equal(mask[~pad], (raw[:, 0] * 3 + raw[:, 1]) % 21)
        kept_rows = np.unique(raw[:, 0])
        assert np.array_equal(kept_rows, np.arange(kept_rows[0], kept_rows[0] + min(ch, hw[0])))


def test_crop_numpy_and_tensor_paths_agree():
    s = coded_sample(13, 27)
    a = RandomCrop((16, 16), fill=(0.1, 0.2, 0.3), generator=3)(Normalize()(s))
    b = RandomCrop((16, 16), fill=(0.1, 0.2, 0.3), generator=3)(ToTensor()(Normalize()(s)))
    assert torch.allclose(torch.from_numpy(a["image"]).permute(2, 0, 1), b["image"])
    assert torch.equal(torch.from_numpy(a["mask"]), b["mask"])
    assert np.allclose(a["image"][a["mask"] == 255], [0.1, 0.2, 0.3])


@pytest.mark.parametrize("hw", [(21, 13), (9, 40), (64, 64)])
def test_resize_long_side_range_and_alignment(hw):
    h, w = hw
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2, 0] = 250  # red left half, blue right half
    img[:, w // 2:, 2] = 250
    mask = np.where(np.arange(w)[None, :] < w // 2, 1, 2).repeat(h, 0).astype(np.uint8)
    t = RandomLongSideResize(10, 57, generator=1)
    longs = set()
    for _ in range(12):
        out = t({"image": img, "mask": mask})
        oh, ow = out["mask"].shape
        assert out["image"].shape == (oh, ow, 3)
        assert 10 <= max(oh, ow) <= 57
        longs.add(max(oh, ow))
        assert abs(oh / ow - h / w) <= 1.0 / min(oh, ow) + 1e-9
        red, blue = out["image"][..., 0].astype(int), out["image"][..., 2].astype(int)
        assert (red[out["mask"] == 1] >= blue[out["mask"] == 1]).all()
        assert (blue[out["mask"] == 2] >= red[out["mask"] == 2]).all()
    assert len(longs) > 3
    assert Resize(long_side=32)({"image": img})["image"].shape[:2] in ((32, round(32 * w / h)), (round(32 * h / w), 32))
    assert Resize((5, 7))({"image": img, "mask": mask})["mask"].shape == (5, 7)


def test_normalize_and_to_tensor_match_formula():
    s = coded_sample(4, 6)
    out = ToTensor()(Normalize()(s))
    ref = (s["image"].astype(np.float64) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert out["image"].shape == (3, 4, 6) and out["image"].dtype == torch.float32
    assert np.allclose(out["image"].permute(1, 2, 0).numpy(), ref, atol=1e-5)
    assert out["mask"].dtype == torch.uint8 and torch.equal(out["mask"], torch.from_numpy(s["mask"]))
    plain = eval_transform(normalize=False)(s)
    assert torch.allclose(plain["image"], torch.from_numpy(s["image"]).permute(2, 0, 1).float() / 255)


def test_clims_transform_is_seeded():
    s = coded_sample(48, 37)
    runs = [clims_train_transform(crop=40, scale=(20, 60), seed=seed)(s) for seed in (7, 7, 8)]
    for r in runs:
        assert r["image"].shape == (3, 40, 40) and r["mask"].shape == (40, 40) and r["id"] == "x"
    assert torch.equal(runs[0]["image"], runs[1]["image"]) and torch.equal(runs[0]["mask"], runs[1]["mask"])
    t = clims_train_transform(crop=40, scale=(20, 60), generator=torch.Generator().manual_seed(8))
    assert torch.equal(t(s)["image"], runs[2]["image"])
    outs = [clims_train_transform(crop=40, scale=(20, 60), seed=k)(s)["image"] for k in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    # normalize=False pads with the mean colour in [0, 1]
    out = clims_train_transform(crop=80, scale=(20, 30), normalize=False, seed=0)(s)
    pad = out["mask"] == 255
    assert torch.allclose(out["image"][:, pad], torch.tensor(IMAGENET_MEAN)[:, None].expand(3, int(pad.sum())))


def test_collate_and_dataloader(voc14):
    ds = open_dataset(voc14, split="val", transform=clims_train_transform(crop=48, scale=(40, 80), seed=0))
    batch = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate)))
    assert batch["id"] == ds.ids[:3]
    assert batch["image"].shape == (3, 3, 48, 48) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (3, 48, 48) and batch["labels"].shape == (3, 20)
    for b in range(3):
        assert torch.equal(batch["labels"][b], ds.label_vector(b))
        present = set(batch["mask"][b].unique().tolist()) - {0, 255}
        assert present <= set((torch.nonzero(batch["labels"][b])[:, 0] + 1).tolist())
    raw = open_dataset(voc14, split="val")
    with pytest.raises(ShapeError, match="different shapes"):
        collate([raw[0], {**raw[1], "image": raw[1]["image"][:5]}])
    assert collate([raw[0], raw[1]])["image"].shape == (2, 513, 513, 3)
