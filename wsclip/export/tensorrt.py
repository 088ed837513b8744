"""`wsclip export trt`: TensorRT engines from wsclip's ONNX exports, and a runner (extra `[trt]`).

NOT RUN IN THIS PROJECT'S CI: TensorRT cannot be installed on the development machines, so
`build_engine` and `TrtRunner` are written against the documented TensorRT 10/11 Python API
and have not been executed here. The plain-Python parts (profile arithmetic, the metadata
check that refuses engines built for another GPU or TensorRT version) are tested without it.

Precision lives in the graph (strongly typed networks: required by TensorRT 11, opt-in on 10):
`wsclip.export.precision` writes the fp16 graph (LayerNorm, softmax, reductions kept fp32)
or the int8/fp8 Q/DQ graph (calibrated on user images, calibration cache reused), and the
builder takes it as it is. fp32 engines are built with TF32 off so they match PyTorch.

Engine sidecar (`<engine>.json`): the ONNX sidecar's model description plus TensorRT version,
GPU name and compute capability, precision, optimisation profile and the engine's SHA-256.
`TrtRunner` checks all of it before deserialising; a mismatch is refused with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from wsclip.errors import BadFileError, ShapeError, WsclipError
from wsclip.export.ort import TORCH_DTYPES, ArtefactRunner

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper and newer
_TRT_DTYPE_NAMES = {"uint8": "UINT8", "float32": "FLOAT", "float16": "HALF", "int32": "INT32", "int64": "INT64"}


# ============================================================================ plain Python (tested)
def parse_hw(text) -> tuple[int, int] | None:
    """'512' or '512x384' (H x W) -> (H, W); None stays None."""
    if text is None or isinstance(text, (tuple, list)):
        return None if text is None else (int(text[0]), int(text[1]))
    parts = str(text).lower().replace(",", "x").split("x")
    try:
        hw = (int(parts[0]), int(parts[-1]))
    except ValueError:
        raise WsclipError(f"size '{text}' is not H or HxW (e.g. 512 or 512x384)") from None
    if len(parts) > 2 or min(hw) < 1:
        raise WsclipError(f"size '{text}' is not H or HxW (e.g. 512 or 512x384)")
    return hw


def make_profile(meta: dict, min_batch: int = 1, opt_batch: int = 8, max_batch: int = 32,
                 min_hw=None, opt_hw=None, max_hw=None) -> dict[str, list[list[int]]]:
    """Concrete (min, opt, max) shapes per input of an ONNX sidecar: {name: [min, opt, max]}."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise WsclipError(f"batch sizes must satisfy 1 <= min <= opt <= max, got {min_batch}/{opt_batch}/{max_batch}")
    dynamic_hw = any(isinstance(d, str) and d in ("height", "width") for s in meta["inputs"] for d in s["shape"])
    if dynamic_hw:
        opt = parse_hw(opt_hw) or (512, 512)
        lo, hi = parse_hw(min_hw) or (min(opt[0], 256), min(opt[1], 256)), parse_hw(max_hw) or opt
        if not all(lo[i] <= opt[i] <= hi[i] for i in (0, 1)):
            raise WsclipError(f"sizes must satisfy min <= opt <= max per axis, got {lo} / {opt} / {hi}")
    elif any(v is not None for v in (min_hw, opt_hw, max_hw)):
        raise WsclipError(f"this {meta['model']} model has a fixed input size; drop --min/--opt/--max-hw")
    else:
        lo = opt = hi = (0, 0)
    profile = {}
    for spec in meta["inputs"]:
        shapes = []
        for b, hw in ((min_batch, lo), (opt_batch, opt), (max_batch, hi)):
            dims = {"batch": b, "height": hw[0], "width": hw[1]}
            shapes.append([dims[d] if isinstance(d, str) else int(d) for d in spec["shape"]])
        profile[spec["name"]] = shapes
    return profile


def check_in_profile(profile: dict, shapes: dict[str, Sequence[int]]) -> None:
    """Refuse input shapes outside the engine's optimisation profile, saying what fits."""
    for name, shape in shapes.items():
        lo, _, hi = profile[name]
        if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
            raise ShapeError(f"input '{name}' has shape {tuple(shape)}, outside the engine's profile "
                             f"{tuple(lo)} .. {tuple(hi)}: split the batch, resize, or rebuild with other "
                             "--min/--max-batch / --min/--max-hw")


def check_engine_metadata(meta: dict, env: dict, strict_gpu: bool = True, path="engine") -> None:
    """Refuse an engine built for another TensorRT version or GPU; the error says why.

    `env` is `engine_environment()` of this machine: {"tensorrt", "gpu", "compute_capability"}.
    TensorRT engines are only valid for the exact TensorRT version and GPU architecture
    (compute capability) they were built with; with strict_gpu another GPU model of the same
    architecture is refused too, as its tactics were timed on different hardware.
    """
    if meta.get("format") != "tensorrt":
        raise BadFileError(f"{path} is a '{meta.get('format')}' artefact, not a TensorRT engine")
    built = meta.get("tensorrt") or {}
    reasons = []
    if str(built.get("version")) != str(env.get("tensorrt")):
        reasons.append(f"it was built with TensorRT {built.get('version')} and this machine has {env.get('tensorrt')}")
    if str(built.get("compute_capability")) != str(env.get("compute_capability")):
        reasons.append(f"it was built for compute capability {built.get('compute_capability')} "
                       f"({built.get('gpu')}) and this GPU is {env.get('compute_capability')} ({env.get('gpu')})")
    elif strict_gpu and built.get("gpu") != env.get("gpu"):
        reasons.append(f"it was built on a {built.get('gpu')} and this GPU is a {env.get('gpu')} "
                       "(same architecture: pass strict_gpu=False to use it anyway)")
    if reasons:
        src = (meta.get("onnx") or {}).get("path", "the .onnx")
        raise BadFileError(f"refusing TensorRT engine {path}: " + "; ".join(reasons) +
                           f". Rebuild it on this machine: wsclip export trt --onnx {src} --out {path}")


# ---------------------------------------------------------------------------- what TensorRT would parse
#: ONNX opsets the parser of TensorRT 10.0 accepts (onnx-tensorrt docs/operators.md: "opset 9 to opset
#: 20"; later 10.x releases accept more, so a graph inside this range parses on every TensorRT 10)
TRT10_OPSETS = (9, 20)
#: ONNX operators TensorRT 10's parser does not support (onnx-tensorrt docs/operators.md, the "N" rows)
TRT10_UNSUPPORTED_OPS = frozenset("""
    AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor CenterCropPad Col2Im Compress
    ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger MaxRoiPool MaxUnpool
    MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement
    QLinearConv QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty SequenceErase
    SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringConcat
    StringNormalizer StringSplit TfIdfVectorizer Unique""".split())
#: tensor types TensorRT 10 takes as network inputs and outputs (ONNX TensorProto names)
TRT10_IO_TYPES = frozenset({"FLOAT", "FLOAT16", "BFLOAT16", "INT32", "INT64", "UINT8", "BOOL", "INT8"})
_RESIZE_OK = {"mode": {"nearest", "linear"},
              "coordinate_transformation_mode": {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn",
                                                 "asymmetric", "align_corners"}}


def _nodes(graph):
    """Every node of a graph, subgraphs (If / Loop / Scan bodies) included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _nodes(sub)


def trt_readiness(onnx_path, profile: dict | None = None) -> list[str]:
    """What TensorRT 10's ONNX parser would refuse in this graph, found without TensorRT: the opset
    range, unsupported operators or custom domains, input / output types, Resize modes, and (given the
    optimisation profile {input: [min, opt, max]}) profile shapes that contradict the graph's static
    dimensions, leave a dynamic axis unset, or are not min <= opt <= max. Empty list: nothing found."""
    import onnx

    model = onnx.load(os.fspath(onnx_path), load_external_data=False)
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not TRT10_OPSETS[0] <= opset <= TRT10_OPSETS[1]:
        problems.append(f"opset {opset} is outside TensorRT 10's {TRT10_OPSETS[0]}..{TRT10_OPSETS[1]}: "
                        f"export with --opset {min(max(opset or 17, TRT10_OPSETS[0]), TRT10_OPSETS[1])}")
    for node in _nodes(model.graph):
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"node {node.name or node.op_type}: custom-domain op {node.domain}::{node.op_type}")
        elif node.op_type in TRT10_UNSUPPORTED_OPS:
            problems.append(f"node {node.name or node.op_type}: {node.op_type} is not supported by TensorRT 10")
        elif node.op_type == "Resize":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            for key, ok in _RESIZE_OK.items():
                val = attrs.get(key, b"nearest" if key == "mode" else b"half_pixel")
                val = val.decode() if isinstance(val, bytes) else str(val)
                if val not in ok:
                    problems.append(f"node {node.name}: Resize {key}={val} is not supported by TensorRT 10")
            if attrs.get("antialias", 0):
                problems.append(f"node {node.name}: Resize with antialias is not supported by TensorRT 10")
    init = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in init]
    for v in inputs + list(model.graph.output):
        t = onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)
        if t not in TRT10_IO_TYPES:
            problems.append(f"{v.name}: {t} network inputs / outputs are not supported by TensorRT 10")
    if profile is not None:
        problems += _profile_problems(inputs, profile)
    return problems


def _profile_problems(inputs, profile: dict) -> list[str]:
    problems = []
    names = {v.name for v in inputs}
    for extra in sorted(set(profile) - names):
        problems.append(f"profile names {extra}, which is not an input of the graph")
    for v in inputs:
        dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in v.type.tensor_type.shape.dim]
        if v.name not in profile:
            if any(isinstance(d, str) or d is None for d in dims):
                problems.append(f"input {v.name} has dynamic axes {dims} but no optimisation profile")
            continue
        lo, opt, hi = profile[v.name]
        if not len(lo) == len(opt) == len(hi) == len(dims):
            problems.append(f"input {v.name}: profile ranks {len(lo)}/{len(opt)}/{len(hi)} != graph rank {len(dims)}")
            continue
        for i, d in enumerate(dims):
            trio = (lo[i], opt[i], hi[i])
            if isinstance(d, int) and d > 0 and trio != (d, d, d):
                problems.append(f"input {v.name} axis {i} is fixed at {d} but the profile gives {trio}")
            elif not 1 <= lo[i] <= opt[i] <= hi[i]:
                problems.append(f"input {v.name} axis {i} ({d}): profile {trio} is not 1 <= min <= opt <= max")
    return problems


def trtexec_command(onnx_path, engine, profile: dict, precision: str = "fp16", timing_cache=None,
                    workspace_gib: float = 4.0) -> list[str]:
    """The `trtexec` command that builds what `build_engine` builds: the same (already typed) graph,
    strongly typed network, profile, workspace, TF32 off for fp32 and timing cache. For reproducing
    or debugging a build on a machine with TensorRT's tools; wsclip itself uses the Python API."""

    def shapes(i):
        return ",".join(f"{n}:{'x'.join(str(d) for d in trio[i])}" for n, trio in profile.items())

    cmd = ["trtexec", f"--onnx={os.fspath(onnx_path)}", f"--saveEngine={os.fspath(engine)}", "--stronglyTyped",
           f"--memPoolSize=workspace:{int(workspace_gib * 1024)}M"]
    if profile:
        cmd += [f"--minShapes={shapes(0)}", f"--optShapes={shapes(1)}", f"--maxShapes={shapes(2)}"]
    if precision == "fp32":
        cmd.append("--noTF32")
    if timing_cache:
        cmd.append(f"--timingCacheFile={os.fspath(timing_cache)}")
    return cmd


def _typed_graph(onnx_path, out, precision, src, profile, calib_images=None, calib_cache=None,
                 calib_count: int = 64, calib_method: str = "minmax") -> Path:
    """The graph TensorRT is given for `precision` (precision lives in the graph): the fp32 export
    itself, its fp16 rewrite, or its int8 / fp8 Q/DQ graph; written beside `out`."""
    from wsclip.export import precision as prec

    if precision == "fp16":
        typed = out.with_name(out.stem + ".fp16.onnx")
        prec.to_fp16(onnx_path, typed)
        return typed
    if precision in ("int8", "fp8"):
        typed = out.with_name(f"{out.stem}.{precision}.onnx")
        prec.quantize(onnx_path, typed, precision, images=calib_images, count=calib_count, method=calib_method,
                      cache=calib_cache or out.with_name(f"{out.stem}.{precision}.calib"),
                      hw=profile[src["inputs"][0]["name"]][1][2:] if src.get("dynamic_hw") else None)
        return typed
    return Path(onnx_path)


def check_build(onnx_path, out, *, precision: str = "fp16", calib_images=None, min_batch: int = 1,
                opt_batch: int = 8, max_batch: int = 32, min_hw=None, opt_hw=None, max_hw=None, timing_cache=None,
                workspace_gib: float = 4.0) -> dict:
    """Everything `build_engine` decides before TensorRT runs, checked without TensorRT or a GPU:
    the typed graph it would parse (`trt_readiness`), the optimisation profile against the graph's
    dynamic axes, and the equivalent `trtexec` command. {"graph", "opset", "ops", "profile",
    "problems", "trtexec"}; int8 / fp8 need calib_images (the Q/DQ graph is calibrated)."""
    import onnx

    from wsclip.export import precision as prec
    from wsclip.export.onnx import verify_artefact

    onnx_path, out = Path(onnx_path), Path(out)
    if precision not in prec.PRECISIONS:
        raise WsclipError(f"unknown precision '{precision}': use one of {', '.join(prec.PRECISIONS)}")
    src = verify_artefact(onnx_path)
    profile = make_profile(src, min_batch, opt_batch, max_batch, min_hw, opt_hw, max_hw)
    if precision in ("int8", "fp8") and calib_images is None:
        raise WsclipError(f"--{precision} needs --calib-images to write the graph TensorRT would parse")
    typed = _typed_graph(onnx_path, out, precision, src, profile, calib_images)
    model = onnx.load(os.fspath(typed), load_external_data=False)
    return {"graph": os.fspath(typed),
            "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
            "ops": sorted({n.op_type for n in _nodes(model.graph)}), "profile": profile,
            "problems": trt_readiness(typed, profile),
            "trtexec": trtexec_command(typed, out, profile, precision, timing_cache, workspace_gib)}


# ============================================================================ TensorRT (not run in CI)
def _trt():
    from wsclip.errors import require

    return require("tensorrt", "trt", "TensorRT export")


def engine_environment(device: int = 0) -> dict:
    """TensorRT version, GPU name and compute capability of this machine."""
    trt = _trt()
    if not torch.cuda.is_available():
        raise WsclipError("TensorRT engines need a CUDA GPU, and none is visible here")
    props = torch.cuda.get_device_properties(device)
    return {"tensorrt": trt.__version__, "gpu": props.name, "compute_capability": f"{props.major}.{props.minor}"}


def build_engine(onnx_path, out, *, precision: str = "fp16", calib_images=None, calib_cache=None,
                 calib_count: int = 64, calib_method: str = "minmax", min_batch: int = 1, opt_batch: int = 8,
                 max_batch: int = 32, min_hw=None, opt_hw=None, max_hw=None, timing_cache=None,
                 workspace_gib: float = 4.0, device: int = 0) -> dict:  # pragma: no cover - needs TensorRT
    """Build a TensorRT engine from a wsclip ONNX export; returns the engine's sidecar.

    precision: fp32 | fp16 | int8 | fp8 (fp8 only on compute capability 8.9+). int8/fp8 need
    `calib_images` or an existing `calib_cache`. `timing_cache` is read if present and written back.
    """
    from wsclip import __version__
    from wsclip.export import precision as prec
    from wsclip.export.onnx import sidecar_of, verify_artefact
    from wsclip.io import atomic_write_bytes, atomic_write_json, file_sha256

    trt = _trt()
    onnx_path, out = Path(onnx_path), Path(out)
    if out.suffix not in ENGINE_SUFFIXES:
        raise WsclipError(f"--out must end in one of {', '.join(ENGINE_SUFFIXES)}, got {out}")
    if precision not in prec.PRECISIONS:
        raise WsclipError(f"unknown precision '{precision}': use one of {', '.join(prec.PRECISIONS)}")
    src = verify_artefact(onnx_path)
    if src.get("precision", "fp32") != "fp32":
        raise WsclipError(f"{onnx_path} is already a {src['precision']} graph: pass the fp32 export and a precision flag")
    env = engine_environment(device)
    cc = tuple(int(v) for v in env["compute_capability"].split("."))
    if precision == "fp8" and cc < FP8_MIN_CAPABILITY:
        raise WsclipError(f"fp8 needs compute capability 8.9 or newer (Ada, Hopper); this {env['gpu']} is "
                          f"{env['compute_capability']}: use --int8 or --fp16")
    profile = make_profile(src, min_batch, opt_batch, max_batch, min_hw, opt_hw, max_hw)
    typed = _typed_graph(onnx_path, out, precision, src, profile, calib_images, calib_cache, calib_count, calib_method)
    problems = trt_readiness(typed, profile)
    if problems:
        raise BadFileError(f"TensorRT 10 would not take {typed}: " + "; ".join(problems[:5]))

    logger = trt.Logger(trt.Logger.WARNING)
    with torch.cuda.device(device):
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(os.fspath(typed)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BadFileError(f"TensorRT cannot parse {typed}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
        if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)  # fp32 engines should match PyTorch fp32
        opt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.items():
            opt_profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(opt_profile)
        cache_file = Path(timing_cache) if timing_cache else None
        cache = config.create_timing_cache(cache_file.read_bytes() if cache_file and cache_file.is_file() else b"")
        config.set_timing_cache(cache, False)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise WsclipError("TensorRT could not build the engine; its log above says why")
        atomic_write_bytes(out, bytes(plan))
        if cache_file is not None:
            atomic_write_bytes(cache_file, bytes(config.get_timing_cache().serialize()))

    keep = ("model", "inputs", "outputs", "dynamic_hw", "classes", "normalisation", "config", "source", "opset")
    meta = {
        "kind": src["kind"], "format": "tensorrt", **{k: src.get(k) for k in keep},
        "precision": precision,
        "onnx": {"path": os.fspath(onnx_path), "sha256": src.get("sha256"), "typed_graph": os.fspath(typed)},
        "tensorrt": {"version": env["tensorrt"], "gpu": env["gpu"], "compute_capability": env["compute_capability"]},
        "profile": profile,
        "timing_cache": os.fspath(timing_cache) if timing_cache else None,
        "size": out.stat().st_size, "sha256": file_sha256(out),
        "versions": {"wsclip": __version__, "torch": torch.__version__, "tensorrt": env["tensorrt"]},
    }
    atomic_write_json(sidecar_of(out), meta)
    return meta


class TrtRunner(ArtefactRunner):  # pragma: no cover - needs TensorRT and a GPU
    """A TensorRT engine with the labeler interface; torch CUDA tensors are the bindings.

    Runs on its own CUDA stream (ordered after torch's current stream and back). With
    `cuda_graphs=True` each new input shape is run once, captured as a CUDA graph, and
    replayed afterwards (inputs copied into the graph's static buffers).
    """

    def __init__(self, path, device: int = 0, cuda_graphs: bool = False, strict_gpu: bool = True):
        from wsclip.export.onnx import verify_artefact

        self.path = Path(path)
        meta = verify_artefact(self.path)  # a corrupt or swapped file is reported before TensorRT is needed
        trt = _trt()
        check_engine_metadata(meta, engine_environment(device), strict_gpu, self.path)
        super().__init__(meta)
        self.device = torch.device("cuda", device)
        self.cuda_graphs = bool(cuda_graphs)
        self._graphs: dict = {}
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                raise BadFileError(f"TensorRT cannot deserialise {self.path}; rebuild it with `wsclip export trt`")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(self.device)
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        if names != set(self.input_names) | set(self.output_names):
            raise BadFileError(f"{self.path} has tensors {sorted(names)}, its sidecar lists "
                               f"{sorted(set(self.input_names) | set(self.output_names))}: rebuild the engine")
        for spec in self.input_specs + self.output_specs:
            got = self.engine.get_tensor_dtype(spec["name"]).name
            if got != _TRT_DTYPE_NAMES[spec["dtype"]]:
                raise BadFileError(f"{self.path}: tensor '{spec['name']}' is {got}, expected {spec['dtype']}")

    def _bind(self, inputs: list[torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        for spec, t in zip(self.input_specs, inputs):
            self.context.set_input_shape(spec["name"], tuple(t.shape))
            self.context.set_tensor_address(spec["name"], t.data_ptr())
        for name, t in outputs.items():
            self.context.set_tensor_address(name, t.data_ptr())

    def _alloc(self, shapes: dict) -> dict[str, torch.Tensor]:
        return {s["name"]: torch.empty(shapes[s["name"]], dtype=TORCH_DTYPES[s["dtype"]], device=self.device)
                for s in self.output_specs}

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise WsclipError("TensorRT failed to run the engine; its log above says why")

    def run_torch(self, x, labels=None) -> dict[str, torch.Tensor]:
        arrays = self.convert_inputs(x, labels)
        inputs = [(a if isinstance(a, torch.Tensor) else torch.from_numpy(a)).to(self.device).contiguous() for a in arrays]
        check_in_profile(self.meta["profile"], {s["name"]: tuple(t.shape) for s, t in zip(self.input_specs, inputs)})
        shapes = self.output_shapes(inputs)
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            if self.cuda_graphs:
                outs = self._replay(inputs, shapes)
            else:
                outs = self._alloc(shapes)
                self._bind(inputs, outs)
                self._enqueue()
            for t in (*inputs, *outs.values()):
                t.record_stream(self.stream)
        caller.wait_stream(self.stream)
        return outs

    def _replay(self, inputs: list[torch.Tensor], shapes: dict) -> dict[str, torch.Tensor]:
        key = tuple(tuple(t.shape) for t in inputs)
        entry = self._graphs.get(key)
        if entry is None:
            static_in = [t.clone() for t in inputs]
            static_out = self._alloc(shapes)
            self._bind(static_in, static_out)
            self._enqueue()  # one plain run after a shape change, before capture (TensorRT's rule)
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                self._enqueue()
            entry = self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = entry
        for dst, src in zip(static_in, inputs):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        return {k: v.clone() for k, v in static_out.items()}
