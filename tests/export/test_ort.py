"""ONNX Runtime runner: labeler interface, input conversion, shape checks, corrupt/mismatched files, reduced precision."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from wsclip.errors import BadFileError, MissingExtraError, MissingFileError, ShapeError, WsclipError
from wsclip.export.onnx import read_sidecar, sidecar_of
from wsclip.export.ort import OrtRunner, bind_dims, resolve_shape
from wsclip.export.wrappers import spec_from_sidecar
from wsclip.label.cam_labeler import Labeler


def _rel(a, b) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-12))


def test_runner_has_the_labeler_interface(cam_onnx, cam_ckpt):
    runner = OrtRunner(cam_onnx)
    torch_labeler = spec_from_sidecar(read_sidecar(cam_onnx), cam_ckpt).module
    for lab in (runner, torch_labeler):
        assert isinstance(lab, Labeler)
        assert lab.output_names == ("cams", "mask") and len(lab.classes) == 20
    assert runner.providers == ["CPUExecutionProvider"]


def test_input_kinds_agree(cam_onnx):
    """uint8 numpy, uint8 torch, one unbatched image and [0, 1] floats all give the same result."""
    runner = OrtRunner(cam_onnx)
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 45, 39), dtype=np.uint8)
    base = runner.run(x)
    for alt in (torch.from_numpy(x), x.astype(np.float32) / 255.0, torch.from_numpy(x).float() / 255.0):
        out = runner.run(alt)
        np.testing.assert_array_equal(out["mask"], base["mask"])
        np.testing.assert_allclose(out["cams"], base["cams"], rtol=0, atol=1e-6)
    single = runner.run(x[1])
    np.testing.assert_allclose(single["cams"][0], base["cams"][1], rtol=0, atol=1e-5)
    labels = np.zeros((2, 20), np.float32)
    labels[:, 3] = 1
    sel = runner.run(x, torch.from_numpy(labels))
    assert set(np.unique(sel["mask"])) <= {0, 4} and np.all(sel["cams"][:, np.arange(20) != 3] == 0)


def test_shape_errors_are_clear(cam_onnx, clip_image_onnx):
    runner = OrtRunner(cam_onnx)
    with pytest.raises(ShapeError, match="labels must be"):
        runner.run(np.zeros((2, 3, 32, 32), np.uint8), np.ones((3, 20), np.float32))
    with pytest.raises(ShapeError, match="must have shape"):
        runner.run(np.zeros((2, 4, 32, 32), np.uint8))
    with pytest.raises(ShapeError, match="32x32|fixed size"):
        OrtRunner(clip_image_onnx).run(np.zeros((1, 3, 31, 32), np.float32))
    with pytest.raises(WsclipError, match="no class-selection input"):
        OrtRunner(clip_image_onnx).run(np.zeros((1, 3, 32, 32), np.float32), labels=np.ones((1, 20)))


def test_shape_helpers():
    specs = [{"name": "images", "shape": ["batch", 3, "height", "width"]}, {"name": "labels", "shape": ["batch", 5]}]
    dims = bind_dims(specs, [np.zeros((2, 3, 7, 9)), np.zeros((2, 5))])
    assert dims == {"batch": 2, "height": 7, "width": 9}
    assert resolve_shape(["batch", 5, "height", "width"], dims) == (2, 5, 7, 9)
    with pytest.raises(ShapeError, match="axis 'batch'"):
        bind_dims(specs, [np.zeros((2, 3, 7, 9)), np.zeros((3, 5))])
    with pytest.raises(ShapeError, match="cannot resolve"):
        resolve_shape(["depth"], dims)


def test_corrupt_and_mismatched_files(cam_onnx, clip_text_onnx, tmp_path):
    # truncated: size differs from the sidecar
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes(cam_onnx.read_bytes()[:1000])
    shutil.copy(sidecar_of(cam_onnx), sidecar_of(bad))
    with pytest.raises(BadFileError, match="truncated"):
        OrtRunner(bad)
    # same size, flipped bytes: the hash catches it
    data = bytearray(cam_onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped = tmp_path / "flipped.onnx"
    flipped.write_bytes(bytes(data))
    shutil.copy(sidecar_of(cam_onnx), sidecar_of(flipped))
    with pytest.raises(BadFileError, match="SHA-256"):
        OrtRunner(flipped)
    # garbage that still matches a (rewritten) sidecar: ONNX Runtime's refusal becomes a clear error
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf at all" * 10)
    meta = read_sidecar(cam_onnx)
    from wsclip.io import file_sha256

    sidecar_of(garbage).write_text(json.dumps({**meta, "size": garbage.stat().st_size, "sha256": file_sha256(garbage)}))
    with pytest.raises(BadFileError, match="cannot load"):
        OrtRunner(garbage)
    # no sidecar / broken sidecar / missing file
    lone = tmp_path / "lone.onnx"
    shutil.copy(cam_onnx, lone)
    with pytest.raises(BadFileError, match="no sidecar"):
        OrtRunner(lone)
    sidecar_of(lone).write_text("{ nope")
    with pytest.raises(BadFileError, match="not valid JSON"):
        OrtRunner(lone)
    with pytest.raises(MissingFileError):
        OrtRunner(tmp_path / "missing.onnx")
    # a sidecar from another export (the text encoder's) beside the CAM graph
    swapped = tmp_path / "swapped.onnx"
    shutil.copy(cam_onnx, swapped)
    text_meta = read_sidecar(clip_text_onnx)
    sidecar_of(swapped).write_text(json.dumps({**text_meta, "size": swapped.stat().st_size,
                                               "sha256": file_sha256(swapped)}))
    with pytest.raises(BadFileError, match="another export"):
        OrtRunner(swapped)


def test_cuda_without_the_gpu_package(cam_onnx):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(MissingExtraError, match=r"wsclip\[trt\]"):
        OrtRunner(cam_onnx, device="cuda")


def test_fp16_graph_keeps_layernorm_and_softmax_fp32(clip_image_onnx, clip_ckpt, tmp_path):
    from wsclip.export.precision import to_fp16

    dst = tmp_path / "clip_image.fp16.onnx"
    meta = to_fp16(clip_image_onnx, dst)
    assert meta["precision"] == "fp16" and meta["derived_from"]["sha256"] == read_sidecar(clip_image_onnx)["sha256"]
    model = onnx.load(str(dst))
    onnx.checker.check_model(model, full_check=True)
    model = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input,
                                                            *model.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    kinds = {}
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax", "MatMul", "Gemm", "Conv"):
            kinds.setdefault(node.op_type, set()).add(types.get(node.input[0]))
    assert kinds["LayerNormalization"] == {f32} and kinds["Softmax"] == {f32}
    assert kinds["MatMul"] == {f16} and kinds["Conv"] == {f16}
    x = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    got = OrtRunner(dst).run(x)["embeddings"]
    want = OrtRunner(clip_image_onnx).run(x)["embeddings"]
    assert got.dtype == np.float32 and 0 < _rel(got, want) < 1e-2


def test_int8_qdq_graph_with_calibration_cache(cam_onnx, clip_image_onnx, voc14, tmp_path):
    from wsclip.export.precision import quantize

    cache = tmp_path / "calib.json"
    dst = tmp_path / "clip_image.int8.onnx"
    meta = quantize(clip_image_onnx, dst, "int8", images=voc14, cache=cache, count=6, batch=3)
    assert meta["precision"] == "int8" and cache.is_file()
    ops = [n.op_type for n in onnx.load(str(dst)).graph.node]
    assert ops.count("QuantizeLinear") >= 4 and "DequantizeLinear" in ops
    x = np.random.default_rng(1).random((2, 3, 32, 32), dtype=np.float32)
    want = OrtRunner(clip_image_onnx).run(x)["embeddings"]
    first = OrtRunner(dst).run(x)["embeddings"]
    assert _rel(first, want) < 0.3
    # the cache alone rebuilds the same graph; without images or cache it is a clear error
    dst2 = tmp_path / "again.onnx"
    quantize(clip_image_onnx, dst2, "int8", images=None, cache=cache)
    np.testing.assert_array_equal(OrtRunner(dst2).run(x)["embeddings"], first)
    with pytest.raises(WsclipError, match="calibration images"):
        quantize(clip_image_onnx, tmp_path / "x.onnx", "int8", images=None, cache=tmp_path / "none.json")
    with pytest.raises(WsclipError, match="another graph"):
        quantize(cam_onnx, tmp_path / "y.onnx", "int8", images=voc14, cache=cache, count=2)
