"""The per-mask quality score: each signal on masks built to show it, the score's order, IoU, pseudo's quality.json."""

import json

import numpy as np
import pytest

from wsclip.errors import ShapeError
from wsclip.eval.metrics import ConfusionMatrix
from wsclip.label.quality import (assess, format_worst, image_iou, quality_score, quality_signals, worst_first)


def _square(h, w, y0, y1, x0, x1, v=1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = v
    return m


def test_dropped_crf_and_degenerate_signals_count_what_they_say():
    m = _square(10, 20, 2, 8, 3, 9, v=2)  # class 1 (value 2) on 36 of 200 pixels
    m[0, :5] = 255
    sig = quality_signals(m, keys=[1, 4])  # class 4 labelled but empty
    assert sig["dropped"] == pytest.approx(5 / 200)
    assert sig["coverage"] == pytest.approx(36 / 200)
    assert sig["crf_changed"] is None and sig["blur"] is None
    assert sig["degenerate"] == pytest.approx(0.5)
    assert sig["area"] == {"1": pytest.approx(36 / 200), "4": 0.0}
    before = m.copy()
    before[2:4, 3:9] = 0  # the CRF grew the object by 12 pixels
    sig = quality_signals(m, [1], mask_before=before)
    assert sig["crf_changed"] == pytest.approx(12 / 195)  # over the 195 kept pixels
    whole = np.full((7, 9), 3, np.uint8)
    assert quality_signals(whole, [2])["degenerate"] == 1.0
    assert quality_signals(np.zeros((4, 4), np.uint8), [])["degenerate"] == 0.0


def test_blur_is_low_for_a_cam_that_separates_its_mask_and_high_for_a_flat_one():
    rng = np.random.default_rng(0)
    m = _square(33, 47, 5, 20, 10, 30)
    sharp = (m == 1).astype(np.float32) * 0.9 + 0.05 * rng.random(m.shape).astype(np.float32)
    flat = np.full(m.shape, 0.6, np.float32) + 0.05 * rng.random(m.shape).astype(np.float32)
    s_sharp = quality_signals(m, [0], cams=sharp[None])
    s_flat = quality_signals(m, [0], cams=flat[None])
    assert s_sharp["blur"] < 0.2 < 0.9 < s_flat["blur"]
    assert quality_score(s_sharp) > quality_score(s_flat)
    # CAMs at another resolution are resized to the mask
    small = sharp[::3, ::3]
    assert quality_signals(m, [0], cams=small[None])["blur"] < 0.4


def test_score_is_one_minus_the_weighted_mean_of_the_signals_present():
    assert quality_score({"dropped": 0.0, "crf_changed": None, "blur": None, "degenerate": 0.0}) == 1.0
    assert quality_score({"dropped": 0.5, "crf_changed": 0.1, "blur": 0.3, "degenerate": 0.0,
                          "coverage": 0.6}) == pytest.approx(0.7)
    assert quality_score({"dropped": 0.5}, weights={"dropped": 2.0, "blur": 1.0}) == pytest.approx(0.5)
    assert quality_score({}) == 1.0


def test_image_iou_is_the_confusion_matrix_rule_on_one_image():
    rng = np.random.default_rng(1)
    for h, w in ((1, 1), (17, 29), (64, 48)):
        gt = rng.integers(0, 4, (h, w)).astype(np.uint8)
        gt[rng.random((h, w)) < 0.1] = 255
        pred = np.where(rng.random((h, w)) < 0.7, gt, rng.integers(0, 4, (h, w))).astype(np.uint8)
        pred[rng.random((h, w)) < 0.05] = 255
        out = image_iou(pred, gt, 4)
        cm = ConfusionMatrix(4).update(pred, gt)
        ref = {str(v): x for v, x in enumerate(cm.iou()) if not np.isnan(x)}
        assert out["iou"].keys() == ref.keys()
        for k in ref:
            assert out["iou"][k] == pytest.approx(ref[k], abs=1e-6)
        assert out["miou"] == pytest.approx(np.mean(list(ref.values())), abs=1e-6) if ref else out["miou"] is None
    # by hand: class 1 predicted on 4 pixels, true on 2 of them and 2 more
    gt = np.array([[1, 1, 0, 0], [1, 1, 0, 0]], np.uint8)
    pred = np.array([[1, 1, 1, 1], [0, 0, 0, 0]], np.uint8)
    assert image_iou(pred, gt, 2)["iou"] == {"0": pytest.approx(2 / 6), "1": pytest.approx(2 / 6)}
    with pytest.raises(ShapeError):
        image_iou(pred, gt[:, :3], 2)


def test_assess_adds_iou_with_ground_truth_and_worst_first_sorts_by_score():
    m = _square(8, 8, 0, 4, 0, 4)
    q = assess(m, [0], gt=m, num_classes=3)
    assert q["miou"] == 1.0 and q["iou"] == {"0": 1.0, "1": 1.0}
    with pytest.raises(ValueError):
        assess(m, [0], gt=m)
    recs = [{"id": "b", "quality": {"score": 0.5}}, {"id": "a", "quality": {"score": 0.5}},
            {"id": "c", "quality": {"score": 0.1}}, {"id": "d"}, {"id": "e", "quality": {"score": 0.9}}]
    assert [r["id"] for r in worst_first(recs)] == ["c", "a", "b", "e"]
    assert [r["id"] for r in worst_first(recs, 2)] == ["c", "a"]
    table = format_worst(worst_first(recs, 2))
    assert table.splitlines()[1].split()[-1] == "c" and len(table.splitlines()) == 3


def test_pseudo_writes_quality_json_and_resumes_it(tmp_path):
    from wsclip.label.clims_cam import write_cam_file
    from wsclip.label.pseudo import QUALITY_FILE, PseudoConfig, make_pseudo_masks

    rng = np.random.default_rng(2)
    cams = tmp_path / "cams"
    for n in range(3):
        keys = np.array([n, 5], np.int64)
        hi = rng.random((2, 21, 26)).astype(np.float32)
        if n == 2:
            hi[:] = 0.01  # nothing above the background: both classes empty
        write_cam_file(cams / f"im{n}.npz", keys, hi[:, ::4, ::4], hi)
    out = tmp_path / "pseudo"
    make_pseudo_masks(cams, out, cfg=PseudoConfig(confidence=0.7, workers=0))
    q = json.loads((out / QUALITY_FILE).read_text())
    assert sorted(q) == ["im0", "im1", "im2"]
    from wsclip.io import read_mask

    m = read_mask(out / "im0.png")
    assert q["im0"]["dropped"] == pytest.approx(float((m == 255).mean()), abs=1e-6)
    assert q["im2"]["degenerate"] == 1.0 and q["im2"]["score"] < q["im0"]["score"]
    (out / "im1.png").unlink()
    make_pseudo_masks(cams, out, cfg=PseudoConfig(confidence=0.7, workers=0))  # resumes: only im1 again
    assert sorted(json.loads((out / QUALITY_FILE).read_text())) == ["im0", "im1", "im2"]


def test_quality_rank_benchmark_runs_tiny(tmp_path):
    """benchmarks/quality_rank.py end to end on toy sizes: its JSON has both runs and every field (figures mean nothing)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("quality_rank", root / "benchmarks" / "quality_rank.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "q.json"
    assert mod.main(["--tiny", "--work", str(tmp_path / "work"), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["tiny"] and res["labelled"] == 10
    for run in ("label", "pseudo"):
        assert res[run]["score"]["n"] == 10 and res[run]["score"]["decile"] == 1
        assert 0.0 <= res[run]["score"]["worst_decile_found"] <= 1.0
        assert set(res[run]) >= {"signal_coverage", "signal_crf_changed", "signal_blur", "signal_degenerate"}
    recs = [json.loads(ln) for ln in (tmp_path / "work" / "label" / "manifest.jsonl").read_text().splitlines()]
    assert all(r["quality"]["miou"] is not None and r["quality"]["crf_changed"] is not None for r in recs)
