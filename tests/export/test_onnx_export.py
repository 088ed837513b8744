"""ONNX export of every model kind: graph checks, sidecar contents, ONNX Runtime == PyTorch at other batch sizes/sizes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from export_helpers import RN_CFG, randomize_bn, tiny_clip

from wsclip.errors import ShapeError, WsclipError
from wsclip.export.onnx import export_onnx, export_mode, read_sidecar, sidecar_of
from wsclip.export.ort import OrtRunner
from wsclip.export.wrappers import spec_from_sidecar
from wsclip.io import file_sha256


def _rel(a, b) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-12))


def _graph_inputs(path) -> dict:
    m = onnx.load(str(path))
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}


def test_camnet_graph_and_sidecar(cam_onnx, cam_ckpt):
    meta = read_sidecar(cam_onnx)
    assert sidecar_of(cam_onnx).name == "cam.onnx.json"
    assert meta["model"] == "camnet" and meta["format"] == "onnx" and meta["opset"] >= 17
    assert [i["name"] for i in meta["inputs"]] == ["images", "labels"]
    assert [(o["name"], o["dtype"]) for o in meta["outputs"]] == [("cams", "float32"), ("mask", "int64")]
    assert meta["inputs"][0]["dtype"] == "uint8" and meta["dynamic_hw"] is True
    assert len(meta["classes"]) == 20 and meta["classes"][0] == "aeroplane"
    assert meta["normalisation"]["mean"] == [0.485, 0.456, 0.406] and meta["normalisation"]["input_scale"] == 1 / 255
    assert meta["config"]["bg_threshold"] == 0.15
    assert meta["source"]["sha256"] == file_sha256(cam_ckpt) and meta["sha256"] == file_sha256(cam_onnx)
    assert _graph_inputs(cam_onnx) == {"images": ["batch", 3, "height", "width"], "labels": ["batch", 20]}
    model = onnx.load(str(cam_onnx))
    onnx.checker.check_model(model, full_check=True)
    assert {"Resize", "ArgMax", "ReduceMax"} <= {n.op_type for n in model.graph.node}


def test_camnet_ort_matches_pytorch_other_batch_and_sizes(cam_onnx, cam_ckpt):
    runner = OrtRunner(cam_onnx)
    ref = spec_from_sidecar(read_sidecar(cam_onnx), cam_ckpt).module
    rng = np.random.default_rng(1)
    for b, h, w in ((3, 97, 61), (1, 33, 130), (5, 16, 16)):  # traced at batch 2, 64x64
        x = rng.integers(0, 256, (b, 3, h, w), dtype=np.uint8)
        y = (rng.random((b, 20)) < 0.3).astype(np.float32)
        got, want = runner.run(x, y), ref.run(x, y)
        assert got["cams"].dtype == want["cams"].dtype == np.float32
        assert got["mask"].dtype == want["mask"].dtype == np.int64
        assert got["cams"].shape == (b, 20, h, w) and got["mask"].shape == (b, h, w)
        assert _rel(got["cams"], want["cams"]) < 1e-4
        assert (got["mask"] == want["mask"]).mean() > 0.999
        off = y == 0  # unselected classes are zero maps and never win the argmax
        assert np.all(got["cams"][off] == 0) and not np.isin(np.nonzero(off)[1] + 1, got["mask"]).all()


def test_static_size_export_and_clear_size_error(cam_ckpt, tmp_path):
    path = tmp_path / "cam_static.onnx"
    meta = export_onnx("camnet", cam_ckpt, path, batch=1, hw=(48, 80), dynamic_hw=False, bg_threshold=0.3)
    assert meta["dynamic_hw"] is False and meta["inputs"][0]["shape"] == ["batch", 3, 48, 80]
    runner = OrtRunner(path)
    ref = spec_from_sidecar(meta, cam_ckpt).module
    assert ref.bg_threshold == 0.3
    x = np.random.default_rng(0).integers(0, 256, (3, 3, 48, 80), dtype=np.uint8)
    assert _rel(runner.run(x)["cams"], ref.run(x)["cams"]) < 1e-4
    with pytest.raises(ShapeError, match="fixed size"):
        runner.run(x[..., :40])


def test_multiscale_flip_labeler_exports(cam_ckpt, tmp_path):
    path = tmp_path / "cam_ms.onnx"
    meta = export_onnx("camnet", cam_ckpt, path, hw=(64, 64), scales=(1.0, 0.5), flip=True)
    assert meta["config"]["scales"] == [1.0, 0.5] and meta["config"]["flip"] is True
    ref = spec_from_sidecar(meta, cam_ckpt).module
    x = np.random.default_rng(2).integers(0, 256, (2, 3, 70, 90), dtype=np.uint8)
    got, want = OrtRunner(path).run(x), ref.run(x)
    assert _rel(got["cams"], want["cams"]) < 1e-4


def test_clip_vit_encoders(clip_image_onnx, clip_text_onnx, clip_ckpt):
    from wsclip.models.clip import load_clip

    for path in (clip_image_onnx, clip_text_onnx):
        model = onnx.load(str(path))
        ops = {n.op_type for n in model.graph.node}
        assert "LayerNormalization" in ops and "Softmax" in ops  # opset-17 LayerNorm, attention not fused away
        assert all(o.domain in ("", "ai.onnx") for o in model.opset_import)  # no custom (fast-path) ops
    img_meta, txt_meta = read_sidecar(clip_image_onnx), read_sidecar(clip_text_onnx)
    assert img_meta["inputs"] == [{"name": "images", "shape": ["batch", 3, 32, 32], "dtype": "float32"}]
    assert txt_meta["inputs"] == [{"name": "tokens", "shape": ["batch", 16], "dtype": "int32"}]
    assert img_meta["normalisation"]["mean"][0] == pytest.approx(0.48145466)

    clip = load_clip(clip_ckpt)
    x = torch.rand(3, 3, 32, 32)
    got = OrtRunner(clip_image_onnx).run(x.numpy())["embeddings"]
    want = clip.encode_image(clip.preprocess_tensor(x)).numpy()
    assert got.shape == (3, 24) and _rel(got, want) < 1e-4
    prompts = ["a photo of cat.", "a clean origami dog.", "", "x"]
    tokens = clip.tokenize(prompts).to(torch.int32)
    got = OrtRunner(clip_text_onnx).run(tokens)["embeddings"]
    want = clip.encode_text(prompts).numpy()
    assert got.shape == (4, 24) and _rel(got, want) < 1e-4


def test_clip_resnet_image_encoder(tmp_path):
    from wsclip.models.clip import save_clip

    ckpt = tmp_path / "rn.safetensors"
    save_clip(ckpt, tiny_clip(RN_CFG, seed=3), RN_CFG, "tiny-rn")
    path = tmp_path / "rn_image.onnx"
    meta = export_onnx("clip-image", ckpt, path, batch=1, input_dtype="uint8")
    x = np.random.default_rng(3).integers(0, 256, (3, 3, 64, 64), dtype=np.uint8)
    assert _rel(OrtRunner(path).run(x)["embeddings"], spec_from_sidecar(meta, ckpt).module.run(x)["embeddings"]) < 1e-4


def test_clip_image_refuses_dynamic_hw_and_other_sizes(clip_ckpt, tmp_path):
    with pytest.raises(WsclipError, match="fixed input size"):
        export_onnx("clip-image", clip_ckpt, tmp_path / "x.onnx", dynamic_hw=True)
    with pytest.raises(ShapeError, match="32x32"):
        export_onnx("clip-image", clip_ckpt, tmp_path / "x.onnx", hw=(64, 64))
    assert not (tmp_path / "x.onnx").exists()


def test_seg_labeler_export(tmp_path):
    from wsclip.models.seg import build_seg_model, save_seg_model
    from wsclip.vocab import VOC_CLASSES

    ckpt = tmp_path / "seg.safetensors"
    save_seg_model(ckpt, randomize_bn(build_seg_model("deeplabv3plus", "tiny", 21), seed=4), VOC_CLASSES)
    path = tmp_path / "seg.onnx"
    meta = export_onnx("seg", ckpt, path, hw=(64, 64))
    assert [o["name"] for o in meta["outputs"]] == ["probs", "mask"] and meta["outputs"][0]["shape"][1] == 21
    x = np.random.default_rng(4).integers(0, 256, (3, 3, 75, 53), dtype=np.uint8)
    got, want = OrtRunner(path).run(x), spec_from_sidecar(meta, ckpt).module.run(x)
    assert got["probs"].shape == (3, 21, 75, 53)
    assert _rel(got["probs"], want["probs"]) < 1e-4 and (got["mask"] == want["mask"]).mean() > 0.999
    np.testing.assert_allclose(got["probs"].sum(1), 1.0, atol=1e-5)


def test_seg_multiscale_flip_export_from_the_cli(tmp_path, capsys):
    from wsclip.cli import main
    from wsclip.models.seg import build_seg_model, save_seg_model

    ckpt = tmp_path / "seg.safetensors"
    save_seg_model(ckpt, randomize_bn(build_seg_model("deeplabv2", "tiny", 4), seed=6), ["a", "b", "c"])
    path = tmp_path / "seg.onnx"
    assert main(["export", "onnx", "--model", "seg", "--checkpoint", str(ckpt), "--out", str(path),
                 "--size", "48", "--scales", "1.0,0.5", "--flip"]) in (0, None)
    meta = json.loads(path.with_name(path.name + ".json").read_text())
    assert meta["config"]["scales"] == [1.0, 0.5] and meta["config"]["flip"] is True
    x = np.random.default_rng(6).integers(0, 256, (2, 3, 41, 57), dtype=np.uint8)
    got, want = OrtRunner(path).run(x), spec_from_sidecar(meta, ckpt).module.run(x)
    assert _rel(got["probs"], want["probs"]) < 1e-4
    assert main(["export", "onnx", "--model", "seg", "--checkpoint", str(ckpt), "--out", str(tmp_path / "b.onnx"),
                 "--bg-threshold", "0.3"]) == 2
    assert "camnet only" in capsys.readouterr().err


def test_resnet50_camnet_small_input(tmp_path):
    """The real CAM architecture (ResNet-50, output stride 16) at a small input."""
    from wsclip.models.camnet import build_camnet, save_camnet

    ckpt = tmp_path / "r50.safetensors"
    save_camnet(ckpt, randomize_bn(build_camnet("resnet50", 3), seed=5), ["a", "b", "c"])
    path = tmp_path / "r50.onnx"
    meta = export_onnx("camnet", ckpt, path, batch=1, hw=(64, 64))
    x = np.random.default_rng(5).integers(0, 256, (2, 3, 48, 40), dtype=np.uint8)
    got, want = OrtRunner(path).run(x), spec_from_sidecar(meta, ckpt).module.run(x)
    assert _rel(got["cams"], want["cams"]) < 1e-4


def test_export_guards(cam_ckpt, clip_ckpt, tmp_path):
    with pytest.raises(WsclipError, match="opset"):
        export_onnx("camnet", cam_ckpt, tmp_path / "a.onnx", opset=13)
    with pytest.raises(WsclipError, match="unknown model"):
        export_onnx("vgg", cam_ckpt, tmp_path / "a.onnx")
    with pytest.raises(WsclipError, match=r"\.onnx"):
        export_onnx("camnet", cam_ckpt, tmp_path / "a.bin")
    with pytest.raises(WsclipError, match="not found"):
        export_onnx("camnet", tmp_path / "missing.safetensors", tmp_path / "a.onnx")
    with pytest.raises(WsclipError, match="not a CAM network"):
        export_onnx("camnet", clip_ckpt, tmp_path / "a.onnx")
    assert not (tmp_path / "a.onnx").exists()


def test_export_mode_disables_and_restores_mha_fast_path():
    before = torch.backends.mha.get_fastpath_enabled()
    with export_mode():
        assert torch.backends.mha.get_fastpath_enabled() is False
    assert torch.backends.mha.get_fastpath_enabled() == before


def test_overwrite_false_keeps_an_intact_export(cam_onnx, cam_ckpt):
    stamp = cam_onnx.stat().st_mtime_ns
    meta = export_onnx("camnet", cam_ckpt, cam_onnx, hw=(64, 64), overwrite=False)
    assert cam_onnx.stat().st_mtime_ns == stamp and meta["sha256"] == file_sha256(cam_onnx)


def test_dynamo_exporter(cam_ckpt, tmp_path):
    pytest.importorskip("onnxscript")
    path = tmp_path / "cam_dynamo.onnx"
    meta = export_onnx("camnet", cam_ckpt, path, hw=(64, 64), exporter="dynamo")
    assert meta["exporter"] == "dynamo" and meta["opset"] >= 18
    x = np.random.default_rng(6).integers(0, 256, (3, 3, 57, 71), dtype=np.uint8)
    assert _rel(OrtRunner(path).run(x)["cams"], spec_from_sidecar(meta, cam_ckpt).module.run(x)["cams"]) < 1e-4
