"""random_walk: the stencil paths (Triton interpreter, PyTorch CSR) against IRN's dense formulation."""

import itertools

import pytest
import torch

from wsclip.errors import ShapeError
from wsclip.kernels import dense_random_walk, neighbor_offsets, random_walk
from wsclip.kernels.random_walk import stencil_matrix, stencil_weights, transition_matrix


def test_neighbor_offsets():
    offs = neighbor_offsets(5)
    assert offs.dtype == torch.long and offs.shape == (34, 2)
    assert offs[:4].tolist() == [[0, 1], [0, 2], [0, 3], [0, 4]]
    assert offs[4].tolist() == [1, -4] and offs[-1].tolist() == [4, 2]
    full = {tuple(o) for o in offs.tolist()} | {(-dy, -dx) for dy, dx in offs.tolist()} | {(0, 0)}
    assert len(full) == 69  # the IRN neighbourhood: 34 forward, 34 mirrored, the pixel itself
    assert neighbor_offsets(1).shape == (0, 2)
    assert neighbor_offsets(3).tolist() == [[0, 1], [0, 2], [1, -2], [1, -1], [1, 0], [1, 1], [1, 2],
                                            [2, -2], [2, -1], [2, 0], [2, 1], [2, 2]]


def _brute_transition(aff, radius, beta):
    """T for one image from the definitions, pixel pair by pixel pair."""
    K, H, W = aff.shape
    n = H * W
    a = torch.eye(n, dtype=torch.float64)
    for k, (dy, dx) in enumerate(neighbor_offsets(radius).tolist()):
        for y, x in itertools.product(range(H), range(W)):
            if 0 <= y + dy < H and 0 <= x + dx < W:
                i, j = y * W + x, (y + dy) * W + x + dx
                a[i, j] = a[j, i] = float(aff[k, y, x])
    a = a**beta
    return a / a.sum(0, keepdim=True)


def test_dense_reference_matches_the_definition():
    radius, H, W = 3, 4, 5
    aff = torch.rand(1, len(neighbor_offsets(radius)), H, W, dtype=torch.float64)
    t = transition_matrix(aff, radius, beta=3.0)[0]
    torch.testing.assert_close(t, _brute_transition(aff[0], radius, 3.0))
    x = torch.rand(1, 2, H, W, dtype=torch.float64)
    out = dense_random_walk(x, aff, radius, beta=3.0, exp_times=2)
    ref = x.reshape(2, -1) @ torch.linalg.matrix_power(t, 4)
    torch.testing.assert_close(out.reshape(2, -1), ref)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _case(B, C, H, W, radius, dtype=torch.float32):
    K = len(neighbor_offsets(radius))
    x = torch.rand(B, C, H, W).to(dtype)
    aff = (0.2 + 0.8 * torch.rand(B, K, H, W)).to(dtype)
    return x, aff


@pytest.mark.parametrize(
    "B, C, H, W, radius, beta, exp_times",
    [
        (2, 3, 7, 9, 3, 10.0, 2),
        (1, 1, 7, 9, 3, 2.0, 3),
        (1, 2, 2, 3, 4, 4.0, 2),  # grid smaller than the neighbourhood: most neighbours outside
        (2, 2, 5, 1, 3, 2.0, 1),  # a single column
        (1, 2, 4, 4, 1, 10.0, 2),  # radius 1: no neighbours, T = I
        (1, 2, 5, 6, 3, 5.0, 0),  # exp_times 0: one step
    ],
)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stencil_matches_dense(B, C, H, W, radius, beta, exp_times, backend, request):
    x, aff = _case(B, C, H, W, radius)
    ref = dense_random_walk(x, aff, radius, beta=beta, exp_times=exp_times)
    dev = request.getfixturevalue("kdev") if backend == "triton" else "cpu"
    out = random_walk(x.to(dev), aff.to(dev), radius, beta=beta, exp_times=exp_times, backend=backend).cpu()
    assert out.shape == x.shape and out.dtype == x.dtype
    assert _rel(out, ref) < 1e-5


def test_triton_fp16_inputs(kdev):
    x, aff = _case(2, 3, 7, 9, 3, dtype=torch.float16)
    ref = dense_random_walk(x, aff, 3, beta=10.0, exp_times=2)
    out = random_walk(x.to(kdev), aff.to(kdev), 3, beta=10.0, exp_times=2, backend="triton").cpu()
    assert out.dtype == torch.float16
    assert _rel(out, ref) < 2e-3


def test_many_classes_use_several_class_blocks(kdev):
    """C = 19 > 16 classes per program: the second class block must be written too (outputs start as NaN)."""
    x, aff = _case(1, 19, 5, 6, 3)
    ref = dense_random_walk(x, aff, 3, beta=4.0, exp_times=2)
    out = random_walk(x.to(kdev), aff.to(kdev), 3, beta=4.0, exp_times=2, backend="triton").cpu()
    assert _rel(out, ref) < 1e-5 and torch.isfinite(out).all()


def test_entries_pointing_outside_are_ignored(kdev):
    radius, H, W = 3, 6, 7
    x, aff = _case(1, 2, H, W, radius)
    poisoned = aff.clone()
    for k, (dy, dx) in enumerate(neighbor_offsets(radius).tolist()):
        poisoned[0, k, H - dy :, :] = float("nan")
        if dx > 0:
            poisoned[0, k, :, W - dx :] = float("nan")
        if dx < 0:
            poisoned[0, k, :, : -dx] = float("nan")
    ref = random_walk(x, aff, radius, exp_times=2, backend="torch")
    for backend, dev in (("torch", "cpu"), ("triton", kdev)):
        out = random_walk(x.to(dev), poisoned.to(dev), radius, exp_times=2, backend=backend).cpu()
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_stencil_matrix_is_the_transposed_transition():
    radius = 3
    _, aff = _case(2, 1, 5, 6, radius)
    wf, inv_d = stencil_weights(aff, radius, beta=4.0)
    sparse = stencil_matrix(wf, inv_d, radius).to_dense()
    dense = transition_matrix(aff, radius, beta=4.0, dtype=torch.float32)
    n = 5 * 6
    for b in range(2):
        torch.testing.assert_close(sparse[b * n : (b + 1) * n, b * n : (b + 1) * n], dense[b].t())
    assert sparse[:n, n:].abs().max() == 0  # images do not mix


def test_bad_inputs_are_user_errors():
    x, aff = _case(1, 2, 5, 5, 3)
    with pytest.raises(ShapeError, match="K = len"):
        random_walk(x, aff[:, :5], 3)
    with pytest.raises(ShapeError, match="radius"):
        random_walk(x, aff, 0)
    with pytest.raises(ShapeError, match="beta"):
        random_walk(x, aff, 3, beta=0.0)
