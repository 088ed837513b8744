"""ONNX Runtime backend with the labeler interface of `wsclip.label.cam_labeler`.

    runner = OrtRunner("cam.onnx")                   # CPU; device="cuda" needs onnxruntime-gpu
    out = runner.run(images_uint8, labels=None)      # {"cams": (B,K,H,W) float32, "mask": (B,H,W) int64}

On CUDA, torch CUDA tensors are bound directly (IO binding: no host round trip) and
`run_torch` returns torch CUDA tensors; ORT runs on torch's current stream. The file is checked
against its sidecar (SHA-256) before a session is created, so a corrupt or swapped file is a
clear error rather than a crash or silent garbage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from wsclip.errors import BadFileError, MissingExtraError, ShapeError, WsclipError

NP_DTYPES = {"uint8": np.uint8, "float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64}
TORCH_DTYPES = {"uint8": torch.uint8, "float32": torch.float32, "float16": torch.float16, "int32": torch.int32,
                "int64": torch.int64}


def resolve_shape(shape: Sequence, dims: dict[str, int]) -> tuple[int, ...]:
    """Concrete shape from a sidecar shape whose symbolic axes ("batch", "height", ...) are in `dims`."""
    out = []
    for d in shape:
        if isinstance(d, str):
            if d not in dims:
                raise ShapeError(f"cannot resolve axis '{d}' from the inputs")
            out.append(int(dims[d]))
        else:
            out.append(int(d))
    return tuple(out)


def bind_dims(specs: Sequence[dict], arrays: Sequence) -> dict[str, int]:
    """Match input arrays against the sidecar's input specs; returns the symbolic axis sizes."""
    dims: dict[str, int] = {}
    for spec, arr in zip(specs, arrays):
        shape, got = spec["shape"], tuple(arr.shape)
        if len(got) != len(shape):
            raise ShapeError(f"input '{spec['name']}' must have shape {_fmt(shape)}, got {got}")
        for want, n in zip(shape, got):
            if isinstance(want, str):
                if dims.setdefault(want, int(n)) != int(n):
                    raise ShapeError(f"axis '{want}' is {dims[want]} in one input and {n} in '{spec['name']}'")
            elif int(want) != int(n):
                raise ShapeError(f"input '{spec['name']}' must have shape {_fmt(shape)}, got {got}: "
                                 "this model was exported for a fixed size (re-export with --dynamic-hw or resize)")
    return dims


def _fmt(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


class ArtefactRunner:
    """What the ONNX Runtime and TensorRT runners share: sidecar, input conversion, `run()`."""

    def __init__(self, meta: dict):
        self.meta = meta
        self.model = meta["model"]
        self.classes = tuple(meta.get("classes") or ())
        self.input_specs = list(meta["inputs"])
        self.output_specs = list(meta["outputs"])
        self.input_names = tuple(s["name"] for s in self.input_specs)
        self.output_names = tuple(s["name"] for s in self.output_specs)

    # ------------------------------------------------------------------ inputs
    def convert_inputs(self, x, labels=None) -> list:
        """Inputs in the graph's dtypes (torch CUDA tensors stay on the GPU; everything else becomes numpy)."""
        arrays = []
        for spec in self.input_specs:
            if spec["name"] == "labels":
                arrays.append(self._labels(labels, arrays[0].shape[0], on=arrays[0]))
            else:
                arrays.append(self._convert(x, spec))
        if labels is not None and "labels" not in self.input_names:
            raise WsclipError(f"this {self.model} model has no class-selection input; pass labels=None")
        bind_dims(self.input_specs, arrays)
        return arrays

    @staticmethod
    def _convert(x, spec: dict):
        want = spec["dtype"]
        if isinstance(x, torch.Tensor) and x.is_cuda:
            t = x
            if len(spec["shape"]) == 4 and t.dim() == 3:
                t = t[None]
            return _cast_torch(t, want).contiguous()
        a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if len(spec["shape"]) in (2, 4) and a.ndim == len(spec["shape"]) - 1:
            a = a[None]
        return np.ascontiguousarray(_cast_numpy(a, want))

    def _labels(self, labels, batch: int, on):
        k = int(next(s for s in self.input_specs if s["name"] == "labels")["shape"][1])
        if labels is None:
            y = np.ones((batch, k), np.float32)
        else:
            y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
            y = (y[None] if y.ndim == 1 else y).astype(np.float32)
        if y.shape != (batch, k):
            raise ShapeError(f"labels must be (B, K) = ({batch}, {k}), got {y.shape}")
        return torch.from_numpy(np.ascontiguousarray(y)).to(on.device) if isinstance(on, torch.Tensor) else y

    # ------------------------------------------------------------------ outputs
    def output_shapes(self, arrays) -> dict[str, tuple[int, ...]]:
        dims = bind_dims(self.input_specs, arrays)
        return {s["name"]: resolve_shape(s["shape"], dims) for s in self.output_specs}

    def run(self, x, labels=None) -> dict[str, np.ndarray]:
        """Labeler interface: numpy outputs keyed by output name."""
        outs = self.run_torch(x, labels)
        return {k: (v.cpu().numpy() if isinstance(v, torch.Tensor) else v) for k, v in outs.items()}

    def run_torch(self, x, labels=None) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError


def _cast_numpy(a: np.ndarray, want: str) -> np.ndarray:
    if want == "uint8" and a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating):  # [0, 1] floats into a uint8 graph
            return np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
        return np.clip(a, 0, 255).astype(np.uint8)
    if want in ("float32", "float16") and a.dtype == np.uint8:
        return (a.astype(np.float32) / 255.0).astype(NP_DTYPES[want])
    if want in ("int32", "int64") and np.issubdtype(a.dtype, np.floating):
        raise ShapeError(f"expected integer tokens, got {a.dtype}")
    return a.astype(NP_DTYPES[want], copy=False)


def _cast_torch(t: torch.Tensor, want: str) -> torch.Tensor:
    if want == "uint8" and t.dtype != torch.uint8:
        return (t.float() * 255.0).round().clamp(0, 255).to(torch.uint8) if t.is_floating_point() else t.clamp(0, 255).to(torch.uint8)
    if want in ("float32", "float16") and t.dtype == torch.uint8:
        return (t.float() / 255.0).to(TORCH_DTYPES[want])
    return t.to(TORCH_DTYPES[want])


def _parse_device(device) -> tuple[str, int]:
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise WsclipError(f"unknown device '{device}': use cpu or cuda[:N]")
    return dev.type, dev.index or 0


class OrtRunner(ArtefactRunner):
    """An exported .onnx file run by ONNX Runtime on the CPU or (onnxruntime-gpu) CUDA."""

    def __init__(self, path, device="cpu", threads: int | None = None, verify: bool = True):
        from wsclip.errors import require
        from wsclip.export.onnx import read_sidecar, verify_artefact

        ort = require("onnxruntime", "onnx", "ONNX Runtime inference")
        self.path = Path(path)
        meta = verify_artefact(self.path) if verify else read_sidecar(self.path)
        if meta.get("format") != "onnx":
            raise BadFileError(f"{self.path} is a '{meta.get('format')}' artefact, not ONNX")
        super().__init__(meta)
        self.device_type, self.device_id = _parse_device(device)
        providers: list = ["CPUExecutionProvider"]
        if self.device_type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise MissingExtraError("onnxruntime-gpu", "trt", "ONNX Runtime on CUDA")
            opts = {"device_id": self.device_id}
            if torch.cuda.is_available():  # share torch's stream: bound tensors are ready, outputs usable at once
                opts["user_compute_stream"] = str(torch.cuda.current_stream(self.device_id).cuda_stream)
            providers = [("CUDAExecutionProvider", opts), "CPUExecutionProvider"]
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if meta.get("precision") in ("fp16", "fp8") and self.device_type == "cpu":
            # ORT 1.31's CPU optimiser crashes on converted fp16 graphs and fuses fp8 Q/DQ into QLinearConv,
            # which has no fp8 CPU kernel: run these graphs (TensorRT inputs, checked here) unoptimised
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            so.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=so, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types for bad graphs
            raise BadFileError(f"ONNX Runtime cannot load {self.path}: {str(exc).splitlines()[0][:300]}; "
                               "the file is corrupt or not an ONNX model: re-export it") from exc
        got_in = tuple(i.name for i in self.session.get_inputs())
        got_out = tuple(o.name for o in self.session.get_outputs())
        if got_in != self.input_names or got_out != self.output_names:
            raise BadFileError(f"{self.path} has inputs {got_in} / outputs {got_out} but its sidecar lists "
                               f"{self.input_names} / {self.output_names}: the sidecar belongs to another export")

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def run_torch(self, x, labels=None) -> dict:
        arrays = self.convert_inputs(x, labels)
        if self.device_type == "cuda" and any(isinstance(a, torch.Tensor) for a in arrays):
            return self._run_bound(arrays)
        if any(isinstance(a, torch.Tensor) for a in arrays):
            arrays = [a.cpu().numpy() if isinstance(a, torch.Tensor) else a for a in arrays]
        outs = self.session.run(list(self.output_names), dict(zip(self.input_names, arrays)))
        return {k: torch.from_numpy(v) for k, v in zip(self.output_names, outs)}

    def _run_bound(self, arrays) -> dict:  # pragma: no cover - needs onnxruntime-gpu and a GPU
        """IO binding: inputs and preallocated outputs are torch CUDA tensors."""
        dev = torch.device("cuda", self.device_id)
        binding = self.session.io_binding()
        tensors = [a.to(dev) if isinstance(a, torch.Tensor) else torch.from_numpy(a).to(dev) for a in arrays]
        for spec, t in zip(self.input_specs, tensors):
            t = t.contiguous()
            binding.bind_input(spec["name"], "cuda", self.device_id, NP_DTYPES[spec["dtype"]], list(t.shape), t.data_ptr())
        outs = {}
        for spec, shape in zip(self.output_specs, self.output_shapes(tensors).values()):
            t = torch.empty(shape, dtype=TORCH_DTYPES[spec["dtype"]], device=dev)
            binding.bind_output(spec["name"], "cuda", self.device_id, NP_DTYPES[spec["dtype"]], list(shape), t.data_ptr())
            outs[spec["name"]] = t
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return outs
