"""caa: CLIP-ES class-aware attention affinity kernels against their PyTorch references."""

from benchmarks.suites._kernels import run_kernel

NAME = "caa"
DESCRIPTION = ("CAA transition and box-masked propagation: caa_refine's (V S) S and the Triton kernels against "
               "the reference (6 normalisation passes, N^3 square, matmul).")


def run(ctx, res):
    run_kernel(ctx, res, "caa", "images/s", lambda shape: shape["B"])
