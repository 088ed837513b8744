"""CAA: transition, box masks and refinement against dense float64 references written here."""

import numpy as np
import pytest
import torch

from wsclip.errors import ShapeError
from wsclip.refine import caa


def dense_transition(attn: torch.Tensor) -> torch.Tensor:
    """Literal CLIP-ES: 3 x (columns, then rows), symmetrise, square; float64, one image at a time."""
    out = []
    for w in attn.double():
        d = w.clone()
        for _ in range(3):
            d = d / d.sum(0, keepdim=True)
            d = d / d.sum(1, keepdim=True)
        s = (d + d.T) / 2
        out.append(s @ s)
    return torch.stack(out)


def dense_refine(cams, a, masks):
    B, C, h, w = cams.shape
    out = torch.empty(B, C, h * w, dtype=torch.float64)
    for b in range(B):
        for c in range(C):
            f = a[b].double() @ (cams[b, c].double() * masks[b, c].double()).reshape(-1)
            out[b, c] = (f - f.min()) / (f.max() - f.min() + 1e-7)
    return out.reshape(B, C, h, w)


def random_attention(B, N):
    return torch.softmax(3 * torch.randn(B, N, N), dim=-1)


@pytest.mark.parametrize("B,h,w", [(2, 5, 7), (1, 1, 9), (3, 4, 4)])
def test_transition_matches_dense(B, h, w):
    attn = random_attention(B, h * w)
    got = caa.transition(attn)
    exp = dense_transition(attn)
    assert got.shape == (B, h * w, h * w)
    torch.testing.assert_close(got.double(), exp, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(got, got.transpose(1, 2), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("B,C,h,w", [(2, 3, 6, 9), (1, 1, 3, 1), (1, 4, 8, 8)])
def test_refine_matches_dense(B, C, h, w):
    attn = random_attention(B, h * w)
    cams = torch.rand(B, C, h, w)
    masks = torch.rand(B, C, h, w) > 0.5
    a = caa.transition(attn)
    got = caa.refine(cams, a, masks)
    exp = dense_refine(cams, dense_transition(attn), masks)
    assert got.shape == cams.shape
    rel = ((got.double() - exp).abs().max() / exp.abs().max().clamp_min(1e-12)).item()
    assert rel < 1e-4
    # without forming A (the labeler's path): the same maps
    fast = caa.refine_from_attention(attn, cams, threshold=0.4)
    ref = caa.refine(cams, a, caa.box_masks(cams, 0.4))
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)


def test_box_mask_hand_cases():
    cam = np.zeros((9, 10), np.float32)
    cam[1:3, 1:3] = 1.0  # blob A
    cam[6, 7] = 0.9  # single pixel B
    cam[3, 3] = 0.8  # touches A diagonally: same 8-connected region -> box grows to (1..3, 1..3)
    m = caa.box_mask(cam, 0.4)
    exp = np.zeros_like(m)
    exp[1:4, 1:4] = True
    exp[6, 7] = True
    np.testing.assert_array_equal(m, exp)
    # below threshold regions do not count
    cam2 = cam.copy()
    cam2[6, 7] = 0.3
    assert not caa.box_mask(cam2, 0.4)[6, 7]
    # all zero: empty
    assert not caa.box_mask(np.zeros((4, 5)), 0.4).any()
    # tensors in -> tensor out on the same device
    t = caa.box_mask(torch.from_numpy(cam), 0.4)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.bool
    np.testing.assert_array_equal(t.numpy(), exp)


def test_box_threshold_is_relative_to_the_maps_max_and_strict():
    """Maps whose max is not 1: the threshold is threshold * max(cam); a value equal to it is outside."""
    cam = np.zeros((8, 9), np.float32)
    cam[1, 1] = 0.5  # the max
    cam[5, 6] = 0.3  # above 0.4 * 0.5 = 0.2 (but below a raw 0.4)
    cam[6, 2] = 0.25  # exactly 0.5 * max: the tie stays outside at threshold 0.5
    exp = np.zeros((8, 9), bool)
    exp[1, 1] = exp[5, 6] = exp[6, 2] = True
    tie = exp.copy()
    tie[5, 6] = True
    tie[6, 2] = False
    for threshold, want in ((0.4, exp), (0.5, tie)):
        np.testing.assert_array_equal(caa.box_mask(cam, threshold), want)
        np.testing.assert_array_equal(caa.box_masks(torch.from_numpy(cam)[None], threshold)[0].numpy(), want)
    # scaling a map scales nothing else: the masks of 3 * cam and cam / 4 are the same
    for scale in (3.0, 0.25):
        np.testing.assert_array_equal(caa.box_mask(cam * scale, 0.5), tie)
        np.testing.assert_array_equal(caa.box_masks(torch.from_numpy(cam * scale)[None], 0.5)[0].numpy(), tie)


def test_box_mask_ring_with_nested_region():
    """A ring (internal contour) with an island inside its hole: the island is its own region."""
    cam = np.zeros((11, 11), np.float32)
    cam[2:9, 2:9] = 1.0
    cam[3:8, 3:8] = 0.0  # hole
    cam[5, 5] = 1.0  # island
    m = caa.box_mask(cam, 0.5)
    exp = np.zeros((11, 11), bool)
    exp[2:9, 2:9] = True
    np.testing.assert_array_equal(m, exp)
    torch.testing.assert_close(caa.box_masks(torch.from_numpy(cam), 0.5), torch.from_numpy(exp))


def test_box_mask_compat_mode():
    cam = np.zeros((6, 7), np.float32)
    cam[2:6, 3:7] = 1.0  # touches the bottom and right edges
    m = caa.box_mask(cam, 0.4, compat=True)
    exp = np.zeros((6, 7), bool)
    exp[2:5, 3:6] = True  # far edges clipped to h-1 / w-1 and exclusive
    np.testing.assert_array_equal(m, exp)
    np.testing.assert_array_equal(caa.box_mask(cam, 0.4), cam > 0)


@pytest.mark.parametrize("shape", [(7, 3, 9, 11), (5, 1, 1, 13), (4, 2, 16, 5), (2, 1, 1, 1)])
def test_box_masks_batched_matches_reference(shape):
    g = torch.Generator().manual_seed(sum(shape))
    cams = torch.rand(shape, generator=g) ** 3
    cams[0, 0] = 0  # an all-zero map
    for thr in (0.2, 0.4, 0.7):
        got = caa.box_masks(cams, thr)
        assert got.shape == cams.shape and got.dtype == torch.bool
        flat = cams.reshape(-1, *shape[-2:])
        exp = torch.stack([torch.from_numpy(caa.box_mask(m.numpy(), thr)) for m in flat]).reshape(shape)
        assert torch.equal(got, exp)


def test_box_masks_serpentine_converges():
    """A long snake (worst case for label propagation) plus separate blobs."""
    h, w = 15, 16
    cam = torch.zeros(h, w)
    for r in range(0, h, 2):
        cam[r, :] = 1.0
        if r + 1 < h:
            cam[r + 1, (w - 1) if (r // 2) % 2 == 0 else 0] = 1.0
    cam2 = torch.zeros(h, w)
    cam2[0, 0] = cam2[14, 15] = cam2[7, 2:5] = 1.0
    cams = torch.stack([cam, cam2])
    got = caa.box_masks(cams, 0.5)
    assert got[0].all()
    exp = torch.from_numpy(caa.box_mask(cam2.numpy(), 0.5))
    assert torch.equal(got[1], exp) and exp.sum() == 5


def test_shape_errors():
    with pytest.raises(ShapeError):
        caa.box_mask(np.zeros((2, 3, 4)))
    with pytest.raises(ShapeError):
        caa.refine(torch.rand(1, 2, 3, 3), torch.rand(1, 8, 8), torch.ones(1, 2, 3, 3, dtype=torch.bool))
    with pytest.raises(ShapeError):
        caa.transition(torch.rand(2, 3, 4))
