"""Segmentation training: the loss ignores 255 exactly, augmentation, pseudo-mask pairing, exact resume."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsclip.config import from_preset
from wsclip.data import open_images
from wsclip.errors import BadFileError, DatasetLayoutError, MissingFileError, ShapeError
from wsclip.io import read_mask, write_mask
from wsclip.models.seg import build_seg_model, load_seg_model
from job_helpers import Crash, crash_at
from wsclip.train.seg import (
    PseudoMaskDataset, RandomScale, SegConfig, seg_loss, seg_step, seg_train_transform, train_seg,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_target(shape, classes, p_ignore=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, classes, shape, generator=g)
    t[torch.rand(shape, generator=g) < p_ignore] = 255
    return t


# ----------------------------------------------------------------------------- loss
@pytest.mark.parametrize("balanced", [False, True])
def test_ignored_pixels_get_exactly_zero_gradient(balanced):
    logits = torch.randn(3, 5, 13, 17, requires_grad=True)
    target = random_target((3, 13, 17), 5)
    seg_loss(logits, target, balanced=balanced).backward()
    ign = (target == 255).unsqueeze(1).expand_as(logits)
    assert ign.any() and (~ign).any()
    assert torch.all(logits.grad[ign] == 0)
    assert torch.all(logits.grad[~ign].abs().sum() > 0)
    # whatever the logits at ignored pixels, the loss is the same
    other = logits.detach().clone()
    other[ign] = torch.randn(int(ign.sum())) * 100
    assert torch.equal(seg_loss(other, target, balanced), seg_loss(logits.detach(), target, balanced))


def test_loss_values_match_plain_references():
    logits = torch.randn(2, 4, 9, 11)
    target = random_target((2, 9, 11), 4, seed=1)
    valid = target != 255
    logp = logits.log_softmax(1)
    nll = -logp.gather(1, target.clamp(max=3).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(seg_loss(logits, target), nll[valid].mean())
    bg, fg = valid & (target == 0), valid & (target > 0)
    torch.testing.assert_close(seg_loss(logits, target, balanced=True), (nll[bg].mean() + nll[fg].mean()) / 2)
    # a batch without foreground: balanced CE is the background mean alone
    t0 = target.clone()
    t0[t0 > 0] = 0
    torch.testing.assert_close(seg_loss(logits, t0, balanced=True), nll.new_tensor(0) + (
        -logp[:, 0][t0 == 0]).mean())
    # everything ignored: zero loss, zero (not NaN) gradient
    x = logits.clone().requires_grad_(True)
    loss = seg_loss(x, torch.full_like(target, 255), balanced=True)
    loss.backward()
    assert loss.item() == 0 and torch.all(x.grad == 0)


def test_network_gradient_ignores_255_pixels():
    """Parameter gradients of a training step equal those of a loss over the valid pixels only."""
    torch.manual_seed(0)
    net = build_seg_model("deeplabv2", "tiny", 4, rates=(1, 2)).eval()
    image = torch.randn(2, 3, 24, 20)
    target = random_target((2, 24, 20), 4, p_ignore=0.5, seed=2)
    loss, _ = seg_step(net, {"image": image, "mask": target})
    loss.backward()
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    logits = F.interpolate(net(image), size=(24, 20), mode="bilinear", align_corners=False)
    valid = target != 255
    ref = F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], target[valid])
    ref.backward()
    for a, p in zip(got, net.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)
    # relabelling the ignored pixels changes the gradient: they would count if not ignored
    net.zero_grad()
    relabelled = torch.where(valid, target, torch.zeros_like(target))
    seg_step(net, {"image": image, "mask": relabelled})[0].backward()
    assert not torch.allclose(got[-1], list(net.parameters())[-1].grad)


# ----------------------------------------------------------------------------- data
def test_random_scale_and_train_transform():
    image = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    mask = np.zeros((30, 50), np.uint8)
    mask[5:20, 10:40] = 3
    mask[0, :] = 255
    sizes = set()
    for seed in range(12):
        out = RandomScale(0.5, 2.0, generator=seed)({"image": image, "mask": mask})
        h, w = out["mask"].shape
        assert out["image"].shape == (h, w, 3) and 15 <= h <= 60 and abs(w / h - 50 / 30) < 0.1
        assert set(np.unique(out["mask"])) <= {0, 3, 255}
        sizes.add(h)
    assert len(sizes) > 5
    a = RandomScale(0.5, 2.0, generator=7)({"image": image, "mask": mask})
    b = RandomScale(0.5, 2.0, generator=7)({"image": image, "mask": mask})
    assert np.array_equal(a["image"], b["image"])
    torch.manual_seed(3)
    s = seg_train_transform(crop=41, scale_range=(0.5, 0.6))({"id": "x", "image": image, "mask": mask})
    assert s["image"].shape == (3, 41, 41) and s["mask"].shape == (41, 41) and s["mask"].dtype == torch.uint8
    pad = s["mask"] == 255  # the image is smaller than the crop: padding is ignored and mean-coloured
    assert pad.sum() > 41 * 41 - 30 * 25 and torch.all(s["image"][:, pad[:, :]] == 0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny synthetic world on disk and CGL-like pseudo masks: ground truth with a ring of 255."""
    from scipy import ndimage

    from wsclip.data.synth import write_voc_layout

    root = tmp_path_factory.mktemp("segworld")
    write_voc_layout(root / "world", n_train=8, n_val=3, seed=1, size=64, image_format="png")
    pseudo = root / "pseudo"
    for p in sorted((root / "world" / "SegmentationClass").glob("train_*.png")):
        gt = read_mask(p)
        edge = ndimage.binary_dilation(gt > 0, iterations=2) & ~ndimage.binary_erosion(gt > 0, iterations=2)
        write_mask(pseudo / p.name, np.where(edge, 255, gt).astype(np.uint8))
    return root


def test_pseudo_masks_pair_by_id_and_errors(world, tmp_path):
    base = open_images(world / "world", "train")
    ds = PseudoMaskDataset(base, world / "pseudo")
    assert ds.ids == base.ids and len(ds) == 8
    item = ds[2]
    assert np.array_equal(item["mask"], read_mask(world / "pseudo" / f"{ds.ids[2]}.png"))
    assert item["image"].shape == (64, 64, 3) and (item["mask"] == 255).any()
    gt = PseudoMaskDataset(open_images(world / "world", "train", masks=True))  # the dataset's own masks
    assert not (gt[2]["mask"] == 255).any()

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / f"{ds.ids[0]}.png").write_bytes((world / "pseudo" / f"{ds.ids[0]}.png").read_bytes())
    with pytest.raises(MissingFileError, match="7 of 8"):
        PseudoMaskDataset(base, partial)
    with pytest.raises(MissingFileError):
        PseudoMaskDataset(base, tmp_path / "nowhere")
    bad = tmp_path / "bad"
    for i in ds.ids:
        write_mask(bad / f"{i}.png", np.full((64, 64), 9, np.uint8))
    with pytest.raises(BadFileError, match="label 9"):
        PseudoMaskDataset(base, bad)[0]
    small = tmp_path / "small"
    for i in ds.ids:
        write_mask(small / f"{i}.png", np.zeros((32, 64), np.uint8))
    with pytest.raises(ShapeError):
        PseudoMaskDataset(base, small)[0]
    with pytest.raises(DatasetLayoutError, match="--pseudo"):
        PseudoMaskDataset(open_images(world / "world", "train", masks=False))


# ----------------------------------------------------------------------------- training


def config(world, out, **kw):
    opts = dict(data=str(world / "world"), pseudo=str(world / "pseudo"), out=str(out), max_steps=4, batch_size=4,
                crop=40, ckpt_every=2, log_every=1, num_workers=0, device="cpu", rates=(1, 2), arch="deeplabv2")
    opts.update(kw)
    return from_preset(SegConfig, "synth", **opts)


def test_train_resume_identical_and_checkpoint_loads(world, tmp_path):
    ref = train_seg(config(world, tmp_path / "ref", balanced_ce=True))
    with pytest.raises(Crash):
        train_seg(config(world, tmp_path / "run", balanced_ce=True), callbacks=[crash_at(3)])
    assert (tmp_path / "run" / "checkpoints" / "step-0000002").is_dir()
    got = train_seg(config(world, tmp_path / "run", balanced_ce=True), resume=True)
    a, meta = load_seg_model(ref)
    b, _ = load_seg_model(got)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    assert meta["kind"] == "seg" and meta["num_classes"] == 7 and meta["classes"][0] == "boat"
    assert meta["pseudo"] == str(world / "pseudo") and meta["rates"] == [1, 2]
    log = [json.loads(ln) for ln in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    ref_log = [json.loads(ln) for ln in (tmp_path / "ref" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in ref_log], rel=1e-6)
    assert all(0 < r["ignored"] < 1 for r in log)
    # the weights moved, and step checkpoints load as seg networks too
    init = build_seg_model("deeplabv2", "tiny", 7, rates=(1, 2))
    assert not torch.equal(init.head.convs[0].weight, b.head.convs[0].weight)
    step_ckpt, _ = load_seg_model(tmp_path / "run" / "checkpoints" / "step-0000004" / "model.safetensors")
    assert torch.equal(step_ckpt.head.convs[0].weight, b.head.convs[0].weight)


def test_cli_train_seg_then_segment_and_eval(world, tmp_path, capsys):
    from wsclip.cli import main

    out = tmp_path / "cli"
    rc = main(["train", "seg", "--preset", "synth", "--data", str(world / "world"), "--pseudo", str(world / "pseudo"),
               "--out", str(out), "--max-steps", "2", "--batch-size", "2", "--crop", "32", "--num-workers", "0",
               "--device", "cpu", "--rates", "1", "2", "--arch", "deeplabv3plus", "--no-freeze-bn"])
    assert rc == 0 and (out / "seg.safetensors").is_file()
    assert "saved" in capsys.readouterr().out
    pred = tmp_path / "pred"
    rc = main(["segment", "--checkpoint", str(out / "seg.safetensors"), "--images", str(world / "world"),
               "--split", "val", "--out", str(pred), "--scales", "1.0", "--workers", "0", "--device", "cpu"])
    assert rc == 0 and sorted(p.name for p in pred.glob("*.png")) == [f"val_00000{i}.png" for i in range(3)]
    rc = main(["eval", "--pred", str(pred), "--gt", str(world / "world" / "SegmentationClass"),
               "--split", str(world / "world" / "ImageSets" / "Segmentation" / "val.txt"),
               "--dataset", str(world / "world" / "classes.txt"), "--json", str(tmp_path / "eval.json")])
    assert rc == 0 and 0 <= json.loads((tmp_path / "eval.json").read_text())["miou"] <= 1
    # a user mistake is one line and exit code 2
    rc = main(["train", "seg", "--data", str(world / "world"), "--split", "train", "--pseudo",
               str(tmp_path / "missing"), "--out", str(tmp_path / "x"), "--backbone", "tiny", "--device", "cpu"])
    assert rc == 2 and "pseudo-mask folder not found" in capsys.readouterr().err
