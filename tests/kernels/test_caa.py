"""CAA transition and propagation: Triton kernels (interpreter) and fast paths against the literal algorithm."""

import pytest
import torch

from wsclip.errors import ShapeError
from wsclip.kernels import caa_propagate, caa_refine, caa_transition
from wsclip.kernels.caa import EPS, _sources, caa_propagate_reference, caa_transition_reference, symmetric_transition
from wsclip.kernels.tuning import SPECS, U_FP32, dot_rel_bound

# Tolerances are derived, not tuned: element-wise relative bounds (every term of every CAA product is
# >= 0) of the tl.dot precision decided in tuning.DOT_PRECISION (TF32 on a GPU), plus the fp32
# roundings before the product. In the interpreter tl.dot is plain fp32, so these bounds are loose
# there; on CUDA (benchmarks/gpu_check.sh) they are what the kernels must meet.
U_FP16 = 2.0**-11


def _upstream(n: int) -> float:
    """Relative error of the fp32 Sinkhorn scales (3 rounds of column and row sums over n terms) and
    of forming S from them (a few roundings), before any tl.dot."""
    return (6 * (n + 1) + 8) * U_FP32


def _minmax_atol(f_ref: torch.Tensor, rel: float) -> torch.Tensor:
    """Absolute error bound of min-max normalising maps f (..., N) known to `rel` element-wise:
    |d((f - lo) / (hi - lo))| <= 4 rel hi / (hi - lo + EPS); one value per map, broadcastable."""
    hi, lo = f_ref.amax(-1, keepdim=True), f_ref.amin(-1, keepdim=True)
    return 4 * rel * hi / (hi - lo + EPS) + 1e-6


def _attn(B, N, dtype=torch.float32):
    return (torch.randn(B, N, N) * 2).softmax(-1).to(dtype)


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
def test_transition_triton_matches_reference(B, N, dtype, kdev):
    attn = _attn(B, N, dtype)
    out = caa_transition(attn.to(kdev), backend="triton").cpu()
    ref = caa_transition_reference(attn.double())
    assert out.shape == (B, N, N) and out.dtype == torch.float32
    tol = dot_rel_bound(SPECS["caa.sym_square"].dot, N) + _upstream(N)
    assert ((out.double() - ref).abs() <= tol * ref.abs() + 1e-12).all(), float(((out - ref).abs() / ref).max())
    torch.testing.assert_close(out, out.transpose(1, 2))  # the mirrored tiles were written


@pytest.mark.parametrize("B, C, h, w", [(2, 3, 4, 5), (1, 1, 5, 6), (1, 17, 3, 3), (1, 40, 3, 4)])  # 40: two class blocks
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_propagate_matches_reference(B, C, h, w, backend, request):
    n = h * w
    trans = caa_transition_reference(_attn(B, n)).float()
    cams = torch.rand(B, C, h, w)
    masks = torch.rand(B, C, h, w) > 0.4
    dev = request.getfixturevalue("kdev") if backend == "triton" else "cpu"
    out = caa_propagate(trans.to(dev), cams.to(dev), masks.to(dev), backend=backend).cpu()
    rel = dot_rel_bound(SPECS["caa.propagate"].dot, n) + 2 * U_FP32  # + the fp32 product cam * mask
    # the definition, one class at a time, in float64
    for b in range(B):
        for c in range(C):
            f = trans[b].double() @ (cams[b, c].reshape(-1) * masks[b, c].reshape(-1)).double()
            g = (f - f.min()) / (f.max() - f.min() + EPS)
            torch.testing.assert_close(out[b, c].reshape(-1).double(), g, atol=float(_minmax_atol(f, rel)), rtol=0)
    assert out.min() >= 0 and out.max() <= 1


def test_propagate_fp16_and_empty_mask(kdev):
    B, C, h, w = 1, 3, 5, 5
    n = h * w
    trans = caa_transition_reference(_attn(B, n))
    cams = torch.rand(B, C, h, w)
    masks = torch.ones(B, C, h, w)
    masks[0, 1] = 0  # a class whose boxes are empty propagates nothing
    out = caa_propagate(trans.half().to(kdev), cams.half().to(kdev), masks.to(kdev), backend="triton").cpu()
    ref = caa_propagate_reference(trans, cams, masks)
    assert out.abs()[0, 1].max() == 0
    # transition and CAMs rounded to fp16 (2^-11 each), then the product at its decided precision
    rel = 2 * U_FP16 + dot_rel_bound(SPECS["caa.propagate"].dot, n) + 2 * U_FP32
    f = torch.matmul(_sources(cams, masks, torch.float64), trans.double().transpose(1, 2))
    assert ((out - ref).abs() <= _minmax_atol(f, rel).reshape(B, C, 1, 1)).all()


@pytest.mark.parametrize("backend, shape, dtype", [
    ("torch", (2, 2, 3, 4), torch.float32),
    ("triton", (2, 2, 3, 4), torch.float32),
    ("triton", (1, 3, 5, 6), torch.float16),
])
def test_refine_equals_propagate_of_transition(backend, shape, dtype, request):
    B, C, h, w = shape
    n = h * w
    attn = _attn(B, n, dtype)
    cams = torch.rand(B, C, h, w)
    masks = torch.rand(B, C, h, w) > 0.3
    trans = caa_transition_reference(attn.double())
    ref = caa_propagate_reference(trans, cams.double(), masks)
    dev = request.getfixturevalue("kdev") if backend == "triton" else "cpu"
    out = caa_refine(attn.to(dev), cams.to(dev), masks.to(dev), backend=backend).cpu()
    assert out.shape == (B, C, h, w) and out.dtype == torch.float32
    # two chained products with S, each at the propagation's decided precision, after fp32 scales
    rel = 2 * (dot_rel_bound(SPECS["caa.propagate"].dot, n) + _upstream(n)) + 2 * U_FP32
    f = torch.matmul(_sources(cams, masks, torch.float64), trans.transpose(1, 2))
    assert ((out.double() - ref).abs() <= _minmax_atol(f, rel).reshape(B, C, 1, 1)).all()


def test_bad_shapes_are_user_errors():
    with pytest.raises(ShapeError, match="N, N"):
        caa_transition(torch.rand(2, 3, 4))
    with pytest.raises(ShapeError, match="12, 12"):
        caa_propagate(torch.rand(1, 10, 10), torch.rand(1, 2, 3, 4), torch.ones(1, 2, 3, 4))
    with pytest.raises(ShapeError, match="masks"):
        caa_propagate(torch.rand(1, 12, 12), torch.rand(1, 2, 3, 4), torch.ones(1, 1, 3, 4))
