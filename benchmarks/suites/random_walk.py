"""random-walk: wsclip's stencil random walk against IRN's dense formulation (T as an HW x HW matrix)."""

from benchmarks.suites._kernels import run_kernel

NAME = "random-walk"
DESCRIPTION = ("x T^256 by the 69-point stencil (Triton on GPU, sparse PyTorch on CPU) against IRN's dense "
               "HW x HW matrix squared 8 times (METHODS.md section 6); outputs compared before timing.")


def run(ctx, res):
    run_kernel(ctx, res, "random_walk", "maps/s", lambda shape: 1)
