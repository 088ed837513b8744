"""CAA transition and propagation: Triton kernels (interpreter) and fast paths against the literal algorithm."""

import pytest
import torch

from wsclip.errors import ShapeError
from wsclip.kernels import caa_propagate, caa_refine, caa_transition
from wsclip.kernels.caa import EPS, caa_propagate_reference, caa_transition_reference, symmetric_transition


def _attn(B, N, dtype=torch.float32):
    return (torch.randn(B, N, N) * 2).softmax(-1).to(dtype)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_reference_is_the_literal_algorithm():
    w = _attn(1, 6, torch.float64)[0]
    d = w.clone()
    for _ in range(3):
        d = d / d.sum(0, keepdim=True)  # columns
        d = d / d.sum(1, keepdim=True)  # rows
    s = (d + d.T) / 2
    torch.testing.assert_close(caa_transition_reference(w[None])[0], s @ s)
    # the scale-vector form used by the fast paths gives the same S
    torch.testing.assert_close(symmetric_transition(w[None])[0], s)


@pytest.mark.parametrize("B, N, dtype", [(2, 20, torch.float32), (1, 30, torch.float16), (1, 7, torch.float32),
                                         (2, 1, torch.float32)])
def test_transition_triton_matches_reference(B, N, dtype):
    attn = _attn(B, N, dtype)
    out = caa_transition(attn, backend="triton")
    ref = caa_transition_reference(attn.double())
    assert out.shape == (B, N, N) and out.dtype == torch.float32
    assert _rel(out, ref) < (1e-3 if dtype == torch.float16 else 1e-5)
    torch.testing.assert_close(out, out.transpose(1, 2))  # the mirrored tiles were written


@pytest.mark.parametrize("B, C, h, w", [(2, 3, 4, 5), (1, 1, 5, 6), (1, 17, 3, 3)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_propagate_matches_reference(B, C, h, w, backend):
    n = h * w
    trans = caa_transition_reference(_attn(B, n))
    cams = torch.rand(B, C, h, w)
    masks = torch.rand(B, C, h, w) > 0.4
    out = caa_propagate(trans, cams, masks, backend=backend)
    # the definition, one class at a time
    for b in range(B):
        for c in range(C):
            f = trans[b] @ (cams[b, c].reshape(-1) * masks[b, c].reshape(-1))
            f = (f - f.min()) / (f.max() - f.min() + EPS)
            torch.testing.assert_close(out[b, c].reshape(-1), f, atol=2e-4, rtol=1e-4)
    assert out.min() >= 0 and out.max() <= 1


def test_propagate_fp16_and_empty_mask():
    B, C, h, w = 1, 3, 5, 5
    trans = caa_transition_reference(_attn(B, h * w))
    cams = torch.rand(B, C, h, w)
    masks = torch.ones(B, C, h, w)
    masks[0, 1] = 0  # a class whose boxes are empty propagates nothing
    out = caa_propagate(trans.half(), cams.half(), masks, backend="triton")
    ref = caa_propagate_reference(trans, cams, masks)
    assert out.abs()[0, 1].max() == 0
    torch.testing.assert_close(out, ref, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("backend, shape, dtype", [
    ("torch", (2, 2, 3, 4), torch.float32),
    ("triton", (2, 2, 3, 4), torch.float32),
    ("triton", (1, 3, 5, 6), torch.float16),
])
def test_refine_equals_propagate_of_transition(backend, shape, dtype):
    B, C, h, w = shape
    attn = _attn(B, h * w, dtype)
    cams = torch.rand(B, C, h, w)
    masks = torch.rand(B, C, h, w) > 0.3
    ref = caa_propagate_reference(caa_transition_reference(attn.double()), cams.double(), masks)
    out = caa_refine(attn, cams, masks, backend=backend)
    assert out.shape == (B, C, h, w) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=1e-4)


def test_bad_shapes_are_user_errors():
    with pytest.raises(ShapeError, match="N, N"):
        caa_transition(torch.rand(2, 3, 4))
    with pytest.raises(ShapeError, match="12, 12"):
        caa_propagate(torch.rand(1, 10, 10), torch.rand(1, 2, 3, 4), torch.ones(1, 2, 3, 4))
    with pytest.raises(ShapeError, match="masks"):
        caa_propagate(torch.rand(1, 12, 12), torch.rand(1, 2, 3, 4), torch.ones(1, 1, 3, 4))
