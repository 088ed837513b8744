"""Ways to run one PyTorch labeler module (same weights, same maths): the `--backend` variants.

    eager          fp32, as built
    channels-last  fp32 with NHWC activations and weights (oneDNN / cuDNN NHWC kernels)
    bf16           bf16 autocast + channels-last (CPUs with bf16 instructions, CUDA)
    compile        torch.compile (Inductor) of the module

ONNX Runtime and TensorRT run exported files (`wsclip.export`): a labeler given a .onnx or an
engine uses them. `auto` is resolved by the caller (`wsclip.serve.autobackend`): measured on
the CPU, eager on CUDA (bf16 with --amp).
"""

from __future__ import annotations

import contextlib
import copy
import functools

import torch

from wsclip.errors import WsclipError

VARIANTS = ("eager", "channels-last", "bf16", "compile")
BACKENDS = ("auto", *VARIANTS)


@functools.cache
def cpu_has_bf16() -> bool:
    """True when oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX), not emulated."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise WsclipError(f"unknown backend '{name}': use one of {', '.join(BACKENDS)} (or pass a .onnx / engine file)")
    return name


class Variant:
    """`module` run as variant `name`: call it like the module (inference mode, the variant's autocast).

    channels-last, bf16 and compile work on a copy when `copy_module` (the probe compares them
    with the original); `module` is then left as it was.
    """

    def __init__(self, module: torch.nn.Module, name: str, device, copy_module: bool = False):
        if name not in VARIANTS:
            raise WsclipError(f"unknown backend variant '{name}': use one of {', '.join(VARIANTS)}")
        self.name = name
        self.device = torch.device(device)
        if copy_module and name != "eager":
            module = copy.deepcopy(module)
        self.module = module
        self.nhwc = name in ("channels-last", "bf16")
        if self.nhwc:
            module.to(memory_format=torch.channels_last)
        self._fn = torch.compile(module) if name == "compile" else module

    def autocast(self):
        from wsclip.runtime import autocast_to

        return autocast_to(self.device, torch.bfloat16 if self.name == "bf16" else None)

    def __call__(self, x: torch.Tensor, *args, eager: bool = False, method: str | None = None, **kwargs):
        """Run the module (or its `method`, which always runs eagerly); `eager` bypasses torch.compile
        (e.g. when forward hooks must fire)."""
        if self.nhwc and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        fn = getattr(self.module, method) if method else self.module if eager else self._fn
        with torch.inference_mode(), self.autocast():
            return fn(x, *args, **kwargs)

    def __repr__(self) -> str:
        return f"Variant({self.name!r}, {self.device})"


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to `n` inside the block (restored after). For the light torch work
    around an ONNX Runtime / TensorRT network: ORT's own thread pool and torch's OpenMP threads,
    both spinning on the same cores, slow each other down several times on a small CPU."""
    old = torch.get_num_threads()
    if n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
