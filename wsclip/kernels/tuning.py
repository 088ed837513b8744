"""Every Triton kernel's launch space in one place: GPU autotune configs, the interpreter's config,
the argument types and launch-time constants the dispatch may pass, and the `tl.dot` precision.

The kernels build their `triton.autotune` from `SPECS` (`_dispatch.tuned(kernel, SPECS[name])`) and
check each launch against it (`_dispatch.check_launch`); `wsclip.kernels.aot` compiles every config
for every GPU target from it (tests/kernels/test_compile.py), so a config or a dtype added here is
compiled for sm_80, sm_90 and sm_100 in CI automatically. No torch or triton import here.

Precision of `tl.dot` (the only matrix products in the kernels, all in CAA; see `DOT_PRECISION`,
TF32 for both, with the reasons):
on a GPU, `tl.dot` on fp32 operands defaults to TF32 tensor cores (inputs rounded to 10 mantissa
bits), while the CPU interpreter multiplies in full fp32. Each kernel therefore names its precision
here, passes it to `tl.dot(..., input_precision=DOT)`, and its parity test takes the tolerance from
`dot_rel_bound` for that precision, so the first real GPU run is held to the bound of the arithmetic
it actually does.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

#: the GPU targets compiled in CI: A100 (sm_80), H100/H200 (sm_90), B200 (sm_100)
TARGETS = (80, 90, 100)

#: largest shared memory one block may use, in bytes (CUDA programming guide, "technical specifications
#: per compute capability": 163 KB on 8.0 with the opt-in, 227 KB on 9.0 and 10.0; Triton opts in)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}

#: a block's registers come out of a 64K-entry register file; one thread may use at most 255
REGS_PER_BLOCK, REGS_PER_THREAD = 65536, 255

#: unit roundoff of an input rounded to TF32 (10 explicit mantissa bits) and of fp32
U_TF32, U_FP32 = 2.0**-11, 2.0**-24


def dot_rel_bound(precision: str, k: int) -> float:
    """Element-wise relative error bound of a `tl.dot` over k terms of NON-NEGATIVE fp32 products
    accumulated in fp32 (every CAA product is: attention, its scales, CAMs and masks are >= 0).

    "tf32": each input rounded to TF32 (relative 2^-11), so each product is off by at most
    (1 + 2^-11)^2 - 1; "ieee": the products are exact fp32 roundings (2^-24). The fp32 sum of k
    non-negative terms adds at most k * 2^-24 relative, whatever order the tensor cores use.
    """
    if precision == "tf32":
        per_product = (1 + U_TF32) ** 2 - 1
    elif precision == "ieee":
        per_product = U_FP32
    else:
        raise ValueError(f"unknown tl.dot input precision {precision!r}")
    return per_product + k * U_FP32 * (1 + per_product)


@dataclass(frozen=True)
class KernelSpec:
    """One Triton kernel's launch space.

    module, kernel: `wsclip.kernels.<module>._jit_kernels()[kernel]` is the `triton.jit` function.
    configs: the GPU autotune configs, each the meta-parameters plus "num_warps" and "num_stages".
    key: the arguments whose change re-runs the autotuner. interpret: the config the CPU interpreter uses.
    args: every runtime argument in the kernel's order, mapped to a Triton type ("*fp32", "i32", "fp32")
      or to a tuple of the types the dispatch may pass; a tuple key names arguments that always share one.
    launch: constexprs the dispatch sets at launch (not tuned), each with every value it may pass.
    dot: `tl.dot` input precision (passed to the kernel as the DOT constexpr), None without a tl.dot.
    """

    module: str
    kernel: str
    configs: tuple[dict, ...]
    key: tuple[str, ...]
    interpret: dict
    args: dict
    launch: dict = field(default_factory=dict)
    dot: str | None = None

    @property
    def name(self) -> str:
        return f"{self.module}.{self.kernel}"

    def allowed(self, arg: str) -> tuple[str, ...]:
        """The Triton types `arg` may have at launch."""
        for names, types in self.args.items():
            if arg == names or (isinstance(names, tuple) and arg in names):
                return (types,) if isinstance(types, str) else tuple(types)
        raise KeyError(f"{self.name} has no argument {arg!r}")

    def signatures(self) -> list[dict]:
        """Launch signatures covering the domain: every type of every argument and every combination
        of the launch constexprs appears at least once (independent choices are combined in step, not
        crossed: the i-th signature takes each argument's (i mod n)-th type); {arg: type or value}."""
        choices = {names: ((t,) if isinstance(t, str) else tuple(t)) for names, t in self.args.items()}
        launch = [dict(zip(self.launch, vals)) for vals in itertools.product(*self.launch.values())]
        width = max([len(v) for v in choices.values()] + [len(launch)])
        sigs = []
        for i in range(width):
            sig = {}
            for names, types in choices.items():
                for n in names if isinstance(names, tuple) else (names,):
                    sig[n] = types[i % len(types)]
            sigs.append({**sig, **launch[i % len(launch)]})
        return sigs


def _grid(num_warps, num_stages=(3,), **meta_lists) -> tuple[dict, ...]:
    """Every combination of the listed meta-parameter values, warp counts and stage counts (3 is
    triton.Config's default)."""
    names = list(meta_lists)
    out = []
    for vals in itertools.product(*meta_lists.values()):
        for w, s in itertools.product(num_warps, num_stages):
            out.append({**dict(zip(names, vals)), "num_warps": w, "num_stages": s})
    return tuple(out)


_I32, _F32 = "i32", "fp32"
_FLOATS = ("*fp16", "*bf16", "*fp32")

#: tl.dot input precision per CAA kernel, with the reason (see the module docstring)
DOT_PRECISION = {
    # S @ S: 2 N^3 FLOP, compute-bound (N = 784 patches at CLIP-ES's 448 px): TF32 tensor cores are
    # about 8x the fp32 FMA rate on an H100. The element-wise error bound (1e-3 relative, all terms
    # >= 0) is far below what the CAM threshold that follows can see; CLIP-ES itself runs fp32.
    "sym_square": "tf32",
    # F = V A^T / V S: C <= 32 columns per program, bound by reading A, so the precision costs no
    # time; but exact fp32 ("ieee") makes Triton multiply with FMAs whose per-thread accumulators spill
    # registers in every tile shape tried (compile test, ptxas on sm_80: 8-50 KB of spills), while
    # TF32 mma keeps them in the tensor-core layout. TF32 then: caa_refine chains two products, so
    # about 2e-3 relative before the min-max normalisation, invisible behind the CAM threshold.
    "propagate": "tf32",
}

SPECS: dict[str, KernelSpec] = {
    s.name: s
    for s in (
        KernelSpec(
            module="masked_batch", kernel="fwd",
            configs=_grid(num_warps=(4, 8), BLOCK=(256, 512, 1024)),
            key=("S", "H", "W"), interpret={"BLOCK": 64},
            # images keep their dtype (uint8 from the labelers, fp32 in training; fp64 is cast to fp32);
            # CAMs are cast to fp32 (small, read as fp32 anyway); fg and bg are one buffer
            args={"img": ("*u8", "*fp16", "*bf16", "*fp32"), "cam": "*fp32", "pairs": "*i64",
                  ("fg", "bg"): _FLOATS, "H": _I32, "W": _I32, "h": _I32, "w": _I32, "K": _I32, "S": _I32,
                  "syi": _F32, "sxi": _F32, "syc": _F32, "sxc": _F32,
                  "a0": _F32, "a1": _F32, "a2": _F32, "b0": _F32, "b1": _F32, "b2": _F32},
        ),
        KernelSpec(
            module="masked_batch", kernel="grad",
            # (512, 4 warps) and (1024, 8 warps) spill on sm_100 (uint8 images, fp16 gradients): left out
            configs=tuple(c for c in _grid(num_warps=(4, 8), BLOCK=(256, 512, 1024))
                          if (c["BLOCK"], c["num_warps"]) not in ((512, 4), (1024, 8))),
            key=("S", "H", "W"), interpret={"BLOCK": 64},
            args={"img": ("*u8", "*fp16", "*bf16", "*fp32"), "pairs": "*i64", ("dfg", "dbg"): _FLOATS,
                  "g": "*fp32", "H": _I32, "W": _I32, "S": _I32, "syi": _F32, "sxi": _F32,
                  "a0": _F32, "a1": _F32, "a2": _F32, "b0": _F32, "b1": _F32, "b2": _F32},
        ),
        KernelSpec(
            module="random_walk", kernel="rw_step",
            # (256 pixels, 2 warps) spills on sm_80 with 16 classes per program: left out
            configs=tuple(c for c in _grid(num_warps=(2, 4), BLOCK_P=(64, 128, 256))
                          if (c["BLOCK_P"], c["num_warps"]) != (256, 2)),
            key=("C", "H", "W", "K"), interpret={"BLOCK_P": 64},
            args={("src", "dst", "add", "wf", "inv_d"): "*fp32", "offs": "*i32",
                  "C": _I32, "H": _I32, "W": _I32, "K": _I32},
            launch={"BLOCK_C": (1, 2, 4, 8, 16)},  # min(next_pow2(C), 16)
        ),
        KernelSpec(
            module="caa", kernel="sym_square",
            # S is formed from four loads per tile in registers: 128-wide tiles, and 64 x 32 / 64 x 64
            # tiles on 4 warps, spill on every target (compile test); these fit
            configs=(
                {"BLOCK": 64, "BLOCK_K": 16, "num_warps": 8, "num_stages": 2},
                {"BLOCK": 32, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2},
                {"BLOCK": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2},
            ),
            key=("N",), interpret={"BLOCK": 16, "BLOCK_K": 16},
            args={"w": _FLOATS, ("r", "c", "out"): "*fp32", "N": _I32},
            dot=DOT_PRECISION["sym_square"],
        ),
        KernelSpec(
            module="caa", kernel="propagate",
            # with SYM two accumulators and a transposed tile of A live in registers: 128-row tiles,
            # 32 x 128 tiles and 4-warp 64 x 64 tiles spill (compile test); these fit
            configs=(
                {"BLOCK_I": 32, "BLOCK_J": 64, "num_warps": 8, "num_stages": 2},
                {"BLOCK_I": 64, "BLOCK_J": 32, "num_warps": 4, "num_stages": 2},
                {"BLOCK_I": 64, "BLOCK_J": 64, "num_warps": 8, "num_stages": 2},
            ),
            key=("N", "C", "SYM"), interpret={"BLOCK_I": 16, "BLOCK_J": 16},
            args={"a": _FLOATS, ("v", "r", "c", "out"): "*fp32", "N": _I32, "C": _I32},
            launch={"SYM": (False, True), "BLOCK_C": (16, 32)},  # classes in blocks of at most 32
            dot=DOT_PRECISION["propagate"],
        ),
    )
}

#: most classes one CAA propagate program handles; more classes get more programs
CAA_MAX_BLOCK_C = max(SPECS["caa.propagate"].launch["BLOCK_C"])
#: most classes one random-walk program handles
RW_MAX_BLOCK_C = max(SPECS["random_walk.rw_step"].launch["BLOCK_C"])
