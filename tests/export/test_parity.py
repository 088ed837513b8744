"""`wsclip export check`: parity report on random and real inputs, tolerances, near-ties, CLI exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wsclip.cli import main
from wsclip.errors import BadFileError, WsclipError
from wsclip.export.parity import check_parity, compare_outputs, decision_scores


def test_voc14_fp32_cam_labeler_full_agreement(cam_onnx, cam_ckpt, voc14, tmp_path, capsys):
    """The 14 real VOC images through the CLI: 100% agreement of the argmax on every decisive pixel."""
    report_path = tmp_path / "report.json"
    rc = main(["export", "check", "--onnx", str(cam_onnx), "--checkpoint", str(cam_ckpt), "--images", str(voc14),
               "--json", str(report_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "PASS" in out and "real (14 images, their labels)" in out
    report = json.loads(report_path.read_text())
    assert report["passed"] is True
    mask = report["worst"]["mask"]
    assert mask["decisive_agreement"] == 1.0 and mask["agreement"] > 0.9999
    assert mask["total"] > 14 * 500 * 300  # the real images were compared at their own sizes
    assert report["worst"]["cams"]["max_rel"] < 1e-4
    batches = {c["batch"] for c in report["cases"] if c["name"].startswith("random")}
    assert 2 not in batches  # never only the traced batch size


def test_encoders_and_default_checkpoint(clip_text_onnx, clip_image_onnx, voc14):
    text = check_parity(clip_text_onnx, n_random=2)  # checkpoint taken from the sidecar
    assert text.passed and text.worst["embeddings"]["max_rel"] < 1e-4 and len(text.cases) == 2
    image = check_parity(clip_image_onnx, images=voc14, limit=3, n_random=1)
    assert image.passed and image.cases[-1].name == "real (3 images)" and image.cases[-1].size == "32x32"
    with pytest.raises(WsclipError, match="does not apply"):
        check_parity(clip_text_onnx, images=voc14)


def test_tolerance_failure_and_exit_code(clip_image_onnx, tmp_path, capsys):
    from wsclip.export.precision import to_fp16

    fp16 = tmp_path / "clip_image.fp16.onnx"
    to_fp16(clip_image_onnx, fp16)
    loose = check_parity(fp16, tolerance=1e-2, n_random=1)
    assert loose.passed and loose.precision == "fp16"
    rc = main(["export", "check", "--onnx", str(fp16), "--tolerance", "1e-7", "--random", "1"])
    out = capsys.readouterr().out
    assert rc == 1 and "FAIL" in out


def test_wrong_checkpoint_is_refused(cam_onnx, clip_ckpt, capsys):
    with pytest.raises(BadFileError, match="not the checkpoint"):
        check_parity(cam_onnx, clip_ckpt)
    rc = main(["export", "check", "--onnx", str(cam_onnx), "--checkpoint", str(clip_ckpt)])
    assert rc == 2 and "not the checkpoint" in capsys.readouterr().err


def test_compare_outputs_counts_near_ties_apart():
    cams = np.zeros((1, 2, 2, 3), np.float32)
    cams[0, 0] = [[0.9, 0.50, 0.1], [0.3, 0.3, 0.0]]
    cams[0, 1] = [[0.1, 0.50001, 0.2], [0.7, 0.1, 0.0]]
    meta = {"model": "camnet", "config": {"bg_threshold": 0.15}}
    scores = decision_scores(meta, {"cams": cams})
    stacked = np.concatenate([np.full_like(cams[:, :1], 0.15), cams], axis=1)
    np.testing.assert_array_equal(scores((np.array([0, 0]), np.array([0, 1]), np.array([1, 0]))),
                                  stacked[0, :, [0, 1], [1, 0]])
    ref_mask = stacked.argmax(1)
    got_mask = ref_mask.copy()
    got_mask[0, 0, 1] = 1        # flips a near-tie (0.5 vs 0.50001): forgiven
    errs = compare_outputs({"cams": cams, "mask": ref_mask}, {"cams": cams + 1e-6, "mask": got_mask}, 1e-4, scores)
    assert errs["mask"]["mismatched"] == 1 and errs["mask"]["decisive_mismatched"] == 0
    assert errs["mask"]["decisive_agreement"] == 1.0 and errs["mask"]["agreement"] == pytest.approx(5 / 6)
    assert errs["cams"]["max_abs"] == pytest.approx(1e-6, rel=5e-2)
    assert errs["cams"]["max_rel"] == pytest.approx(1e-6 / 0.9, rel=5e-2)
    got_mask[0, 1, 0] = 0        # flips a decisive pixel (0.7 vs 0.3): counted
    errs = compare_outputs({"mask": ref_mask}, {"mask": got_mask}, 1e-4, stacked)  # arrays work too
    assert errs["mask"]["decisive_mismatched"] == 1 and errs["mask"]["decisive_agreement"] == pytest.approx(5 / 6)
    with pytest.raises(WsclipError, match="shape"):
        compare_outputs({"cams": cams}, {"cams": cams[:, :1]})


def test_open_labeler_gives_every_backend_the_same_interface(cam_onnx, cam_ckpt, clip_ckpt, tmp_path):
    from wsclip.export.ort import OrtRunner
    from wsclip.export.parity import open_artefact, open_labeler
    from wsclip.label.cam_labeler import CamLabeler

    torch_lab, ort_lab = open_labeler(cam_ckpt), open_labeler(cam_onnx)
    assert isinstance(torch_lab, CamLabeler) and isinstance(ort_lab, OrtRunner)
    x = np.random.default_rng(7).integers(0, 256, (2, 3, 40, 56), dtype=np.uint8)
    a, b = torch_lab.run(x), ort_lab.run(x)
    assert a.keys() == b.keys() == {"cams", "mask"}
    np.testing.assert_allclose(a["cams"], b["cams"], atol=1e-4)
    with pytest.raises(WsclipError, match="not a labeler"):
        open_labeler(clip_ckpt)
    with pytest.raises(WsclipError, match="neither"):
        open_artefact(tmp_path / "x.bin")
