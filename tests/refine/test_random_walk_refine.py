"""Random-walk refinement against dense float64 references built independently from the offsets.

Accuracy measure: the relative error ||got - ref|| / ||ref|| (Frobenius) must be below 1e-4 and
the largest element error below 3e-4 of the largest value. The fp32 stencil applies T 256 times
in sequence; with float64-computed weights and iteration on the change x_t - x0 (see
wsclip.kernels.random_walk) it measures about 1.5e-5 norm-wise and 1.3e-4 per element at 32x32
with strong boundaries (IRN's own dense fp32 squaring: about 2e-5 norm-wise).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsclip.errors import ShapeError
from wsclip.refine import random_walk as rw


def dense_transition(aff: torch.Tensor, radius: int, beta: float) -> torch.Tensor:
    """T (HW, HW) float64 for one image: symmetric A (A_ii = 1), A^beta, columns normalised."""
    K, H, W = aff.shape
    n = H * W
    a = torch.eye(n, dtype=torch.float64)
    ys, xs = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    for k, (dy, dx) in enumerate(rw.neighbor_offsets(radius).tolist()):
        inside = (ys + dy < H) & (xs + dx >= 0) & (xs + dx < W)
        y, x = ys[inside], xs[inside]
        i, j = torch.from_numpy(y * W + x), torch.from_numpy((y + dy) * W + (x + dx))
        v = aff[k][torch.from_numpy(y), torch.from_numpy(x)].double()
        a[i, j] = v
        a[j, i] = v
    a = a.pow(beta)
    return a / a.sum(0, keepdim=True)


def dense_walk(x: torch.Tensor, aff: torch.Tensor, radius: int, beta: float, exp_times: int) -> torch.Tensor:
    """x (B, C, H, W) -> x T^(2^t), squaring the dense T t times (IRN's formulation), float64."""
    B, C, H, W = x.shape
    out = []
    for b in range(B):
        t = dense_transition(aff[b], radius, beta)
        for _ in range(exp_times):
            t = t @ t
        out.append((x[b].double().reshape(C, H * W) @ t).reshape(C, H, W))
    return torch.stack(out)


def assert_close_rel(got: torch.Tensor, ref: torch.Tensor):
    diff = got.double() - ref
    assert torch.isfinite(got).all()
    assert (diff.norm() / ref.norm()).item() < 1e-4
    assert (diff.abs().max() / ref.abs().max()).item() < 3e-4


def brute_edge_affinity(edge: torch.Tensor, radius: int) -> torch.Tensor:
    """Per pixel and offset: 1 - max boundary over the IRN path pixels (outside the image counts as 1)."""
    H, W = edge.shape
    e = edge.double().numpy()
    offs = rw.neighbor_offsets(radius).tolist()
    out = np.zeros((len(offs), H, W))
    for k, (dy, dx) in enumerate(offs):
        n2 = dy * dy + dx * dx
        for y in range(H):
            for x in range(W):
                m = 0.0
                for py in range(min(0, dy), max(0, dy) + 1):
                    for px in range(min(0, dx), max(0, dx) + 1):
                        if (dy * px - dx * py) ** 2 < n2:
                            yy, xx = y + py, x + px
                            v = e[yy, xx] if 0 <= yy < H and 0 <= xx < W else 1.0
                            m = max(m, v)
                out[k, y, x] = 1.0 - m
    return torch.from_numpy(out)


def test_offsets_and_paths():
    offs = rw.neighbor_offsets(5)
    assert offs.shape == (34, 2) and offs.dtype == torch.long
    assert offs[:4].tolist() == [[0, 1], [0, 2], [0, 3], [0, 4]]
    assert all(dy * dy + dx * dx < 25 for dy, dx in offs.tolist())
    paths = rw.path_pixels(5)
    k = {tuple(o): i for i, o in enumerate(offs.tolist())}
    assert set(paths[k[(0, 1)]]) == {(0, 0), (0, 1)}
    assert set(paths[k[(1, 1)]]) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert set(paths[k[(0, 3)]]) == {(0, 0), (0, 1), (0, 2), (0, 3)}
    assert set(paths[k[(2, 1)]]) == {(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)}  # all within distance < 1
    assert set(paths[k[(2, 2)]]) == {(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 1), (2, 2)}  # corners too far
    assert set(paths[k[(2, -2)]]) == {(0, 0), (0, -1), (1, 0), (1, -1), (1, -2), (2, -1), (2, -2)}
    for pts, (dy, dx) in zip(paths, offs.tolist()):
        assert (0, 0) in pts and (dy, dx) in pts


def _irn_path(dy, dx):
    """IRN's misc/indexing.py rule as documented: box pixels with (dy*x - dx*y)^2 / |d|^2 < 1 (float division)."""
    length_sq = dy * dy + dx * dx
    return {(y, x) for y in range(min(0, dy), max(0, dy) + 1) for x in range(min(0, dx), max(0, dx) + 1)
            if (dy * x - dx * y) ** 2 / length_sq < 1}


@pytest.mark.parametrize("radius", [6, 7, 8, 10])
def test_paths_at_large_radius_follow_irn_and_leave_out_the_distance_1_boundary(radius):
    """From radius 6 on, lattice points lie exactly at distance 1 from a segment (e.g. (1, 3) for (3, 4)): outside."""
    offs = rw.neighbor_offsets(radius).tolist()
    paths = rw.path_pixels(radius)
    for (dy, dx), pts in zip(offs, paths):
        assert set(pts) == _irn_path(dy, dx), (dy, dx)
    k = {tuple(o): i for i, o in enumerate(offs)}
    assert (1, 3) not in paths[k[(3, 4)]] and (2, 1) not in paths[k[(3, 4)]]
    assert (1, -3) not in paths[k[(3, -4)]]
    assert {(1, 1), (2, 2), (2, 3)} <= set(paths[k[(3, 4)]])


@pytest.mark.parametrize("shape,radius", [((7, 9), 5), ((1, 6), 5), ((5, 4), 3), ((11, 3), 5), ((9, 12), 6)])
def test_edge_to_affinity_matches_brute_force(shape, radius):
    edge = torch.rand(shape)
    got = rw.edge_to_affinity(edge, radius)
    assert got.shape == (1, len(rw.neighbor_offsets(radius)), *shape)
    exp = brute_edge_affinity(edge, radius)
    # entries whose neighbour lies outside the grid are unused; compare the rest (and they still match)
    torch.testing.assert_close(got[0].double(), exp, rtol=0, atol=1e-7)
    # batched and (B, 1, H, W) layouts give the same
    both = rw.edge_to_affinity(torch.stack([edge, edge.flip(0)])[:, None], radius)
    torch.testing.assert_close(both[0], got[0])
    torch.testing.assert_close(both[1].double(), brute_edge_affinity(edge.flip(0), radius), rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    "B,C,H,W,exp_times",
    [(1, 3, 32, 32, 8), (2, 2, 9, 13, 8), (1, 1, 1, 7, 5), (1, 2, 5, 1, 4), (2, 3, 17, 6, 6)],
)
def test_irn_propagation_matches_dense(B, C, H, W, exp_times):
    radius, beta = 5, 10.0
    x = torch.rand(B, C, H, W)
    edge = torch.rand(B, H, W) ** 3  # mostly low, some strong boundaries
    aff = rw.edge_to_affinity(edge, radius)
    got = rw.random_walk(x, aff, radius, beta=beta, exp_times=exp_times, backend="torch")
    exp = dense_walk(x, aff, radius, beta, exp_times)
    assert got.shape == x.shape
    assert_close_rel(got, exp)


def test_irn_refine_matches_dense_pipeline():
    B, C, H, W = 2, 3, 10, 12
    cams = torch.rand(B, C, H, W)
    cams[1, 2] = 0  # a class with no activation
    edge = torch.rand(B, H, W) ** 2
    size = (37, 45)  # crop of the x4 upsampled grid, like an odd-sized image
    scores, labels = rw.irn_refine(cams, edge, beta=10, exp_times=8, radius=5, bg_threshold=0.2, size=size)
    assert scores.shape == (B, C + 1, *size) and labels.shape == (B, *size)
    # reference: IRN's steps with the dense walk
    x = cams.double() * (1 - edge.double())[:, None]
    ref = dense_walk(x, rw.edge_to_affinity(edge, 5), 5, 10.0, 8)
    up = F.interpolate(ref, scale_factor=4, mode="bilinear", align_corners=False)[..., : size[0], : size[1]]
    up = up / up.flatten(1).amax(1).view(-1, 1, 1, 1)
    ref_scores = torch.cat([torch.full_like(up[:, :1], 0.2), up], 1)
    assert_close_rel(scores, ref_scores)
    agree = (labels == ref_scores.argmax(1)).double().mean().item()
    assert agree > 0.999
    assert labels.max() <= C and (labels == 0).any()
    # unbatched input -> unbatched output
    s1, l1 = rw.irn_refine(cams[0], edge[0], size=size)
    torch.testing.assert_close(s1, scores[0])
    assert torch.equal(l1, labels[0])


def test_irn_refine_boundary_stops_propagation():
    """A full-height boundary column keeps a CAM on its side of the image."""
    H, W = 12, 16
    cam = torch.zeros(1, 1, H, W)
    cam[0, 0, 4:8, 1:4] = 1.0
    edge = torch.zeros(1, H, W)
    edge[0, :, 7] = 1.0
    scores, _ = rw.irn_refine(cam, edge, scale=1)
    left, right = scores[0, 1, :, :7], scores[0, 1, :, 8:]
    assert left.max() == pytest.approx(1.0) and left.min() > 0.01
    assert right.max() < 1e-6
    free, _ = rw.irn_refine(cam, torch.zeros(1, H, W), scale=1)
    assert free[0, 1, :, 8:].max() > 0.01


def test_feature_affinity_and_psa_refine_match_dense():
    B, C, D, h, w = 1, 2, 5, 6, 7
    feats = torch.randn(B, D, h, w)
    aff = rw.feature_affinity(feats, 5)
    for k, (dy, dx) in enumerate(rw.neighbor_offsets(5).tolist()):
        y, x = 1, 2
        if y + dy < h and 0 <= x + dx < w:
            exp = torch.exp(-(feats[0, :, y, x] - feats[0, :, y + dy, x + dx]).abs().mean())
            assert aff[0, k, y, x].item() == pytest.approx(exp.item(), rel=1e-6)
    cams = torch.rand(B, C, 8 * h, 8 * w)
    scores, labels = rw.psa_refine(cams, feats, beta=8, exp_times=8, radius=5, alpha=16)
    assert scores.shape == (B, C + 1, 8 * h, 8 * w) and labels.shape == (B, 8 * h, 8 * w)
    stack = torch.cat([(1 - cams.amax(1, keepdim=True)) ** 16, cams], 1).double()
    small = F.avg_pool2d(stack, 8)
    ref = F.interpolate(dense_walk(small, aff, 5, 8.0, 8), size=(8 * h, 8 * w), mode="bilinear", align_corners=False)
    assert_close_rel(scores, ref)


def test_shape_errors():
    with pytest.raises(ShapeError):
        rw.irn_refine(torch.rand(1, 2, 5, 5), torch.rand(1, 5, 6))
    with pytest.raises(ShapeError):
        rw.edge_to_affinity(torch.rand(2, 3, 4, 5))
    with pytest.raises(ShapeError):
        rw.psa_refine(torch.rand(2, 2, 8, 8), torch.rand(1, 3, 1, 1))
    assert np.isclose(rw.IRN_BG_THRESHOLD, 0.2)
