"""Pseudo masks: scores, masks, CRF/CGL, random walk, resume after interrupt, corrupt files, CLI + eval."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsclip.cli import main
from wsclip.errors import BadFileError
from wsclip.io import read_mask
from wsclip.label.clip_es import write_cam_npz
from wsclip.label.pseudo import PseudoConfig, make_pseudo_masks, read_cams, scores_to_mask, stack_scores
from wsclip.refine.random_walk import irn_refine

IDS = ["2007_000033", "2009_000573", "2008_006874", "2010_000530"]


def _cams_from_gt(gt: np.ndarray, seed: int):
    """Blurry, slightly wrong CAMs (K, H, W) of the classes in a ground-truth mask."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    keys = [int(c) - 1 for c in np.unique(gt) if c not in (0, 255)]
    cams = []
    for k in keys:
        m = ndimage.gaussian_filter((gt == k + 1).astype(np.float32), 2.0) + 0.05 * rng.random(gt.shape)
        cams.append(m / m.max())
    return np.array(keys, np.int64), np.stack(cams).astype(np.float32)


@pytest.fixture()
def world(tmp_path, voc14):
    """A tiny VOC-layout dataset (4 resized voc14 images) and CAM files made from its ground truth."""
    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    labels = json.loads((voc14 / "labels.json").read_text())
    size = (52, 41)  # (W, H): odd sizes
    cams_dir = tmp_path / "cams"
    for n, i in enumerate(IDS):
        Image.open(voc14 / "JPEGImages" / f"{i}.jpg").resize(size, Image.BICUBIC).save(root / "JPEGImages" / f"{i}.jpg")
        Image.open(voc14 / "SegmentationClass" / f"{i}.png").resize(size, Image.NEAREST).save(
            root / "SegmentationClass" / f"{i}.png")
        gt = read_mask(root / "SegmentationClass" / f"{i}.png")
        keys, cams = _cams_from_gt(gt, n)
        write_cam_npz(cams_dir / f"{i}.npz", {"keys": keys, "high_res": cams})
    (root / "labels.json").write_text(json.dumps({i: labels[i] for i in IDS}))
    (root / "val.txt").write_text("\n".join(IDS) + "\n")
    return root, cams_dir


def test_stack_scores_and_mask():
    cams = np.array([[[0.2, 0.9]], [[0.6, 0.1]]], np.float32)  # (K=2, 1, 2)
    s = stack_scores(cams, PseudoConfig(bg="power", alpha=2.0))
    np.testing.assert_allclose(s[0], (1 - cams.max(0)) ** 2)
    np.testing.assert_array_equal(s[1:], cams)
    t = stack_scores(cams, PseudoConfig(bg="threshold", bg_threshold=0.7))
    np.testing.assert_allclose(t[0], [[0.7, 0.7]], rtol=1e-6)
    np.testing.assert_array_equal(scores_to_mask(t, [4, 11]), [[0, 5]])  # keys 0-based -> labels + 1
    np.testing.assert_array_equal(scores_to_mask(t, [4, 11], confidence=0.8), [[255, 5]])
    empty = stack_scores(np.zeros((0, 2, 3), np.float32), PseudoConfig())
    np.testing.assert_array_equal(scores_to_mask(empty, []), np.zeros((2, 3)))


def test_pseudo_masks_cli_and_eval(world, tmp_path):
    root, cams = world
    out = tmp_path / "masks"
    assert main(["pseudo", "--cams", str(cams), "--out", str(out), "--data", str(root), "--split", "val"]) == 0
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(IDS)
    with Image.open(out / f"{IDS[1]}.png") as im:
        assert im.mode == "P"
    m = read_mask(out / f"{IDS[1]}.png")
    assert set(np.unique(m)) <= {0, 2, 5}  # bicycle, bottle
    js = tmp_path / "eval.json"
    assert main(["eval", "--pred", str(out), "--gt", str(root / "SegmentationClass"), "--split", str(root / "val.txt"),
                 "--json", str(js)]) == 0
    plain = json.loads(js.read_text())["miou"]
    assert plain > 0.5
    # CRF with CGL: masks hold 255 where the posterior is below 0.95, and eval still reads them
    out2 = tmp_path / "masks_crf"
    assert main(["pseudo", "--cams", str(cams), "--out", str(out2), "--data", str(root), "--split", "val",
                 "--crf", "--cgl", "--workers", "2"]) == 0
    crf_masks = [read_mask(out2 / f"{i}.png") for i in IDS]
    assert any((m == 255).any() for m in crf_masks) and all((m != 255).any() for m in crf_masks)
    assert main(["eval", "--pred", str(out2), "--gt", str(root / "SegmentationClass")]) == 0
    # `wsclip refine crf` is the same CRF alone
    out3 = tmp_path / "masks_refine_crf"
    assert main(["refine", "crf", "--cams", str(cams), "--out", str(out3), "--data", str(root), "--split", "val",
                 "--cgl", "--workers", "1"]) == 0
    for i, m in zip(IDS, crf_masks):
        np.testing.assert_array_equal(read_mask(out3 / f"{i}.png"), m)
    assert main(["refine", "crf", "--cams", str(cams), "--out", str(out3)]) == 2  # no images


def test_interrupt_and_resume(world, tmp_path):
    root, cams = world
    out = tmp_path / "masks"
    seen = []

    def stop_after_two(image_id):
        seen.append(image_id)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_pseudo_masks(cams, out, data=str(root), split="val", on_image=stop_after_two)
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert len(done) == 2 and not list(out.glob(".*"))  # no temporary leftovers
    res = make_pseudo_masks(cams, out, data=str(root), split="val")
    assert res == {"written": 2, "skipped": 2, "failed": [], "total": 4}
    assert {n: (out / n).stat().st_mtime_ns for n in done} == done  # the first two were not redone


def test_corrupt_cam_file_skip_or_fail(world, tmp_path, capsys):
    root, cams = world
    bad = cams / f"{IDS[2]}.npz"
    bad.write_bytes(b"PK\x03\x04 this is not a zip")
    out = tmp_path / "masks"
    res = make_pseudo_masks(cams, out, data=str(root), split="val", cfg=PseudoConfig(on_error="skip"))
    assert res["written"] == 3 and [f[0] for f in res["failed"]] == [IDS[2]]
    assert str(bad) in res["failed"][0][1]
    assert not (out / f"{IDS[2]}.png").exists()
    with pytest.raises(BadFileError, match=IDS[2]):
        make_pseudo_masks(cams, tmp_path / "m2", data=str(root), split="val", cfg=PseudoConfig(on_error="fail"))
    capsys.readouterr()
    assert main(["pseudo", "--cams", str(cams), "--out", str(tmp_path / "m3"), "--on-error", "fail"]) == 2
    assert IDS[2] in capsys.readouterr().err
    assert main(["pseudo", "--cams", str(cams), "--out", str(tmp_path / "m4"), "--on-error", "skip"]) == 0
    captured = capsys.readouterr()
    assert f"failed {IDS[2]}" in captured.out and "wrote 3 masks" in captured.out
    # a CAM file whose maps do not fit the image is reported too
    keys, cams_ = read_cams(cams / f"{IDS[0]}.npz")["keys"], np.zeros((1, 7, 9), np.float32)
    write_cam_npz(cams / f"{IDS[0]}.npz", {"keys": keys[:1], "high_res": cams_})
    res = make_pseudo_masks(cams, tmp_path / "m5", data=str(root), split="val",
                            cfg=PseudoConfig(on_error="skip", crf=True, workers=1))
    assert {f[0] for f in res["failed"]} == {IDS[0], IDS[2]}


def test_random_walk_from_edge_folder(world, tmp_path):
    root, cams = world
    edges = tmp_path / "edges"
    edges.mkdir()
    rng = np.random.default_rng(0)
    for i in IDS:
        np.save(edges / f"{i}.npy", (rng.random((11, 13)) ** 4).astype(np.float32))  # ceil(41/4) x ceil(52/4)
    out = tmp_path / "masks"
    assert main(["pseudo", "--cams", str(cams), "--out", str(out), "--edges", str(edges), "--rw-exp-times", "4"]) == 0
    # the same as calling the refinement directly
    z = read_cams(cams / f"{IDS[1]}.npz")
    x = torch.nn.functional.interpolate(torch.from_numpy(z["cams"])[None], size=(11, 13), mode="bilinear",
                                        align_corners=False)[0]
    _, labels = irn_refine(x, torch.from_numpy(np.load(edges / f"{IDS[1]}.npy")), exp_times=4, size=(41, 52))
    lut = np.concatenate([[0], z["keys"] + 1])
    np.testing.assert_array_equal(read_mask(out / f"{IDS[1]}.png"), lut[labels.numpy()])
    assert main(["refine", "rw", "--cams", str(cams), "--out", str(tmp_path / "x")]) == 2  # no boundary source


def test_crf_option_without_extra_names_it(world, tmp_path, monkeypatch, capsys):
    root, cams = world
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    assert main(["pseudo", "--cams", str(cams), "--out", str(tmp_path / "m"), "--data", str(root), "--split", "val",
                 "--crf"]) == 2
    assert "wsclip[crf]" in capsys.readouterr().err
    assert not list(tmp_path.glob("m/*.png"))  # it failed before writing anything


def test_ties_go_to_background_then_to_the_lower_class_and_confidence_equal_is_kept():
    """Decided rules (the public code's np.argmax / `confidence < 0.95`): a class score equal to the background
    score is background; equal class scores go to the first key; a max score equal to --confidence is kept."""
    cams = np.array([[[0.15, 0.5, 0.25]], [[0.10, 0.5, 0.25]]], np.float32)  # (2 classes, 1, 3), exact binary values
    keys = np.array([4, 1])
    scores = stack_scores(cams, PseudoConfig(bg="threshold", bg_threshold=0.15))
    np.testing.assert_array_equal(scores_to_mask(scores, keys), [[0, 5, 5]])
    scores = stack_scores(cams, PseudoConfig(bg="power", alpha=1.0))  # background 1 - max: 0.85, 0.5, 0.75
    np.testing.assert_array_equal(scores_to_mask(scores, keys), [[0, 0, 0]])
    # confidence: 0.5 == 0.5 is kept, 0.25 < 0.5 is not
    probs = np.array([[[0.5, 0.25]], [[0.5, 0.25]], [[0.0, 0.5]]], np.float32)
    np.testing.assert_array_equal(scores_to_mask(probs, keys, confidence=0.5), [[0, 2]])
    np.testing.assert_array_equal(scores_to_mask(probs, keys, confidence=0.75), [[255, 255]])


def _public_crf_mask(rgb, keys, cams):
    """The public eval_cam_with_crf.py on one image (rewritten from its documented behaviour): OpenCV BGR image
    minus the BGR mean cast to uint8, unary -log(clip(P, 1e-5)), the CLIP-ES kernels, argmax, posterior < 0.95 -> 255."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    image = np.ascontiguousarray(rgb[..., ::-1]).astype(np.float32)
    image -= (104.008, 116.669, 122.675)
    image = np.ascontiguousarray(image.astype(np.uint8))
    prob = np.concatenate([1 - cams.max(0, keepdims=True), cams])
    c, h, w = prob.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(prob)))
    d.addPairwiseGaussian(sxy=1, compat=3)
    d.addPairwiseBilateral(sxy=67, srgb=3, rgbim=image, compat=4)
    q = np.array(d.inference(10)).reshape(c, h, w)
    label = np.pad(keys + 1, (1, 0))[q.argmax(0)]
    label[q.max(0) < 0.95] = 255
    return label.astype(np.uint8)


def test_compat_official_pseudo_masks_are_the_public_crf_and_eval_counts_255_as_background(world, tmp_path):
    from wsclip.io import read_image

    root, cams = world
    out = tmp_path / "official"
    argv = ["pseudo", "--cams", str(cams), "--data", str(root), "--split", "val", "--crf", "--cgl", "--workers", "1"]
    assert main([*argv, "--out", str(out), "--compat", "official"]) == 0
    assert main([*argv, "--out", str(tmp_path / "flag"), "--crf-uint8-wrap"]) == 0
    preds, gts = [], []
    for i in IDS:
        z = read_cams(cams / f"{i}.npz")
        want = _public_crf_mask(read_image(root / "JPEGImages" / f"{i}.jpg"), z["keys"], z["cams"])
        got = read_mask(out / f"{i}.png")
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(read_mask(tmp_path / "flag" / f"{i}.png"), got)
        preds.append(got)
        gts.append(read_mask(root / "SegmentationClass" / f"{i}.png"))
    assert any((p == 255).any() for p in preds)
    # wsclip eval: predicted 255 is background by default and under --compat official, as the CLIMS evaluation
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
    from test_metrics import _public_clims_miou

    res = {}
    for name, extra in (("default", []), ("official", ["--compat", "official"]), ("miss", ["--pred-ignore", "miss"]),
                        ("ignore", ["--pred-ignore", "ignore"])):
        js = tmp_path / f"{name}.json"
        assert main(["eval", "--pred", str(out), "--gt", str(root / "SegmentationClass"), "--split",
                     str(root / "val.txt"), "--json", str(js), *extra]) == 0
        res[name] = json.loads(js.read_text())
    public = _public_clims_miou(preds, gts, 21)
    assert res["default"]["miou"] == pytest.approx(public, abs=1e-12) == res["official"]["miou"]
    assert abs(res["miss"]["miou"] - res["default"]["miou"]) > 1e-4  # the policy matters here
    valid = sum(int((g != 255).sum()) for g in gts)
    kept = sum(int(((g != 255) & (p != 255)).sum()) for p, g in zip(preds, gts))
    assert res["default"]["coverage"] == pytest.approx(kept / valid) and kept < valid
    assert res["default"]["miou_kept"] == pytest.approx(res["ignore"]["miou"])
