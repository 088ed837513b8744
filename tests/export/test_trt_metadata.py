"""TensorRT engine metadata and profiles: the plain-Python checks, run without TensorRT or a GPU."""

from __future__ import annotations

import importlib.util

import pytest

from wsclip.errors import BadFileError, MissingExtraError, ShapeError, WsclipError
from wsclip.export.tensorrt import check_engine_metadata, check_in_profile, make_profile, parse_hw

H100 = {"tensorrt": "10.9.0.34", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
ENGINE = {"format": "tensorrt", "onnx": {"path": "cam.onnx"}, "tensorrt": dict(H100, version=H100["tensorrt"])}
CAM_META = {"model": "camnet", "inputs": [{"name": "images", "shape": ["batch", 3, "height", "width"], "dtype": "uint8"},
                                          {"name": "labels", "shape": ["batch", 20], "dtype": "float32"}]}
CLIP_META = {"model": "clip-image", "inputs": [{"name": "images", "shape": ["batch", 3, 224, 224], "dtype": "float32"}]}


def test_engine_for_this_machine_is_accepted():
    check_engine_metadata(ENGINE, H100)


def test_other_tensorrt_version_is_refused_with_both_versions():
    with pytest.raises(BadFileError) as err:
        check_engine_metadata(ENGINE, {**H100, "tensorrt": "11.4.1"}, path="cam.engine")
    msg = str(err.value)
    assert "TensorRT 10.9.0.34" in msg and "11.4.1" in msg and "wsclip export trt --onnx cam.onnx" in msg


def test_other_gpu_architecture_is_refused():
    l4 = {"tensorrt": H100["tensorrt"], "gpu": "NVIDIA L4", "compute_capability": "8.9"}
    with pytest.raises(BadFileError, match=r"compute capability 9\.0 .*this GPU is 8\.9 \(NVIDIA L4\)"):
        check_engine_metadata(ENGINE, l4)
    with pytest.raises(BadFileError, match=r"11\.0.*compute capability"):  # both reasons at once
        check_engine_metadata(ENGINE, {**l4, "tensorrt": "11.0"})


def test_same_architecture_other_gpu_model():
    h200 = {**H100, "gpu": "NVIDIA H200"}
    with pytest.raises(BadFileError, match="H100.*H200.*strict_gpu=False"):
        check_engine_metadata(ENGINE, h200)
    check_engine_metadata(ENGINE, h200, strict_gpu=False)


def test_non_engine_and_incomplete_metadata_are_refused():
    with pytest.raises(BadFileError, match="not a TensorRT engine"):
        check_engine_metadata({"format": "onnx"}, H100)
    with pytest.raises(BadFileError, match="TensorRT None"):
        check_engine_metadata({"format": "tensorrt"}, H100)


def test_profile_for_dynamic_models():
    prof = make_profile(CAM_META, 1, 8, 32, min_hw="128", opt_hw="512x384", max_hw="1024x768")
    assert prof["images"] == [[1, 3, 128, 128], [8, 3, 512, 384], [32, 3, 1024, 768]]
    assert prof["labels"] == [[1, 20], [8, 20], [32, 20]]
    default = make_profile(CAM_META)
    assert default["images"] == [[1, 3, 256, 256], [8, 3, 512, 512], [32, 3, 512, 512]]
    check_in_profile(prof, {"images": (4, 3, 300, 700), "labels": (4, 20)})
    with pytest.raises(ShapeError, match="outside the engine's profile"):
        check_in_profile(prof, {"images": (33, 3, 300, 300)})
    with pytest.raises(ShapeError, match="outside"):
        check_in_profile(prof, {"images": (4, 3, 100, 300)})


def test_profile_for_fixed_size_models_and_bad_ranges():
    assert make_profile(CLIP_META, 2, 4, 8)["images"] == [[2, 3, 224, 224], [4, 3, 224, 224], [8, 3, 224, 224]]
    with pytest.raises(WsclipError, match="fixed input size"):
        make_profile(CLIP_META, opt_hw="512")
    with pytest.raises(WsclipError, match="min <= opt <= max"):
        make_profile(CAM_META, 4, 2, 8)
    with pytest.raises(WsclipError, match="per axis"):
        make_profile(CAM_META, opt_hw="512", max_hw="256")


def test_parse_hw():
    assert parse_hw("512") == (512, 512) and parse_hw("480x640") == (480, 640) and parse_hw(None) is None
    for bad in ("big", "1x2x3", "0x4"):
        with pytest.raises(WsclipError, match="HxW"):
            parse_hw(bad)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_missing_tensorrt_is_a_clear_error(cam_onnx, tmp_path, capsys):
    from wsclip.cli import main
    from wsclip.export.tensorrt import TrtRunner, build_engine

    with pytest.raises(MissingExtraError, match=r"wsclip\[trt\]"):
        build_engine(cam_onnx, tmp_path / "cam.engine")
    engine = _fake_engine(tmp_path / "fake.engine")
    with pytest.raises(MissingExtraError, match=r"wsclip\[trt\]"):
        TrtRunner(engine)
    assert main(["export", "trt", "--onnx", str(cam_onnx), "--out", str(tmp_path / "cam.engine")]) == 2
    assert "wsclip[trt]" in capsys.readouterr().err
    assert not (tmp_path / "cam.engine").exists()


def _fake_engine(path):
    """Engine bytes with a matching sidecar (what `wsclip export trt` writes), for checks that need no TensorRT."""
    import hashlib
    import json

    from wsclip.export.onnx import SIDECAR_KIND, sidecar_of

    data = b"not really a TensorRT plan" * 10
    path.write_bytes(data)
    meta = dict(ENGINE, **CAM_META, kind=SIDECAR_KIND, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                profile=make_profile(CAM_META))
    sidecar_of(path).write_text(json.dumps(meta))
    return path


def test_bad_engine_files_are_reported_before_tensorrt_is_needed(tmp_path):
    from wsclip.errors import MissingFileError
    from wsclip.export.tensorrt import TrtRunner

    with pytest.raises(MissingFileError, match="not found"):
        TrtRunner(tmp_path / "missing.engine")
    engine = _fake_engine(tmp_path / "cam.engine")
    engine.write_bytes(engine.read_bytes()[:-7])  # truncated after the build
    with pytest.raises(BadFileError, match="truncated"):
        TrtRunner(engine)


def test_parity_cases_stay_inside_an_engine_profile(voc14):
    from wsclip.export.parity import _random_cases, _real_cases

    meta = dict(CAM_META, classes=[f"c{i}" for i in range(20)], profile=make_profile(CAM_META, 1, 8, 32))
    (lo, opt, hi) = meta["profile"]["images"]
    cases = list(_random_cases(meta, 3, seed=1)) + list(_real_cases(meta, voc14, 4, None))
    assert len(cases) > 3
    for _name, x, labels, _size in cases:
        check_in_profile(meta["profile"], {"images": x.shape})
    assert all(x.shape[0] != opt[0] for _, x, _, _ in cases[:3])  # random batches differ from the optimal one
    assert {x.shape[2:] for _, x, _, _ in cases[3:]} == {(512, 512)}  # 513 px VOC images scaled into the profile


# ---------------------------------------------------------------------------- what TensorRT 10 would parse
def test_exported_graphs_are_ready_for_tensorrt(cam_onnx, clip_image_onnx, tmp_path):
    """The camnet (dynamic batch and size) and CLIP image (dynamic batch) exports, fp32 and fp16
    rewrites: opset, operators, types and profile all acceptable to TensorRT 10's parser."""
    from wsclip.export.tensorrt import TRT10_OPSETS, check_build

    for onnx_path, prec in ((cam_onnx, "fp16"), (cam_onnx, "fp32"), (clip_image_onnx, "fp16")):
        rep = check_build(onnx_path, tmp_path / f"{onnx_path.stem}.{prec}.engine", precision=prec)
        assert rep["problems"] == [], rep["problems"]
        assert TRT10_OPSETS[0] <= rep["opset"] <= TRT10_OPSETS[1] and "Conv" in rep["ops"] or "MatMul" in rep["ops"]
        cmd = rep["trtexec"]
        assert cmd[0] == "trtexec" and "--stronglyTyped" in cmd and f"--onnx={rep['graph']}" in cmd
        assert ("--noTF32" in cmd) == (prec == "fp32")
        assert (prec == "fp16") == rep["graph"].endswith(".fp16.onnx")
    rep = check_build(cam_onnx, tmp_path / "c.engine", min_batch=2, opt_batch=4, max_batch=8, opt_hw="320x256")
    assert rep["profile"]["images"] == [[2, 3, 256, 256], [4, 3, 320, 256], [8, 3, 320, 256]]
    assert "--minShapes=images:2x3x256x256,labels:2x20" in rep["trtexec"]
    assert "--maxShapes=images:8x3x320x256,labels:8x20" in rep["trtexec"]


def test_readiness_finds_what_tensorrt_would_refuse(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from wsclip.export.tensorrt import trt_readiness

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])
    d = helper.make_tensor_value_info("d", TensorProto.DOUBLE, ["batch", 4])
    nodes = [helper.make_node("Unique", ["x"], ["y"], name="uniq"),
             helper.make_node("Cast", ["x"], ["d"], to=TensorProto.DOUBLE, name="cast"),
             helper.make_node("Resize", ["x", "", "s"], ["r"], mode="cubic", name="rs"),
             helper.make_node("Custom", ["x"], ["z"], domain="my.ops", name="cu")]
    s = helper.make_tensor("s", TensorProto.FLOAT, [2], [1.0, 1.0])
    graph = helper.make_graph(nodes, "g", [x], [y, d], initializer=[s])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("my.ops", 1)]),
              path)
    problems = trt_readiness(path, {"x": [[1, 4], [8, 5], [4, 4]], "ghost": [[1], [1], [1]]})
    text = "\n".join(problems)
    assert "opset 21 is outside" in text and "Unique is not supported" in text and "custom-domain op my.ops::Custom" in text
    assert "Resize mode=cubic" in text and "d: DOUBLE network inputs / outputs" in text
    assert "axis 0 (batch): profile (1, 8, 4)" in text and "axis 1 is fixed at 4 but the profile gives (4, 5, 4)" in text
    assert "profile names ghost" in text
    assert any("dynamic axes" in p for p in trt_readiness(path, {}))


def test_export_trt_check_only_cli(cam_onnx, tmp_path, capsys):
    from wsclip.cli import main

    rc = main(["export", "trt", "--onnx", str(cam_onnx), "--out", str(tmp_path / "cam.engine"), "--check-only",
               "--opt-batch", "4"])
    out = capsys.readouterr().out
    assert rc == 0 and "ready for TensorRT 10" in out and "trtexec --onnx=" in out and "--optShapes=images:4x3x512x512" in out
