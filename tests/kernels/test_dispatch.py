"""Backend resolution and output poisoning shared by the kernels."""

import pytest
import torch

from wsclip.errors import BackendError, WsclipError
from wsclip.kernels import _dispatch
from wsclip.kernels._dispatch import empty, next_pow2, resolve_backend


def test_auto_is_torch_on_cpu_and_torch_is_torch():
    x = torch.zeros(2)
    assert resolve_backend("auto", x) == "torch"
    assert resolve_backend("torch", x) == "torch"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", x) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendError, match="CUDA"):
        resolve_backend("triton", x)


def test_unknown_backend_is_a_user_error():
    with pytest.raises(WsclipError, match="auto, triton, torch"):
        resolve_backend("cuda", torch.zeros(1))


def test_poisoned_buffers_and_pow2():
    assert torch.isnan(empty((3, 2), torch.float32, "cpu")).all()
    assert (empty((4,), torch.int32, "cpu") == -1).all()
    assert [next_pow2(n) for n in (0, 1, 2, 3, 16, 17)] == [1, 1, 2, 4, 16, 32]
    assert _dispatch.POISON
