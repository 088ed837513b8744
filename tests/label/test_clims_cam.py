"""Multi-scale CAM inference (`wsclip cam --method clims`), resume, and `wsclip eval-cam`."""

import json

import numpy as np
import pytest

import torch
import torch.nn.functional as F

from job_helpers import stop_after
from wsclip.cli import main
from wsclip.errors import WsclipError
from wsclip.eval.metrics import ConfusionMatrix
from wsclip.label.clims_cam import (cam_maps, evaluate_cams, make_cams, parse_thresholds,
                                    read_cam_file, write_cam_file)
from wsclip.models.camnet import build_camnet, save_camnet


def _reference_cam(net, image, scales, keys):
    """Plain per-scale, per-flip, per-class loop of the METHODS.md section 2 rule (bilinear everywhere)."""
    h, w = image.shape[:2]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    x = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - mean) / std
    low = torch.zeros(len(keys), (h + 3) // 4, (w + 3) // 4)
    high = torch.zeros(len(keys), h, w)
    for s in scales:
        xs = x[None] if s == 1.0 else F.interpolate(x[None], scale_factor=s, mode="bilinear", align_corners=False)
        with torch.no_grad():
            a = F.relu(net(xs))[0]
            b = F.relu(net(xs.flip(-1)))[0].flip(-1)
        for n, k in enumerate(keys):
            for m in (a[k][None, None], b[k][None, None]):
                low[n] += F.interpolate(m, low.shape[1:], mode="bilinear", align_corners=False)[0, 0]
                high[n] += F.interpolate(m, (h, w), mode="bilinear", align_corners=False)[0, 0]
    for t in (low, high):
        for n in range(len(keys)):
            t[n] /= t[n].max() + 1e-5
    return low, high


def _official_cam(net, image, scales, keys, stride=16):
    """The public IRN/CLIMS `make_cam`, written out: PIL bicubic per scale on the uint8 image, then
    ImageNet normalisation; relu maps + their flips, bilinear to the stride-4 size and to the padded
    stride grid cropped to the image."""
    from PIL import Image

    h, w = image.shape[:2]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    low = torch.zeros(len(keys), (h + 3) // 4, (w + 3) // 4)
    high = torch.zeros(len(keys), h, w)
    up_size = (-(-h // stride) * stride, -(-w // stride) * stride)
    for s in scales:
        im = image if s == 1.0 else np.array(Image.fromarray(image).resize((round(w * s), round(h * s)), Image.BICUBIC))
        x = (torch.from_numpy(im).permute(2, 0, 1).float() / 255 - mean) / std
        with torch.no_grad():
            a = F.relu(net(x[None]))[0]
            b = F.relu(net(x.flip(-1)[None]))[0].flip(-1)
        for n, k in enumerate(keys):
            m = (a[k] + b[k])[None, None]
            low[n] += F.interpolate(m, low.shape[1:], mode="bilinear", align_corners=False)[0, 0]
            high[n] += F.interpolate(m, up_size, mode="bilinear", align_corners=False)[0, 0, :h, :w]
    for t in (low, high):
        for n in range(len(keys)):
            t[n] /= t[n].max() + 1e-5
    return low, high


@pytest.mark.parametrize("hw", [(37, 50), (64, 31)])
def test_cam_maps_official_preprocess_matches_public_make_cam(hw):
    """--compat official (preprocess 'pil') is the public code's CAM, to float tolerance; wsclip's own
    (bilinear on the device) differs from it."""
    net = build_camnet("tiny", num_classes=5).eval()
    image = np.random.default_rng(1).integers(0, 256, (*hw, 3), dtype=np.uint8)
    scales = (1.0, 0.5, 1.5, 2.0)
    low, high = cam_maps(net, image, [0, 3], scales, preprocess="pil")
    ref_low, ref_high = _official_cam(net, image, scales, [0, 3])
    torch.testing.assert_close(low, ref_low, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(high, ref_high, rtol=1e-4, atol=1e-5)
    own = cam_maps(net, image, [0, 3], scales)[1]
    assert (own - high).abs().max() > 1e-3


@pytest.mark.parametrize("hw", [(37, 50), (64, 31)])
def test_cam_maps_match_plain_loop(hw):
    net = build_camnet("tiny", num_classes=5).eval()
    image = np.random.default_rng(0).integers(0, 256, (*hw, 3), dtype=np.uint8)
    scales = (1.0, 0.5, 1.5)
    low, high = cam_maps(net, image, [1, 4], scales)
    ref_low, ref_high = _reference_cam(net, image, scales, [1, 4])
    torch.testing.assert_close(low, ref_low, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(high, ref_high, rtol=1e-4, atol=1e-5)
    assert torch.all(high.amax(dim=(1, 2)) <= 1) and torch.all(high >= 0)
    empty_low, empty_high = cam_maps(net, image, [], (1.0,))
    assert empty_low.shape == (0, *low.shape[1:]) and empty_high.shape == (0, *hw)


def test_cam_files_on_voc14_resume_and_eval(voc14, tmp_path):
    labels = json.loads((voc14 / "labels.json").read_text())
    ckpt = tmp_path / "cam.safetensors"
    torch.manual_seed(0)
    save_camnet(ckpt, build_camnet("tiny", num_classes=20), [f"c{i}" for i in range(20)])
    out = tmp_path / "cams"

    with pytest.raises(KeyboardInterrupt):
        make_cams(ckpt, str(voc14), out, split="val", scales=(0.5, 0.25), device="cpu", num_workers=2,
                  on_image=stop_after(5, []))
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz")}
    assert len(first) == 5 and not list(out.glob(".*tmp*"))

    rc = main(["cam", "--method", "clims", "--checkpoint", str(ckpt), "--data", str(voc14), "--split", "val",
               "--out", str(out), "--scales", "0.5,0.25", "--workers", "0", "--device", "cpu"])
    assert rc == 0
    files = sorted(out.glob("*.npz"))
    assert len(files) == 14
    assert {p.name: p.stat().st_mtime_ns for p in files if p.name in first} == first  # not redone
    for p in files:
        z = read_cam_file(p)
        assert sorted(z["keys"].tolist()) == sorted(k - 1 for k in labels[p.stem])
        assert z["cam"].dtype == np.float16 and z["high_res"].dtype == np.float16
        assert z["cam"].shape == (len(z["keys"]), 129, 129) and z["high_res"].shape == (len(z["keys"]), 513, 513)
        assert np.isfinite(z["high_res"]).all() and z["high_res"].max() <= 1.0 and z["high_res"].min() >= 0
    res = make_cams(ckpt, str(voc14), out, split="val", scales=(0.5, 0.25), device="cpu", num_workers=0)
    assert res == {"written": 0, "skipped": 14, "failed": [], "total": 14}
    # other scales into the same folder would mix single- and multi-scale files: refused (issue 15)
    with pytest.raises(WsclipError, match="other settings.*scales"):
        make_cams(ckpt, str(voc14), out, split="val", scales=(0.5,), device="cpu", num_workers=0)

    # eval-cam over a threshold sweep: the random net's figures, and the CLI table
    rc = main(["eval-cam", "--cams", str(out), "--gt", str(voc14 / "SegmentationClass"),
               "--thresholds", "0.1:0.3:0.1", "--json", str(tmp_path / "ev.json")])
    assert rc == 0
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert list(ev["miou"]) == ["0.1", "0.2", "0.3"] and all(0 <= v <= 1 for v in ev["miou"].values())


def test_eval_cams_threshold_rule_matches_argmax_and_perfect_cams(tmp_path):
    rng = np.random.default_rng(1)
    cams, gts = tmp_path / "cams", tmp_path / "gt"
    from wsclip.io import write_mask

    expected = {t: ConfusionMatrix(6) for t in (0.2, 0.5)}
    for n in range(4):
        gt = rng.integers(0, 6, (9, 11)).astype(np.uint8)
        gt[0, 0] = 255
        keys = np.array(sorted(rng.choice(5, size=n % 3 + 1, replace=False)))
        high = rng.random((len(keys), 9, 11)).astype(np.float16)
        write_cam_file(cams / f"im{n}.npz", keys, high[:, ::4, ::4], high)
        write_mask(gts / f"im{n}.png", gt)
        for t, cm in expected.items():
            scores = np.concatenate([np.full((1, 9, 11), t, np.float32), high.astype(np.float32)])
            cm.update(np.concatenate([[0], keys + 1])[scores.argmax(0)], gt)
    got = evaluate_cams(cams, gts, [0.2, 0.5], num_classes=6)
    for t in (0.2, 0.5):
        np.testing.assert_array_equal(got[t].mat, expected[t].mat)

    # CAMs equal to one-hot ground truth are perfect at any threshold in [0, 1)
    perfect = tmp_path / "perfect"
    gt = np.zeros((8, 8), np.uint8)
    gt[2:5, 1:6] = 3
    gt[6:, 6:] = 1
    onehot = np.stack([(gt == 1), (gt == 3)]).astype(np.float16)
    write_cam_file(perfect / "a.npz", [0, 2], onehot[:, ::4, ::4], onehot)
    write_mask(tmp_path / "g2" / "a.png", gt)
    assert evaluate_cams(perfect, tmp_path / "g2", [0.05, 0.95], num_classes=21)[0.05].miou() == 1.0


def test_thresholds_parse():
    assert parse_thresholds("0.05:0.6:0.05") == pytest.approx([0.05 * i for i in range(1, 13)])
    assert parse_thresholds("0.1,0.15") == [0.1, 0.15]
    from wsclip.errors import WsclipError

    with pytest.raises(WsclipError):
        parse_thresholds("0.5:0.1:0.1")


def test_cam_cli_errors(voc14, tmp_path, capsys):
    ckpt = tmp_path / "cam.safetensors"
    save_camnet(ckpt, build_camnet("tiny", num_classes=3), ["a", "b", "c"])
    rc = main(["cam", "--checkpoint", str(ckpt), "--data", str(voc14), "--split", "val", "--out", str(tmp_path / "o")])
    assert rc == 2 and "3 classes" in capsys.readouterr().err
    rc = main(["cam", "--data", str(voc14), "--out", str(tmp_path / "o")])
    assert rc == 2 and "--checkpoint" in capsys.readouterr().err


def test_resnet50_random_on_one_image(voc14, tmp_path):
    from wsclip.data import open_dataset

    ds = open_dataset(str(voc14), split="val", masks=False)
    ds.ids = ds.ids[:1]
    net = build_camnet("resnet50", num_classes=20)
    res = make_cams(net, ds, tmp_path, scales=(0.5,), device="cpu", num_workers=0)
    assert res["written"] == 1
    z = read_cam_file(tmp_path / f"{ds.ids[0]}.npz")
    assert z["high_res"].shape[1:] == (513, 513) and z["cam"].shape[1:] == (129, 129)


def test_eval_cam_threshold_tie_is_background(tmp_path):
    """A CAM value equal to the background threshold is background (argmax over [t, cams] picks t first)."""
    from wsclip.io import write_mask
    from wsclip.label.clims_cam import write_cam_file

    high = np.array([[[0.25, 0.5, 0.125]]], np.float32)  # exact in float16 too
    write_cam_file(tmp_path / "cams" / "a.npz", np.array([2]), high, high)
    write_mask(tmp_path / "gt" / "a.png", np.array([[3, 3, 0]], np.uint8))
    cms = evaluate_cams(tmp_path / "cams", tmp_path / "gt", [0.25, 0.125], num_classes=4)
    np.testing.assert_array_equal(cms[0.25].mat[3], [1, 0, 0, 1])  # 0.25 at t = 0.25 -> background
    np.testing.assert_array_equal(cms[0.125].mat[[0, 3]], [[1, 0, 0, 0], [0, 0, 0, 2]])


def test_cam_job_compat_official_writes_the_public_make_cam(voc14, tmp_path):
    """`wsclip cam --compat official` on real VOC images: the files hold the public code's CAMs; the
    settings fingerprint refuses resuming the folder in wsclip's mode."""
    from wsclip.io import read_image

    torch.manual_seed(0)
    ckpt = tmp_path / "cam.safetensors"
    net = build_camnet("tiny", num_classes=20)
    save_camnet(ckpt, net, [f"c{i}" for i in range(20)])
    out = tmp_path / "cams"
    assert main(["cam", "--checkpoint", str(ckpt), "--data", str(voc14), "--split", "val", "--out", str(out),
                 "--scales", "0.5,0.25", "--workers", "0", "--device", "cpu", "--compat", "official"]) == 0
    image_id = sorted(p.stem for p in out.glob("*.npz"))[0]
    z = read_cam_file(out / f"{image_id}.npz")
    image = read_image(voc14 / "JPEGImages" / f"{image_id}.jpg")
    ref_low, ref_high = _official_cam(net.eval(), image, (0.5, 0.25), z["keys"].tolist())
    np.testing.assert_allclose(z["cam"].astype(np.float32), ref_low.numpy(), atol=1e-3)
    np.testing.assert_allclose(z["high_res"].astype(np.float32), ref_high.numpy(), atol=1e-3)
    assert main(["cam", "--checkpoint", str(ckpt), "--data", str(voc14), "--split", "val", "--out", str(out),
                 "--scales", "0.5,0.25", "--workers", "0", "--device", "cpu"]) == 2  # other settings: refused
