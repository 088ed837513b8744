"""Kernels: each Triton kernel beside a plain PyTorch reference of the same function.

Every entry point takes backend="auto" | "triton" | "torch": auto runs Triton on CUDA
tensors and PyTorch elsewhere; "triton" on CPU tensors runs only under TRITON_INTERPRET=1
(the tests). Triton itself is imported on first use of a Triton path.
"""

from wsclip.constants import CLIP_MEAN, CLIP_STD  # noqa: F401 - re-exported (the masked_batch default)

from wsclip.kernels.caa import caa_propagate, caa_refine, caa_transition  # noqa: E402
from wsclip.kernels.masked_batch import masked_batch  # noqa: E402
from wsclip.kernels.random_walk import dense_random_walk, neighbor_offsets, random_walk  # noqa: E402

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "caa_propagate",
    "caa_refine",
    "caa_transition",
    "dense_random_walk",
    "masked_batch",
    "neighbor_offsets",
    "random_walk",
]
