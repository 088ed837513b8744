"""Reduced-precision ONNX graphs for TensorRT's strongly typed mode (and ONNX Runtime).

TensorRT 11 removed the builder's FP16/INT8/FP8 flags and calibrators: precision now lives in
the graph (strong typing; Q/DQ nodes for quantisation). TensorRT 10 accepts the same graphs,
so wsclip prepares them here, in plain Python, and both versions build them as they are:

- fp16: every float tensor in fp16 except LayerNormalization, Softmax, reductions, Resize,
  Div and ArgMax, which stay fp32 (LayerNorm after attention and softmax overflow in fp16;
  the labeler's upsampling, max normalisation and argmax stay exact). Graph inputs and
  outputs keep their dtypes. (onnxruntime.transformers.float16 does the conversion.)
- int8 / fp8: symmetric Q/DQ nodes on Conv / MatMul / Gemm inputs (per-channel int8
  weights), with activation ranges calibrated on the user's images by ONNX Runtime's
  quantiser. The ranges are stored in a calibration cache (JSON) that later builds reuse.

Each prepared graph gets its own sidecar (the source's, plus "precision"), so
`wsclip export check` can compare it with PyTorch on the CPU.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from wsclip.errors import MissingFileError, WsclipError

PRECISIONS = ("fp32", "fp16", "int8", "fp8")
FP32_OPS = ("LayerNormalization", "Softmax", "ReduceMax", "ReduceMean", "ReduceL2", "ReduceSum", "Resize",
            "Div", "Pow", "Sqrt", "ArgMax")
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")


def topo_sort(graph) -> None:
    """Reorder graph.node topologically (in place); the fp16 converter can leave inserted Casts out of order."""
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in known for i in node.input):
                ordered.append(node)
                known.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise WsclipError("the graph has a cycle or a missing input; re-export it")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def _drop_duplicate_nodes(graph) -> None:
    """Remove repeated identical nodes (the fp16 converter inserts the same Cast once per blocked consumer)."""
    seen: dict[str, bytes] = {}
    keep = []
    for node in graph.node:
        key = node.SerializeToString()
        if node.output and node.output[0] in seen:
            if seen[node.output[0]] != key:
                raise WsclipError(f"fp16 conversion produced two different nodes writing {node.output[0]}; please report this")
            continue
        for out in node.output:
            seen[out] = key
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _derived_sidecar(src_meta: dict, src: Path, dst: Path, precision: str, **extra) -> dict:
    from wsclip.export.onnx import sidecar_of
    from wsclip.io import atomic_write_json, file_sha256

    meta = {**src_meta, "precision": precision, "derived_from": {"path": str(src), "sha256": src_meta.get("sha256")},
            "size": dst.stat().st_size, "sha256": file_sha256(dst), **extra}
    atomic_write_json(sidecar_of(dst), meta)
    return meta


def to_fp16(src, dst, keep_fp32: Sequence[str] = FP32_OPS) -> dict:
    """Write an fp16 copy of the exported ONNX `src` to `dst` (fp32 I/O; `keep_fp32` ops stay fp32)."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    from wsclip.export.onnx import verify_artefact
    from wsclip.io import atomic_path

    src, dst = Path(src), Path(dst)
    meta = verify_artefact(src)
    model = onnx.load(str(src))
    model16 = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False,
                                       op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep_fp32)))
    _drop_duplicate_nodes(model16.graph)
    topo_sort(model16.graph)
    onnx.checker.check_model(model16, full_check=True)
    with atomic_path(dst) as tmp:
        onnx.save(model16, str(tmp))
    return _derived_sidecar(meta, src, dst, "fp16", fp32_ops=list(keep_fp32))


# ============================================================================ calibration
def calibration_feeds(meta: dict, images, count: int = 64, batch: int = 8,
                      hw: Sequence[int] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Input feeds built from a folder of images (or a list of paths) for an image model's sidecar.

    Images are resized (bicubic) to the model's fixed size, or to `hw` (default 512x512) for
    models with dynamic H and W; labels (where the graph has them) select every class.
    """
    from wsclip.data.transforms import resize_image
    from wsclip.export.ort import _cast_numpy
    from wsclip.io import read_image

    spec = meta["inputs"][0]
    if spec["name"] != "images":
        raise WsclipError(f"int8/fp8 calibration needs an image model; this is '{meta['model']}': use --fp16")
    shape = spec["shape"]
    size = (int(shape[2]), int(shape[3])) if not isinstance(shape[2], str) else tuple(int(s) for s in (hw or (512, 512)))
    paths = _image_paths(images)[:count]
    k = next((int(s["shape"][1]) for s in meta["inputs"] if s["name"] == "labels"), None)
    for start in range(0, len(paths), batch):
        chunk = [resize_image(read_image(p), size).transpose(2, 0, 1) for p in paths[start:start + batch]]
        feed = {"images": _cast_numpy(np.stack(chunk), spec["dtype"])}
        if k is not None:
            feed["labels"] = np.ones((len(chunk), k), np.float32)
        yield feed


def _image_paths(images) -> list[Path]:
    from wsclip.data.folder import list_images

    if isinstance(images, (list, tuple)):
        paths = [Path(p) for p in images]
    else:
        root = Path(images)
        if not root.is_dir():
            raise MissingFileError(f"calibration image folder not found: {root}")
        paths = list_images(root / "JPEGImages" if (root / "JPEGImages").is_dir() else root)
    if not paths:
        raise MissingFileError(f"no images found in {images} for calibration: pass a folder of .jpg/.png files")
    return paths


def quantize(src, dst, precision: str = "int8", images=None, cache=None, count: int = 64, batch: int = 8,
             hw: Sequence[int] | None = None, method: str = "minmax") -> dict:
    """Write a Q/DQ (explicitly quantised) copy of `src` to `dst`, calibrated on `images`.

    `cache` (JSON) stores the calibrated ranges: when it exists, no images are needed and the
    ranges are reused. precision: int8 (per-channel symmetric weights) or fp8 (E4M3).
    """
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    from wsclip.export.onnx import verify_artefact
    from wsclip.io import atomic_path

    if precision not in ("int8", "fp8"):
        raise WsclipError(f"quantize() makes int8 or fp8 graphs, not {precision}")
    src, dst = Path(src), Path(dst)
    meta = verify_artefact(src)
    if meta["model"] == "clip-text":
        raise WsclipError("int8/fp8 calibration needs images; build the text encoder with --fp16")
    cache = Path(cache) if cache else None
    if images is None and (cache is None or not cache.is_file()):
        raise WsclipError(f"{precision} needs calibration images (--calib-images DIR) or an existing calibration cache")
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise WsclipError(f"unknown calibration method '{method}': use one of {', '.join(methods)}")
    qtype = QuantType.QInt8 if precision == "int8" else QuantType.QFLOAT8E4M3FN
    calib = methods[method] if precision == "int8" else CalibrationMethod.Distribution  # ORT: fp8 needs Distribution

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self._it = calibration_feeds(meta, images, count, batch, hw) if images is not None else iter(())

        def get_next(self):
            return next(self._it, None)

    if cache is not None:
        _check_cache_source(cache, meta, precision, method)
    with atomic_path(dst) as tmp, _quiet_root_logger():
        quantize_static(str(src), str(tmp), _Reader(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(QUANTIZED_OPS), per_channel=precision == "int8",
                        activation_type=qtype, weight_type=qtype, calibrate_method=calib,
                        calibration_cache_path=str(cache) if cache else None,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    if cache is not None:
        from wsclip.io import atomic_write_json

        atomic_write_json(_cache_meta(cache), {"onnx_sha256": meta.get("sha256"), "precision": precision, "method": method})
    return _derived_sidecar(meta, src, dst, precision, calibration={"method": method if precision == "int8" else "distribution",
                                                                     "cache": str(cache) if cache else None})


def _cache_meta(cache: Path) -> Path:
    return cache.with_name(cache.name + ".meta.json")


def _check_cache_source(cache: Path, meta: dict, precision: str, method: str) -> None:
    """A calibration cache is only valid for the graph it was computed on."""
    import json

    cache.parent.mkdir(parents=True, exist_ok=True)
    if not cache.is_file():
        return
    side = _cache_meta(cache)
    try:
        info = json.loads(side.read_text())
    except (OSError, ValueError):
        info = {}
    if info.get("onnx_sha256") != meta.get("sha256") or info.get("precision") != precision or info.get("method") != method:
        raise WsclipError(f"calibration cache {cache} was made for another graph or precision "
                          f"({info or 'no record beside it'}): delete it or pass another --calib-cache")


@contextlib.contextmanager
def _quiet_root_logger():
    """ONNX Runtime's quantiser logs advice on the root logger and prints; silence both for the call only."""
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # and prints calibration progress
            yield
    finally:
        root.setLevel(level)
