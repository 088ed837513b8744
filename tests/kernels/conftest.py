"""Kernel tests: every kernel output buffer starts as NaN, so unwritten elements fail the comparison.

The Triton paths run where `kdev` says: in the CPU interpreter under TRITON_INTERPRET=1 (CI; tests/
conftest.py sets it), on CUDA when TRITON_INTERPRET=0 on a GPU machine (benchmarks/gpu_check.sh).
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    from wsclip.kernels import _dispatch

    monkeypatch.setattr(_dispatch, "POISON", True)
    yield


@pytest.fixture
def kdev() -> torch.device:
    """The device the Triton kernels run on in this session: CPU (interpreter) or CUDA."""
    import os

    from wsclip.kernels._dispatch import interpreting

    want_cuda = os.environ.get("WSCLIP_KERNEL_DEVICE") == "cuda"  # set by gpu_check.sh: a skip would hide a failure
    if interpreting() and not want_cuda:
        return torch.device("cpu")
    if torch.cuda.is_available() and not interpreting():
        return torch.device("cuda")
    if want_cuda:
        pytest.fail("WSCLIP_KERNEL_DEVICE=cuda but CUDA is not available or TRITON_INTERPRET=1")
    pytest.skip("the Triton kernels need TRITON_INTERPRET=1 (interpreter) or a CUDA GPU")
