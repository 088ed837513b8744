"""masked_batch: the Triton kernel (interpreter) against the plain PyTorch reference."""

import pytest
import torch

from wsclip.errors import ShapeError
from wsclip.kernels import CLIP_MEAN, CLIP_STD, masked_batch
from wsclip.kernels.masked_batch import _interp_matrix, masked_batch_reference
from wsclip.runtime import precision

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _inputs(B=2, H=9, W=7, K=3, h=5, w=6, M=5, uint8=False, dtype=torch.float32):
    images = torch.rand(B, 3, H, W)
    if uint8:
        images = (images * 255).round().to(torch.uint8)
    else:
        images = images.to(dtype)
    cams = torch.rand(B, K, h, w).to(dtype)
    pairs = torch.stack([torch.randint(0, B, (M,)), torch.randint(0, K, (M,))], 1)
    return images, cams, pairs


@pytest.mark.parametrize(
    "shape, size, dtype, uint8",
    [
        (dict(), 11, torch.float32, False),
        (dict(H=5, W=13, h=3, w=1), 5, torch.float32, True),  # 1-pixel-wide CAM, upsampling and downsampling
        (dict(B=1, H=9, W=7, K=2, h=4, w=4, M=3), 7, torch.float16, False),
        (dict(H=6, W=6, h=2, w=3, M=2), 1, torch.float32, False),  # a 1x1 output picks the top-left taps
    ],
)
def test_forward_matches_reference(shape, size, dtype, uint8, kdev):
    images, cams, pairs = _inputs(uint8=uint8, dtype=dtype, **shape)
    fg, bg = masked_batch(images.to(kdev), cams.to(kdev), pairs.to(kdev), size=size, backend="triton")
    fg, bg = fg.cpu(), bg.cpu()
    rf, rb = masked_batch_reference(images, cams, pairs, size=size)
    M = pairs.shape[0]
    assert fg.shape == bg.shape == (M, 3, size, size)
    assert fg.dtype == bg.dtype == dtype and fg.is_contiguous() and bg.is_contiguous()
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(fg, rf, atol=tol, rtol=tol)
    torch.testing.assert_close(bg, rb, atol=tol, rtol=tol)


def test_out_dtype_norm_and_stacked(kdev):
    images, cams, pairs = _inputs(M=4)
    out = masked_batch(images.to(kdev), cams.to(kdev), pairs.to(kdev), size=6, mean=IMAGENET[0], std=IMAGENET[1],
                       out_dtype=torch.float16, backend="triton", stacked=True).cpu()
    rf, rb = masked_batch_reference(images, cams, pairs, size=6, mean=IMAGENET[0], std=IMAGENET[1])
    assert out.shape == (8, 3, 6, 6) and out.dtype == torch.float16
    torch.testing.assert_close(out.float(), torch.cat([rf, rb]), atol=3e-3, rtol=3e-3)
    # the torch path stacks the same way
    ref = masked_batch(images, cams, pairs, size=6, mean=IMAGENET[0], std=IMAGENET[1], backend="torch", stacked=True)
    torch.testing.assert_close(ref, torch.cat([rf, rb]))


def test_semantics_of_the_reference(kdev):
    """A CAM of ones keeps the normalised image in fg and zeroes bg; a CAM of zeros the opposite."""
    images = torch.rand(1, 3, 4, 5)
    cams = torch.stack([torch.ones(4, 5), torch.zeros(4, 5)])[None]
    fg, bg = masked_batch(images.to(kdev), cams.to(kdev), torch.tensor([[0, 0], [0, 1]], device=kdev), size=4,
                          backend="triton")
    fg, bg = fg.cpu(), bg.cpu()
    img = torch.nn.functional.interpolate(images, size=(4, 4), mode="bilinear", align_corners=True)
    norm = (img[0] - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    torch.testing.assert_close(fg[0], norm)
    torch.testing.assert_close(bg[1], norm)
    assert fg[1].abs().max() == 0 and bg[0].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_matches_reference_autograd(dtype, kdev):
    images, cams, _ = _inputs(B=2, H=9, W=7, K=3, h=5, w=6, dtype=dtype)
    pairs = torch.tensor([[0, 1], [1, 2], [1, 0], [0, 1]])  # a repeated pair accumulates
    size = 11
    cams_t = cams.clone().to(kdev).requires_grad_(True)
    cams_r = cams.clone().requires_grad_(True)
    with precision(kdev):  # the backward's two small resize matmuls: exact fp32 (no TF32) at inference precision
        fg, bg = masked_batch(images.to(kdev), cams_t, pairs.to(kdev), size=size, backend="triton")
        rf, rb = masked_batch_reference(images, cams_r, pairs, size=size)
        gf, gb = torch.randn(fg.shape), torch.randn(bg.shape)
        (g_t,) = torch.autograd.grad((fg.float() * gf.to(kdev)).sum() + (bg.float() * gb.to(kdev)).sum(), cams_t)
    g_t = g_t.cpu()
    (g_r,) = torch.autograd.grad((rf.float() * gf).sum() + (rb.float() * gb).sum(), cams_r)
    assert g_t.dtype == dtype and g_t.shape == cams.shape
    assert g_t[0, 0].abs().max() == 0 and g_t[1, 1].abs().max() == 0  # classes not in pairs get nothing
    tol = 3e-2 if dtype == torch.float16 else 1e-4
    torch.testing.assert_close(g_t.float(), g_r.float(), atol=tol, rtol=tol)


def test_gradcheck_of_the_triton_backward(kdev):
    """Directional gradcheck: the outputs are affine in the CAMs, so f(c + u) - f(c) = J u exactly
    and <v, J u> must equal <J^T v, u> (the backward) for random directions u, v."""
    images = torch.rand(2, 3, 6, 5, device=kdev)
    cams = torch.rand(2, 3, 4, 3, dtype=torch.float64).float().to(kdev)
    pairs = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 2]], device=kdev)

    def fn(c):
        return masked_batch(images, c, pairs, size=7, backend="triton", stacked=True).double()

    with precision(kdev):
        base = fn(cams)
        for _ in range(3):
            u, v = torch.randn(cams.shape).to(kdev), torch.randn(base.shape, dtype=torch.float64).to(kdev)
            jvp = ((fn(cams + u) - base) * v).sum()
            c = cams.clone().requires_grad_(True)
            (vjp,) = torch.autograd.grad((fn(c) * v).sum(), c)
            torch.testing.assert_close(jvp, (vjp.double() * u.double()).sum(), rtol=1e-4, atol=1e-4)


def test_fp64_inputs_and_output_are_computed_in_fp32(kdev):
    """fp64 images, CAMs and out_dtype stay inside the compiled launch domain (cast to fp32 around the
    kernel, which computes in fp32 anyway) and still match the reference; gradients come back fp64."""
    images, cams, pairs = _inputs(dtype=torch.float64)
    cams_t = cams.clone().to(kdev).requires_grad_(True)
    fg, bg = masked_batch(images.to(kdev), cams_t, pairs.to(kdev), size=9, backend="triton")
    rf, rb = masked_batch_reference(images, cams, pairs, size=9)
    assert fg.dtype == bg.dtype == torch.float64
    torch.testing.assert_close(fg.cpu(), rf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bg.cpu(), rb, atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(fg.sum(), cams_t)
    assert g.dtype == torch.float64 and torch.isfinite(g).all()


def test_interp_matrix_is_the_resize():
    v = torch.rand(7, 5)
    ry, rx = _interp_matrix(7, 10, "cpu"), _interp_matrix(5, 3, "cpu")
    ref = torch.nn.functional.interpolate(v[None, None], size=(10, 3), mode="bilinear", align_corners=True)[0, 0]
    torch.testing.assert_close(ry @ v @ rx.t(), ref)


def test_empty_pairs(kdev):
    images, cams, _ = _inputs()
    images, cams = images.to(kdev), cams.to(kdev).requires_grad_(True)
    pairs = torch.zeros(0, 2, dtype=torch.long, device=kdev)
    for backend in ("triton", "torch"):
        fg, bg = masked_batch(images, cams, pairs, size=5, backend=backend)
        assert fg.shape == bg.shape == (0, 3, 5, 5)
        (g,) = torch.autograd.grad(fg.sum() + bg.sum(), cams, allow_unused=True, materialize_grads=True)
        assert g.shape == cams.shape and g.abs().max() == 0


def test_bad_inputs_are_user_errors():
    images, cams, pairs = _inputs(B=2, K=3)
    with pytest.raises(ShapeError, match="classes 0..2"):
        masked_batch(images, cams, torch.tensor([[0, 3]]), backend="torch")
    with pytest.raises(ShapeError, match="images 0..1"):
        masked_batch(images, cams, torch.tensor([[2, 0]]), backend="triton")
    with pytest.raises(ShapeError, match=r"\(B, 3, H, W\)"):
        masked_batch(images[:, :2], cams, pairs)
    with pytest.raises(ShapeError, match="integer"):
        masked_batch(images, cams, pairs.float())
