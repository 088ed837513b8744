"""masked-batch: the fused masked-batch kernel (CLIMS inputs) against its PyTorch reference."""

from benchmarks.suites._kernels import run_kernel

NAME = "masked-batch"
DESCRIPTION = ("fg/bg CLIP inputs of every (image, class) pair in one pass (Triton) against interpolate + "
               "normalise + multiply in PyTorch; forward and forward+backward.")


def run(ctx, res):
    run_kernel(ctx, res, "masked_batch", "pairs/s", lambda shape: shape["pairs"])
