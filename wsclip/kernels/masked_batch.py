"""CLIMS's masked CLIP inputs: fg = norm(resize(X)) * resize(P_k), bg = norm(resize(X)) * (1 - resize(P_k)).

For every (image n, class k) pair the image and the CAM are resized bilinearly with
align_corners=True to size x size, the image is normalised per channel ((x - mean) / std,
uint8 images are divided by 255 first), then multiplied by the CAM and by its complement
(METHODS.md section 3). The Triton kernel computes each output pixel from 4 image taps per
channel and 4 CAM taps, so nothing is resized in a separate pass; both outputs go to one
buffer in the (M, 3, size, size) layout the CLIP image encoder takes. The gradient flows to
the CAMs only: d cam = sum_c img_c * (d fg_c - d bg_c) at the output size (a Triton kernel),
then the adjoint of the CAM resize, which is separable: R_y^T G R_x (two small matmuls).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from wsclip.errors import ShapeError
from wsclip.constants import CLIP_MEAN, CLIP_STD
from wsclip.kernels import _dispatch
from wsclip.kernels._dispatch import check_launch, import_triton, interpreting, resolve_backend, tuned
from wsclip.kernels.tuning import SPECS

tl = None  # triton.language, bound by _triton_kernels() on first use of the Triton path


# ----------------------------------------------------------------------------- checks
def _check(images, cams, pairs, size):
    if images.dim() != 4 or images.shape[1] != 3:
        raise ShapeError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if cams.dim() != 4 or cams.shape[0] != images.shape[0]:
        raise ShapeError(
            f"cams must be (B, K, h, w) with the images' B = {images.shape[0]}, got {tuple(cams.shape)}"
        )
    if pairs.dim() != 2 or pairs.shape[1] != 2 or pairs.dtype.is_floating_point:
        raise ShapeError(f"pairs must be an integer tensor (M, 2) of (image, class), got {pairs.dtype} {tuple(pairs.shape)}")
    if int(size) != size or size < 1:
        raise ShapeError(f"size must be a positive integer, got {size}")
    if images.device != cams.device:
        raise ShapeError(f"images are on {images.device} but cams on {cams.device}: move both to one device")
    if not (images.dtype == torch.uint8 or images.dtype.is_floating_point) or not cams.dtype.is_floating_point:
        raise ShapeError(f"images must be float or uint8 and cams float, got {images.dtype} and {cams.dtype}")
    if pairs.numel():
        lo = pairs.min(0).values.tolist()
        hi = pairs.max(0).values.tolist()
        if min(lo) < 0 or hi[0] >= images.shape[0] or hi[1] >= cams.shape[1]:
            raise ShapeError(
                f"pairs index images 0..{images.shape[0] - 1} and classes 0..{cams.shape[1] - 1}; "
                f"got images {lo[0]}..{hi[0]} and classes {lo[1]}..{hi[1]}"
            )


def _affine(images, mean, std) -> tuple[list[float], list[float]]:
    """Per-channel (a, b) with norm(x) = a * x + b, folding /255 for uint8 images."""
    if len(mean) != 3 or len(std) != 3:
        raise ShapeError(f"mean and std need 3 values (RGB), got {len(mean)} and {len(std)}")
    unit = 255.0 if images.dtype == torch.uint8 else 1.0
    return [1.0 / (unit * s) for s in std], [-m / s for m, s in zip(mean, std)]


def _scale(src: int, dst: int) -> float:
    """Source step per output pixel for align_corners=True resizing."""
    return (src - 1) / (dst - 1) if dst > 1 else 0.0


# ----------------------------------------------------------------------------- PyTorch reference
def masked_batch_reference(images, cams, pairs, size=224, mean=CLIP_MEAN, std=CLIP_STD, out_dtype=None):
    """Plain PyTorch: F.interpolate the images and the selected CAMs, normalise, multiply.

    Computes in fp32 (fp64 for fp64 inputs); autograd gives the backward.
    """
    calc = torch.promote_types(torch.promote_types(cams.dtype, torch.float32),
                               images.dtype if images.dtype.is_floating_point else torch.float32)
    out_dtype = out_dtype or cams.dtype
    img = images.to(calc)
    if images.dtype == torch.uint8:
        img = img / 255.0
    img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=True)
    m = torch.tensor(mean, dtype=calc, device=img.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=calc, device=img.device).view(1, 3, 1, 1)
    img = (img - m) / s
    n, k = pairs[:, 0].long(), pairs[:, 1].long()
    cam = cams[n, k].unsqueeze(1).to(calc)
    cam = F.interpolate(cam, size=(size, size), mode="bilinear", align_corners=True)
    sel = img[n]
    return (sel * cam).to(out_dtype), (sel * (1 - cam)).to(out_dtype)


# ----------------------------------------------------------------------------- Triton kernels
@functools.lru_cache(maxsize=None)
def _jit_kernels(interpret: bool) -> dict:
    """The `triton.jit` functions by name, interpreted ones when `interpret` (launch space: tuning.SPECS["masked_batch.<name>"])."""
    global tl, block_of, taps, sample  # jit helpers are found through the kernels' module globals
    triton, tl = import_triton()

    @triton.jit
    def block_of(pairs, S, BLOCK: tl.constexpr):
        """This program's pair m, its image n, and its block of output pixels o (mask om, rows oy,
        columns ox) of the S x S output (SS = S * S pixels)."""
        m = tl.program_id(0)
        o = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        SS = S * S
        n = tl.load(pairs + 2 * m).to(tl.int64)
        return m, n, o, o < SS, o // S, o % S, SS

    @triton.jit
    def taps(oy, ox, sy, sx, h, w):
        """Bilinear taps (align_corners=True) of output pixels (oy, ox) on an h x w source: the four
        corner offsets and their weights."""
        fy = oy.to(tl.float32) * sy
        fx = ox.to(tl.float32) * sx
        y0 = fy.to(tl.int32)
        x0 = fx.to(tl.int32)
        ly = fy - y0.to(tl.float32)
        lx = fx - x0.to(tl.float32)
        y1 = tl.minimum(y0 + 1, h - 1)
        x1 = tl.minimum(x0 + 1, w - 1)
        return (y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1,
                (1.0 - ly) * (1.0 - lx), (1.0 - ly) * lx, ly * (1.0 - lx), ly * lx)

    @triton.jit
    def sample(p, i00, i01, i10, i11, w00, w01, w10, w11, om):
        """The bilinear value at the taps of source plane `p`, in float32."""
        return (w00 * tl.load(p + i00, mask=om, other=0).to(tl.float32)
                + w01 * tl.load(p + i01, mask=om, other=0).to(tl.float32)
                + w10 * tl.load(p + i10, mask=om, other=0).to(tl.float32)
                + w11 * tl.load(p + i11, mask=om, other=0).to(tl.float32))

    @triton.jit
    def fwd(img, cam, pairs, fg, bg, H, W, h, w, K, S, syi, sxi, syc, sxc,
            a0, a1, a2, b0, b1, b2, BLOCK: tl.constexpr):
        m, n, o, om, oy, ox, SS = block_of(pairs, S, BLOCK)
        k = tl.load(pairs + 2 * m + 1).to(tl.int64)
        c00, c01, c10, c11, u00, u01, u10, u11 = taps(oy, ox, syc, sxc, h, w)
        cv = sample(cam + (n * K + k) * h * w, c00, c01, c10, c11, u00, u01, u10, u11, om)
        i00, i01, i10, i11, w00, w01, w10, w11 = taps(oy, ox, syi, sxi, H, W)
        HW = H * W
        ib = img + n * 3 * HW
        ob = m.to(tl.int64) * 3 * SS + o
        for c in tl.static_range(3):
            a = a0 if c == 0 else (a1 if c == 1 else a2)
            bb = b0 if c == 0 else (b1 if c == 1 else b2)
            v = sample(ib + c * HW, i00, i01, i10, i11, w00, w01, w10, w11, om) * a + bb
            tl.store(fg + ob + c * SS, (v * cv).to(fg.dtype.element_ty), mask=om)
            tl.store(bg + ob + c * SS, (v * (1.0 - cv)).to(bg.dtype.element_ty), mask=om)

    @triton.jit
    def grad(img, pairs, dfg, dbg, g, H, W, S, syi, sxi, a0, a1, a2, b0, b1, b2, BLOCK: tl.constexpr):
        # g[m, o] = sum_c norm(img)_c(o) * (dfg[m, c, o] - dbg[m, c, o])
        m, n, o, om, oy, ox, SS = block_of(pairs, S, BLOCK)
        i00, i01, i10, i11, w00, w01, w10, w11 = taps(oy, ox, syi, sxi, H, W)
        HW = H * W
        ib = img + n * 3 * HW
        ob = m.to(tl.int64) * 3 * SS + o
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for c in tl.static_range(3):
            a = a0 if c == 0 else (a1 if c == 1 else a2)
            bb = b0 if c == 0 else (b1 if c == 1 else b2)
            v = sample(ib + c * HW, i00, i01, i10, i11, w00, w01, w10, w11, om) * a + bb
            d = (tl.load(dfg + ob + c * SS, mask=om, other=0.0).to(tl.float32)
                 - tl.load(dbg + ob + c * SS, mask=om, other=0.0).to(tl.float32))
            acc += v * d
        tl.store(g + m.to(tl.int64) * SS + o, acc, mask=om)

    return {"fwd": fwd, "grad": grad}


@functools.lru_cache(maxsize=None)
def _triton_kernels(interpret: bool):
    triton, _ = import_triton()
    jit = _jit_kernels(interpret)
    return triton, tuned(jit["fwd"], SPECS["masked_batch.fwd"]), tuned(jit["grad"], SPECS["masked_batch.grad"])


def _forward_triton(images, cams, pairs, size, a, b, out_dtype):
    triton, fwd, _ = _triton_kernels(interpreting())
    cams = cams.float().contiguous()
    B, _, H, W = images.shape
    K, h, w = cams.shape[1:]
    M = pairs.shape[0]
    out = _dispatch.empty((2 * M, 3, size, size), out_dtype, images.device)  # fg rows, then bg rows
    if M:
        check_launch(SPECS["masked_batch.fwd"], img=images, cam=cams, pairs=pairs, fg=out)
        grid = lambda meta: (M, triton.cdiv(size * size, meta["BLOCK"]))  # noqa: E731
        fwd[grid](images, cams, pairs, out[:M], out[M:], H, W, h, w, K, size,
                  _scale(H, size), _scale(W, size), _scale(h, size), _scale(w, size), *a, *b)
    return out


def _interp_matrix(src: int, dst: int, device) -> torch.Tensor:
    """R (dst, src) with resize_align_corners(v) = R @ v (the weights torch uses)."""
    f = torch.arange(dst, device=device, dtype=torch.float32) * _scale(src, dst)
    i0 = f.long().clamp_max(src - 1)
    i1 = (i0 + 1).clamp_max(src - 1)
    lam = f - i0.float()
    r = torch.zeros(dst, src, device=device)
    rows = torch.arange(dst, device=device)
    r.index_put_((rows, i0), 1.0 - lam, accumulate=True)
    r.index_put_((rows, i1), lam, accumulate=True)
    return r


def _backward_triton(images, pairs, cam_shape, cam_dtype, size, a, b, dout):
    triton, _, grad = _triton_kernels(interpreting())
    B, _, H, W = images.shape
    K, h, w = cam_shape[1:]
    M = pairs.shape[0]
    dcams = torch.zeros(cam_shape, dtype=torch.float32, device=images.device)
    if M:
        g = _dispatch.empty((M, size, size), torch.float32, images.device)
        grid = lambda meta: (M, triton.cdiv(size * size, meta["BLOCK"]))  # noqa: E731
        dout = dout.contiguous()
        check_launch(SPECS["masked_batch.grad"], img=images, pairs=pairs, dfg=dout, g=g)
        grad[grid](images, pairs, dout[:M], dout[M:], g, H, W, size,
                   _scale(H, size), _scale(W, size), *a, *b)
        # adjoint of the separable CAM resize: R_y^T G R_x per pair, summed into (n, k)
        ry = _interp_matrix(h, size, images.device)
        rx = _interp_matrix(w, size, images.device)
        d = torch.matmul(torch.matmul(ry.t(), g), rx)
        dcams.index_put_((pairs[:, 0], pairs[:, 1]), d, accumulate=True)
    return dcams.to(cam_dtype)


class _MaskedBatch(torch.autograd.Function):
    """Triton forward and backward, differentiable with respect to the CAMs only."""

    @staticmethod
    def forward(ctx, cams, images, pairs, size, a, b, out_dtype):
        ctx.save_for_backward(images, pairs)
        ctx.cfg = (tuple(cams.shape), cams.dtype, size, a, b)
        return _forward_triton(images, cams, pairs, size, a, b, out_dtype)

    @staticmethod
    def backward(ctx, dout):
        images, pairs = ctx.saved_tensors
        shape, dtype, size, a, b = ctx.cfg
        return _backward_triton(images, pairs, shape, dtype, size, a, b, dout), None, None, None, None, None, None


# ----------------------------------------------------------------------------- public
def masked_batch(
    images: torch.Tensor,
    cams: torch.Tensor,
    pairs: torch.Tensor,
    size: int = 224,
    mean=CLIP_MEAN,
    std=CLIP_STD,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
    stacked: bool = False,
):
    """(fg, bg), each (M, 3, size, size): the CLIP inputs of every (image, class) pair.

    images (B,3,H,W) float in [0,1] or uint8; cams (B,K,h,w) in [0,1]; pairs (M,2) integer
    (image index, class index). Image and CAM are resized bilinearly (align_corners=True),
    the image normalised with mean/std, then fg = img * cam and bg = img * (1 - cam).
    out_dtype defaults to the CAMs' dtype (fp32, fp16 or bf16). Differentiable with respect
    to `cams`. backend: "auto" (Triton on CUDA), "triton" or "torch".
    stacked=True returns one (2M, 3, size, size) tensor equal to torch.cat([fg, bg]) (no copy
    on the Triton path): one batch for the CLIP encoder.
    """
    _check(images, cams, pairs, size)
    size = int(size)
    out_dtype = out_dtype or cams.dtype
    path = resolve_backend(backend, images, cams)
    if path == "torch":
        fg, bg = masked_batch_reference(images, cams, pairs, size, mean, std, out_dtype)
        return torch.cat([fg, bg]) if stacked else (fg, bg)
    a, b = _affine(images, mean, std)
    # the kernels' launch domain (tuning.SPECS): images uint8/fp16/bf16/fp32, CAMs read as fp32, outputs
    # fp16/bf16/fp32; fp64 is computed in fp32 either way, so the casts below change no value
    if images.dtype == torch.float64:
        images = images.float()
    images = images.contiguous()
    kern_out = out_dtype if out_dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    pairs = pairs.to(device=images.device, dtype=torch.int64).contiguous()
    if cams.requires_grad and torch.is_grad_enabled():
        out = _MaskedBatch.apply(cams.contiguous(), images, pairs, size, a, b, kern_out)
    else:
        out = _forward_triton(images, cams.contiguous(), pairs, size, a, b, kern_out)
    out = out.to(out_dtype)
    m = pairs.shape[0]
    return out if stacked else (out[:m], out[m:])
