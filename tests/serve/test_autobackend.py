"""`--backend`: the PyTorch variants agree with eager fp32; auto keeps only variants within parity, remembers its choice."""

import json

import numpy as np
import pytest
import torch

from wsclip.errors import WsclipError
from wsclip.label.backends import VARIANTS, Variant, cpu_has_bf16, torch_threads
from wsclip.serve.autobackend import CACHE_FILE, PARITY_TOLERANCE, _passes, probe
from wsclip.serve.labelers import LabelerConfig, load_labeler
from wsclip.vocab import VOC_CLASSES


def _scores(ref):
    from wsclip.export.parity import decision_scores

    return decision_scores({"model": "camnet", "config": {"bg_threshold": 0.15}}, ref)


@pytest.mark.parametrize("name", ["channels-last", "bf16"])
def test_variants_match_eager_within_their_tolerance(cam_ckpt, name):
    from wsclip.label.cam_labeler import load_cam_labeler

    module = load_cam_labeler(cam_ckpt)
    x = torch.randint(0, 256, (2, 3, 37, 51), dtype=torch.uint8)  # odd sizes
    ref_cams, ref_mask = Variant(module, "eager", "cpu")(x)
    var = Variant(module, name, "cpu", copy_module=True)
    cams, mask = var(x)
    assert cams.dtype == torch.float32 and mask.shape == ref_mask.shape
    err = float((cams - ref_cams).abs().max() / ref_cams.abs().max())
    if name == "bf16":  # a random network in bf16 drifts (up to ~15% here): auto's parity check rejects that
        assert 0 < err < 0.5 and (mask == ref_mask).float().mean() > 0.8
    else:
        assert err <= PARITY_TOLERANCE[name]
    # the original module is untouched by the copy's conversion
    assert next(module.parameters()).is_contiguous() and torch.equal(Variant(module, "eager", "cpu")(x)[0], ref_cams)


def test_probe_keeps_only_passing_variants_and_auto_remembers(cam_ckpt, tmp_path, monkeypatch):
    from wsclip.label.cam_labeler import load_cam_labeler

    module = load_cam_labeler(cam_ckpt)
    x = torch.randint(0, 256, (1, 3, 45, 33), dtype=torch.uint8)
    rep = probe(module, x, module.output_names, _scores, rounds=2)
    assert rep["variants"]["eager"]["ok"] and set(rep["variants"]) == {"eager", "channels-last"} | (
        {"bf16"} if cpu_has_bf16() else set())
    assert rep["choice"] in [n for n, v in rep["variants"].items() if v["ok"]]
    cl = rep["variants"]["channels-last"]
    assert cl["errors"]["cams"]["max_rel"] <= PARITY_TOLERANCE["channels-last"] and cl["ok"]
    # the parity rule: a score error above the tolerance or a decisive mask pixel that differs fails
    assert _passes({"cams": {"max_rel": 1e-5}, "mask": {"agreement": 0.99, "decisive_agreement": 1.0}}, 1e-4)
    assert not _passes({"cams": {"max_rel": 2e-4}}, 1e-4)
    assert not _passes({"mask": {"agreement": 0.99, "decisive_agreement": 0.999}}, 1e-2)
    assert not _passes({"cams": {"max_rel": float("nan")}}, 1e-2)

    monkeypatch.setenv("WSCLIP_CACHE", str(tmp_path / "cache"))
    lab = load_labeler(LabelerConfig(model=str(cam_ckpt), device="cpu"))
    images = [np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)]
    y = [np.eye(len(VOC_CLASSES), dtype=np.float32)[4]]
    first = lab.label_batch(images, y)[0]
    table = json.loads((tmp_path / "cache" / CACHE_FILE).read_text())
    (entry,) = table.values()
    assert lab.variant == entry["choice"] and entry["choice"] in entry["passed"]
    again = load_labeler(LabelerConfig(model=str(cam_ckpt), device="cpu"))
    assert np.array_equal(again.label_batch(images, y)[0].mask, first.mask)
    assert again.variant == lab.variant and again._variants.report is None  # remembered: no second probe
    assert again.describe()["variant"] == lab.variant


def test_explicit_backends_and_errors(cam_ckpt):
    images = [np.random.default_rng(1).integers(0, 256, (33, 47, 3), dtype=np.uint8)]
    y = [np.eye(len(VOC_CLASSES), dtype=np.float32)[2]]
    ref = load_labeler(LabelerConfig(model=str(cam_ckpt), device="cpu", backend="eager")).label_batch(images, y)[0]
    lab = load_labeler(LabelerConfig(model=str(cam_ckpt), device="cpu", backend="channels-last"))
    got = lab.label_batch(images, y, want_cams=True)[0]
    assert lab.variant == "channels-last" and (got.mask == ref.mask).mean() > 0.999
    with pytest.raises(WsclipError, match="unknown backend"):
        load_labeler(LabelerConfig(model=str(cam_ckpt), device="cpu", backend="tensorflow"))
    with pytest.raises(WsclipError, match="unknown backend variant"):
        Variant(torch.nn.Identity(), "nope", "cpu")
    assert set(VARIANTS) == {"eager", "channels-last", "bf16", "compile"}
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_auto_under_compat_official_never_offers_onnx_runtime(cam_ckpt, tmp_path, monkeypatch):
    """The official CAM path resizes with PIL on the host, which no exported graph computes: auto probes the
    PyTorch variants only, and its masks are those of the eager official labeler."""
    monkeypatch.setenv("WSCLIP_CACHE", str(tmp_path / "cache"))
    images = [np.random.default_rng(1).integers(0, 256, (37, 50, 3), dtype=np.uint8)]
    y = [np.eye(len(VOC_CLASSES), dtype=np.float32)[[2, 7]].sum(0)]
    cfg = LabelerConfig(model=str(cam_ckpt), device="cpu", compat="official", scales=(1.0, 0.5))
    lab = load_labeler(cfg)
    got = lab.label_batch(images, y)[0]
    assert lab.module.preprocess == "pil" and "onnxruntime" not in lab._variants.report["variants"]
    ref = load_labeler(cfg.replace(backend="eager")).label_batch(images, y)[0]
    assert (got.mask == ref.mask).mean() > 0.99


def test_auto_that_chose_onnx_runtime_runs_it_for_cam_files_too(cam_ckpt, tmp_path, monkeypatch):
    """Where ONNX Runtime won the probe, it runs the network whether or not CAMs are wanted (they were
    given to eager PyTorch at one torch thread before: 2.5x slower with the quality score on, measured);
    the masks do not depend on --cams, and the CAM file's stride-4 maps are resized from its CAMs."""
    pytest.importorskip("onnxruntime")
    from wsclip.serve import autobackend
    from wsclip.serve.batch import cam_low

    monkeypatch.setenv("WSCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(autobackend, "remembered", lambda key: "onnxruntime")  # as if a probe had chosen it
    images = [np.random.default_rng(2).integers(0, 256, (45, 61, 3), dtype=np.uint8)]
    y = [np.eye(len(VOC_CLASSES), dtype=np.float32)[[3, 11]].sum(0)]
    lab = load_labeler(LabelerConfig(model=str(cam_ckpt), device="cpu"))
    plain = lab.label_batch(images, y)[0]
    assert lab.variant == "onnxruntime" and lab.runner is not None
    calls = []
    run = lab.runner.run
    monkeypatch.setattr(lab.runner, "run", lambda x: calls.append(x.shape) or run(x))
    got = lab.label_batch(images, y, want_cams=True)[0]
    assert calls == [(1, 3, 45, 61)] and np.array_equal(got.mask, plain.mask)
    assert got.cams.shape == (2, 45, 61) and got.low is None
    low = cam_low(got)
    assert low.shape == (2, 12, 16) and np.allclose(low.max(axis=(1, 2)), 1.0, atol=1e-4)
    eager = load_labeler(LabelerConfig(model=str(cam_ckpt), device="cpu", backend="eager"))
    ref = eager.label_batch(images, y, want_cams=True)[0]
    assert (ref.mask == got.mask).mean() > 0.99 and np.abs(ref.cams - got.cams).max() < 1e-3
    # labels to predict need the module's class scores: that group runs in PyTorch, with all torch threads
    seen = []
    hook = lab.module.camnet.register_forward_hook(lambda *a: seen.append(torch.get_num_threads()))
    pred = lab.label_batch(images, [None])[0]
    hook.remove()
    assert pred.predicted and len(calls) == 1 and seen and set(seen) == {torch.get_num_threads()}
