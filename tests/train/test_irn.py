"""IRN boundary network: path max vs reference, affinity labels and loss vs direct loops, seeds,
a short end-to-end training through the CLI, and predict_boundary's shape and range."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from wsclip.cli import main
from wsclip.errors import BadFileError, MissingFileError, ShapeError, WsclipError
from wsclip.refine.random_walk import edge_to_affinity, neighbor_offsets
from wsclip.train.irn import (
    affinity_labels,
    affinity_loss,
    downsample_seeds,
    load_cam_file,
    make_seeds,
    path_max,
    path_max_reference,
    path_pixels,
    predict_boundary,
    seed_labels,
)


# ----------------------------------------------------------------------------- path max
@pytest.mark.parametrize("radius,shape", [(3, (2, 7, 9)), (5, (1, 2, 3)), (5, (2, 11, 13)), (10, (1, 21, 17))])
def test_path_max_matches_reference_values_and_gradients(radius, shape):
    edge = torch.rand(*shape, dtype=torch.float64, requires_grad=True)
    fast = path_max(edge, radius)
    ref = path_max_reference(edge, radius)
    assert fast.shape == (shape[0], len(path_pixels(radius)), *shape[1:])
    assert torch.equal(fast, ref)
    up = torch.randn_like(fast)
    g_fast, = torch.autograd.grad(fast, edge, up)
    g_ref, = torch.autograd.grad(ref, edge, up)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-10, atol=1e-10)
    # the same path rule as the random-walk refinement: a = 1 - max B on the path
    torch.testing.assert_close(1 - fast.detach().float(), edge_to_affinity(edge.detach().float(), radius))


def test_path_max_direct_on_one_pair():
    edge = torch.zeros(1, 6, 6)
    edge[0, 2, 2] = 0.9  # on the diagonal path (0, 0) -> (3, 3)
    edge[0, 0, 5] = 0.5  # on row 0, beyond x = 4
    offs = neighbor_offsets(5).tolist()
    pm = path_max(edge, 5)
    assert pm[0, offs.index([3, 3]), 0, 0] == pytest.approx(0.9)
    assert pm[0, offs.index([0, 4]), 0, 0] == 0.0  # (0,0)..(0,4) misses both
    assert pm[0, offs.index([0, 4]), 0, 1] == pytest.approx(0.5)  # (0,1)..(0,5) ends on it
    assert pm[0, offs.index([0, 4]), 0, 3] == 1.0  # target outside: padding counts as boundary


# ----------------------------------------------------------------------------- labels and loss
def _direct_pairs(seeds: np.ndarray, radius: int):
    n, h, w = seeds.shape
    offs = neighbor_offsets(radius).tolist()
    bg = np.zeros((n, len(offs), h, w), bool)
    fg, neg = bg.copy(), bg.copy()
    for b in range(n):
        for k, (dy, dx) in enumerate(offs):
            for y in range(h):
                for x in range(w):
                    y2, x2 = y + dy, x + dx
                    if not (0 <= y2 < h and 0 <= x2 < w):
                        continue
                    a, c = seeds[b, y, x], seeds[b, y2, x2]
                    if a == 255 or c == 255:
                        continue
                    if a == c:
                        (bg if a == 0 else fg)[b, k, y, x] = True
                    else:
                        neg[b, k, y, x] = True
    return bg, fg, neg


def test_affinity_labels_match_direct_loops():
    rng = np.random.default_rng(1)
    seeds = rng.choice([0, 1, 2, 255], size=(2, 7, 9), p=[0.4, 0.25, 0.15, 0.2]).astype(np.uint8)
    got = affinity_labels(torch.from_numpy(seeds), 4)
    for g, d in zip(got, _direct_pairs(seeds, 4)):
        assert np.array_equal(g.numpy(), d)


def test_affinity_loss_is_irnets_balanced_form():
    rng = np.random.default_rng(2)
    seeds = rng.choice([0, 3, 5, 255], size=(2, 6, 8)).astype(np.uint8)
    edge = torch.rand(2, 6, 8, dtype=torch.float64)
    loss, terms = affinity_loss(edge, torch.from_numpy(seeds), 3)
    aff = 1 - path_max_reference(edge, 3).numpy()
    bg, fg, neg = _direct_pairs(seeds, 3)
    pos_l, neg_l = -np.log(aff + 1e-5), -np.log(1 + 1e-5 - aff)
    expect = {"bg_pos": pos_l[bg].mean(), "fg_pos": pos_l[fg].mean(), "neg": neg_l[neg].mean()}
    for k, v in expect.items():
        assert terms[k].item() == pytest.approx(v, rel=1e-6)
    assert loss.item() == pytest.approx(((expect["bg_pos"] + expect["fg_pos"]) / 2 + expect["neg"]) / 2, rel=1e-6)
    # no labelled pairs at all: zero loss, still differentiable
    edge.requires_grad_(True)
    loss0, _ = affinity_loss(edge, torch.full((2, 6, 8), 255, dtype=torch.uint8), 3)
    loss0.backward()
    assert loss0.item() == 0.0 and torch.all(edge.grad == 0)
    with pytest.raises(ShapeError):
        affinity_loss(edge, torch.zeros(2, 5, 8, dtype=torch.uint8), 3)


def test_downsample_seeds_keeps_labels():
    seeds = torch.zeros(1, 64, 64, dtype=torch.uint8)
    seeds[0, 16:48, 16:48] = 3
    seeds[0, :, :8] = 255
    small = downsample_seeds(seeds, (16, 16))
    assert small.shape == (1, 16, 16)
    assert small[0, 8, 8] == 3 and small[0, 0, 0] == 255 and small[0, 15, 15] == 0
    assert set(small.unique().tolist()) == {0, 3, 255}


# ----------------------------------------------------------------------------- seeds
def test_seed_labels_thresholds():
    cams = np.zeros((2, 4, 5), np.float32)
    cams[0, 0, :] = [0.9, 0.35, 0.2, 0.05, 0.0]   # class index 4 (label 5)
    cams[1, 1, :] = [0.12, 0.5, 0.25, 0.11, 0.09]  # class index 0 (label 1)
    seeds = seed_labels(None, cams, [4, 0], fg_threshold=0.30, bg_threshold=0.10)
    assert seeds.dtype == np.uint8
    assert seeds[0].tolist() == [5, 5, 255, 0, 0]
    assert seeds[1].tolist() == [255, 1, 255, 255, 0]
    assert np.all(seeds[2:] == 0)
    empty = seed_labels(None, np.zeros((0, 4, 5), np.float32), [])
    assert np.all(empty == 0)


def test_seed_labels_with_crf_refines_to_known_labels():
    pytest.importorskip("pydensecrf.densecrf")
    rng = np.random.default_rng(0)
    image = np.zeros((24, 32, 3), np.uint8)
    image[:, 16:] = 200
    image = (image + rng.integers(0, 10, image.shape)).astype(np.uint8)
    cams = np.zeros((1, 24, 32), np.float32)
    cams[0, :, 14:] = 0.8  # a little too wide: the CRF follows the colour edge
    plain = seed_labels(image, cams, [2], crf=False)
    refined = seed_labels(image, cams, [2], crf=True)
    assert set(np.unique(refined).tolist()) <= {0, 3, 255}
    assert (refined[:, 20:] == 3).all() and (refined[:, :10] == 0).all()
    assert (plain[:, 14:16] == 3).all() and (refined[:, 14:16] == 0).all()


def _fake_cams(dataset, cam_dir):
    from wsclip.label.clims_cam import write_cam_file

    rng = np.random.default_rng(0)
    for i, image_id in enumerate(dataset.ids):
        mask = dataset.load_mask(i)
        keys = [int(v) - 1 for v in np.unique(mask) if v not in (0, 255)]
        high = np.stack([(mask == k + 1).astype(np.float32) * 0.9 for k in keys]) if keys else np.zeros((0,) + mask.shape)
        high = np.clip(high + rng.uniform(0, 0.2, high.shape), 0, 1)
        write_cam_file(cam_dir / f"{image_id}.npz", np.array(keys), high[:, ::4, ::4], high)


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def synth_voc(tmp_path_factory):
    from wsclip.data import open_dataset
    from wsclip.data.synth import write_voc_layout

    root = tmp_path_factory.mktemp("synth_voc")
    write_voc_layout(root, n_train=6, n_val=0, size=64, image_format="png")
    ds = open_dataset(str(root), split="train")
    cams = root / "cams"
    _fake_cams(ds, cams)
    return root, ds, cams


def test_make_seeds_resume_and_errors(synth_voc, tmp_path, caplog):
    root, ds, cams = synth_voc
    with caplog.at_level("INFO", logger="wsclip.train.irn"):
        out = make_seeds(ds, cams, tmp_path / "seeds", crf="off")
    assert "thresholds alone" in caplog.text
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == len(ds)
    par = make_seeds(ds, cams, tmp_path / "seeds_par", crf="off", workers=2)  # worker processes: same files
    assert all(p.read_bytes() == (par / p.name).read_bytes() for p in pngs)
    from wsclip.io import read_mask

    first = read_mask(pngs[0])
    keys, high = load_cam_file(cams / f"{ds.ids[0]}.npz", first.shape)
    assert np.array_equal(first, seed_labels(None, high, keys, 0.30, 0.10))
    info = json.loads((out / "seeds.json").read_text())
    assert info["crf"] is False and info["fg_threshold"] == 0.30
    mtimes = [p.stat().st_mtime_ns for p in pngs]
    make_seeds(ds, cams, out, crf="off")  # resume: nothing redone
    assert [p.stat().st_mtime_ns for p in pngs] == mtimes
    with pytest.raises(WsclipError, match="seeds made with"):
        make_seeds(ds, cams, out, fg_threshold=0.5, crf="off")
    with pytest.raises(MissingFileError, match="no CAM file"):
        make_seeds(ds, tmp_path / "seeds", tmp_path / "seeds2", crf="off")  # a folder without .npz files
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(BadFileError, match="bad.npz"):
        load_cam_file(tmp_path / "bad.npz")


def test_train_irn_cli_end_to_end_and_predict_boundary(synth_voc, tmp_path, capsys):
    from wsclip.models.irn import load_irn

    root, ds, cams = synth_voc
    out = tmp_path / "irn"
    argv = ["train", "irn", "--preset", "synth", "--data", str(root), "--split", "train", "--cams", str(cams),
            "--out", str(out), "--backbone", "tiny", "--max-steps", "3", "--batch-size", "2", "--crop", "64",
            "--resize-long", "48", "80", "--num-workers", "0", "--crf", "off", "--log-every", "1",
            "--device", "cpu", "--radius", "5", "--seed-workers", "1"]
    assert main(argv) == 0
    final = out / "irn.safetensors"
    assert final.is_file() and (out / "seeds" / f"{ds.ids[0]}.png").is_file()
    rows = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    assert all(r["bg_pos"] >= 0 and r["neg"] >= 0 for r in rows)

    net, meta = load_irn(final)
    assert meta["kind"] == "irn" and meta["radius"] == 5 and meta["backbone"] == "tiny"
    assert meta["seeds"]["crf"] is False and meta["seeds"]["fg_threshold"] == 0.30
    torch.manual_seed(0)  # training seeds 0 right before building the network: same initial weights
    init = type(net)("tiny").state_dict()
    trained = net.state_dict()
    # the frozen backbone (BatchNorm statistics included) is unchanged, the edge branch trained
    assert all(torch.equal(v, init[k]) for k, v in trained.items() if k.startswith("backbone."))
    assert any(not torch.equal(v, init[k]) for k, v in trained.items() if k.startswith("edge_"))

    image = np.random.default_rng(0).integers(0, 256, (37, 50, 3), dtype=np.uint8)
    b = predict_boundary(image, final)
    assert b.shape == (10, 13) and b.dtype == torch.float32
    assert float(b.min()) >= 0.0 and float(b.max()) <= 1.0
    b2 = predict_boundary(torch.from_numpy(image).permute(2, 0, 1).float() / 255, net, flip=False)
    assert b2.shape == (10, 13)
    with pytest.raises(ShapeError):
        predict_boundary(np.zeros((5, 5)), net)

    # a second run without --resume refuses; with --resume it is already finished
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 0


def test_train_irn_missing_cams_is_a_clear_cli_error(synth_voc, tmp_path, capsys):
    root, _, _ = synth_voc
    rc = main(["train", "irn", "--data", str(root), "--split", "train", "--cams", str(tmp_path / "nope"),
               "--out", str(tmp_path / "o"), "--backbone", "tiny", "--crf", "off", "--device", "cpu"])
    assert rc == 2
    assert "CAM folder not found" in capsys.readouterr().err


@pytest.mark.parametrize("backbone", ["tiny", "tiny-s8"])
def test_boundary_net_is_at_stride_4_for_either_tiny_backbone(backbone):
    from wsclip.models.irn import build_irn

    net = build_irn(backbone).eval()
    with torch.no_grad():
        for hw in ((64, 64), (50, 37)):
            assert net(torch.randn(2, 3, *hw)).shape == (2, 1, -(-hw[0] // 4), -(-hw[1] // 4))
