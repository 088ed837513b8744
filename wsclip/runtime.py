"""Where and how a job runs, decided in one place: device selection (LOCAL_RANK aware), CPU threads,
and the numeric precision of the PyTorch paths on a GPU. Every stage (label, serve, train, bench)
picks its device here; none imports train/ for it.

Every labeler (CAM net, CLIP-ES, seg net; the server and the batch labeler use the same ones) and
the training loop (CLIMS, QA-CLIMS, IRN, seg) run their forward passes inside `precision(...)`:

- inference (`train=False`): fp32 means fp32. TF32 is OFF for fp32 matmuls and cuDNN convolutions,
  so a label computed on a GPU agrees with the CPU and ONNX Runtime within the fp32 tolerance of
  `wsclip export check`, and the torch.compile / CUDA-graph paths are held to eager at fp32
  tolerances. Speed is opted into explicitly and says so: `amp=True` (`--amp`) runs under bf16
  autocast, `--precision fp16|bf16` loads CLIP in that dtype. (PyTorch's own defaults differ per
  backend: TF32 off for matmuls, on for cuDNN convolutions; wsclip does not inherit them.)
- training (`train=True`): bf16 autocast when `amp` (the trainers' default on CUDA) and TF32 ON
  for whatever stays fp32: SGD noise dwarfs TF32's 2^-11 input rounding, and the losses and
  normalisations that autocast keeps in fp32 are not matmuls.
- on the CPU nothing changes: fp32, autocast off.

The Triton kernels' own `tl.dot` precision is decided beside them (`wsclip.kernels.tuning`).
The TF32 switches are process-wide in PyTorch: `precision` sets them and restores the previous
values on exit (wsclip never runs training and labeling concurrently in one process).
"""

from __future__ import annotations

import contextlib
import os

import torch

from wsclip.errors import WsclipError

#: TF32 for fp32 matmuls and convolutions on CUDA, per kind of work (see the module docstring)
TF32 = {"inference": False, "train": True}
#: the autocast dtype `amp=True` means on CUDA
AMP_DTYPE = torch.bfloat16


def _tf32_state() -> tuple:
    cuda, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(cuda, "fp32_precision") and hasattr(cudnn, "conv"):  # torch >= 2.9: the per-backend API
        return cuda.fp32_precision, cudnn.conv.fp32_precision
    return cuda.allow_tf32, cudnn.allow_tf32


def _set_tf32(state) -> None:
    cuda, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(cuda, "fp32_precision") and hasattr(cudnn, "conv"):
        if isinstance(state, bool):
            state = ("tf32" if state else "ieee",) * 2
        cuda.fp32_precision, cudnn.conv.fp32_precision = state
    else:
        if not isinstance(state[0], bool):
            state = (state[0] == "tf32", state[1] == "tf32")
        cuda.allow_tf32, cudnn.allow_tf32 = state


def tf32_enabled() -> tuple[bool, bool]:
    """(matmul, cuDNN conv) TF32 switches as PyTorch has them now."""
    m, c = _tf32_state()
    return (m if isinstance(m, bool) else m == "tf32"), (c if isinstance(c, bool) else c == "tf32")


def autocast_to(device, dtype: torch.dtype | None = None):
    """Autocast to `dtype` on `device`, or autocast explicitly off when `dtype` is None. The one place
    autocast is entered: the labelers' bf16 variants and CLIP-ES's bf16 frozen blocks use it too."""
    kind = torch.device(device).type
    kind = kind if kind in ("cuda", "cpu") else "cpu"
    return torch.autocast(kind, dtype=dtype) if dtype is not None else torch.autocast(kind, enabled=False)


def autocast(device, amp: bool = False):
    """bf16 autocast on CUDA when `amp`; autocast explicitly off otherwise (and always on the CPU)."""
    dev = torch.device(device)
    return autocast_to(dev, AMP_DTYPE if amp and dev.type == "cuda" else None)


@contextlib.contextmanager
def precision(device, amp: bool = False, train: bool = False):
    """The precision wsclip decides for a forward pass on `device`: autocast per `amp`, and on CUDA
    TF32 per `TF32["train" if train else "inference"]`; the TF32 switches are restored on exit."""
    dev = torch.device(device)
    saved = _tf32_state() if dev.type == "cuda" else None
    try:
        if saved is not None:
            _set_tf32(TF32["train" if train else "inference"])
        with autocast(dev, amp):
            yield
    finally:
        if saved is not None:
            _set_tf32(saved)


# ============================================================================ device and threads
PRECISIONS = ("fp32", "bf16", "fp16")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' (or None) -> the local CUDA device when there is one (cuda:LOCAL_RANK under torchrun), else CPU."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise WsclipError(f"unknown device '{device}': use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WsclipError(f"device '{device}' asked for but CUDA is not available here: use --device cpu")
    return dev


def set_threads(threads: int | None) -> None:
    """Limit PyTorch's intra-op CPU threads (None leaves the default)."""
    if threads is not None:
        if int(threads) < 1:
            raise WsclipError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(int(threads))


def precision_dtype(precision: str) -> torch.dtype:
    """torch dtype of 'fp32' | 'bf16' | 'fp16'."""
    try:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    except KeyError:
        raise WsclipError(f"unknown precision '{precision}': use one of {', '.join(PRECISIONS)}") from None
