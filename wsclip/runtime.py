"""Where and how a job runs: device selection (LOCAL_RANK aware), CPU threads, precision.

Every stage (label, serve, train, bench) picks its device here; none imports train/ for it.
"""

from __future__ import annotations

import contextlib
import os

import torch

from wsclip.errors import WsclipError

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


def autocast(device: torch.device, amp: bool = False, dtype: torch.dtype = torch.bfloat16):
    """bf16 autocast on CUDA when `amp`, else a no-op context."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def precision_dtype(precision: str) -> torch.dtype:
    """torch dtype of 'fp32' | 'bf16' | 'fp16'."""
    try:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    except KeyError:
        raise WsclipError(f"unknown precision '{precision}': use one of {', '.join(PRECISIONS)}") from None
