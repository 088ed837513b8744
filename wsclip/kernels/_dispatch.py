"""Backend choice shared by the kernels: "auto" | "triton" | "torch".

Triton is imported lazily (only when a Triton path runs), so `import wsclip` stays light and
works on machines without Triton. Under `TRITON_INTERPRET=1` the Triton kernels run in the
CPU interpreter (slow; the tests use it) and are launched with a fixed config instead of
`triton.autotune`.
"""

from __future__ import annotations

import functools
import os

from wsclip.errors import BackendError, MissingExtraError

BACKENDS = ("auto", "triton", "torch")

# Tests set this to True: every kernel output buffer then starts as NaN (or -1 for integers),
# so an element a kernel forgot to write shows up instead of passing as leftover memory.
POISON = False


@functools.cache
def triton_available() -> bool:
    """True when `import triton` works here."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install counts as missing
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, *tensors) -> str:
    """Map "auto" | "triton" | "torch" onto the path that runs: "triton" or "torch".

    auto: Triton when a tensor is on CUDA and Triton is installed, PyTorch otherwise.
    "triton" with CPU tensors is allowed only under TRITON_INTERPRET=1.
    """
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    on_cuda = any(getattr(t, "is_cuda", False) for t in tensors)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if not triton_available():
        raise MissingExtraError("triton", "triton", "backend='triton'")
    if not on_cuda and not interpreting():
        raise BackendError(
            "backend='triton' needs CUDA tensors; on the CPU use backend='auto' or 'torch' "
            "(or set TRITON_INTERPRET=1 before starting Python to run the slow Triton interpreter)"
        )
    return "triton"


def import_triton():
    """(triton, triton.language), or MissingExtraError naming the extra to install."""
    if not triton_available():
        raise MissingExtraError("triton", "triton", "the Triton kernels")
    import triton
    import triton.language as tl

    return triton, tl


class _FixedConfig:
    """A kernel launched with fixed meta-parameters: `k[grid](*args)` adds them as keywords."""

    def __init__(self, kernel, config: dict):
        self.kernel = kernel
        self.config = dict(config)

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        return functools.partial(launch, **self.config)


def tuned(kernel, spec):
    """`triton.autotune` over `spec.configs` on a real GPU; `spec.interpret` as a fixed config in the
    interpreter. spec is the kernel's `tuning.KernelSpec`; its `tl.dot` precision (if any) reaches the
    kernel as the DOT constexpr. Launch as `k[grid](*args)` either way."""
    dot = {"DOT": spec.dot} if spec.dot else {}
    if interpreting():
        return _FixedConfig(kernel, {**spec.interpret, **dot})
    import triton

    cfgs = []
    for c in spec.configs:
        meta = {k: v for k, v in c.items() if k not in ("num_warps", "num_stages")}
        cfgs.append(triton.Config({**meta, **dot}, num_warps=c["num_warps"], num_stages=c["num_stages"]))
    return triton.autotune(configs=cfgs, key=list(spec.key))(kernel)


def triton_type(t) -> str:
    """The Triton signature type of a launch argument: "*fp32" for a float32 tensor, "i32", "fp32"."""
    if hasattr(t, "dtype") and hasattr(t, "data_ptr"):
        return "*" + _TYPES.get(str(t.dtype).removeprefix("torch."), str(t.dtype))
    return "fp32" if isinstance(t, float) else "i32"


_TYPES = {"uint8": "u8", "int8": "i8", "int32": "i32", "int64": "i64", "float16": "fp16", "bfloat16": "bf16",
          "float32": "fp32", "float64": "fp64"}


def check_launch(spec, **args) -> None:
    """Refuse a launch outside `spec`'s domain (an argument type or launch constexpr value that
    tuning.SPECS does not list, so CI never compiled it): a bug in the dispatch, not a user error."""
    for name, value in args.items():
        if name in spec.launch:
            ok, got, allowed = value in spec.launch[name], value, spec.launch[name]
        else:
            got, allowed = triton_type(value), spec.allowed(name)
            ok = got in allowed
        if not ok:
            raise AssertionError(f"{spec.name}: {name}={got!r} is outside the compiled launch domain {allowed} "
                                 "(wsclip/kernels/tuning.py)")


def empty(shape, dtype, device):
    """torch.empty for kernel outputs; filled with NaN / -1 while POISON is set (tests)."""
    import torch

    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        out.fill_(float("nan") if dtype.is_floating_point else -1)
    return out


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()
