"""CLIP-ES class-aware attention affinity (CAA) refinement (METHODS.md section 5).

    A = transition(attn)                        # once per image, all classes share it
    b = box_masks(cams, 0.4)                    # union of boxes of the regions above 0.4 * max
    F = refine(cams, A, b)                      # A @ (b * vec(M)), min-max normalised per class

The matrix work is `wsclip.kernels.caa` (Triton on CUDA). `box_mask` is the plain reference on
one map (scipy connected components); `box_masks` does a whole (B, C, h, w) batch on the
maps' device (connected components by min-label propagation with pointer jumping).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from wsclip.errors import ShapeError
from wsclip.kernels.caa import caa_propagate, caa_refine, caa_transition

__all__ = ["BOX_THRESHOLD", "BOX_THRESHOLD_COCO", "transition", "box_mask", "box_masks", "refine", "refine_from_attention"]

BOX_THRESHOLD = 0.4  # VOC
BOX_THRESHOLD_COCO = 0.7

_EIGHT = np.ones((3, 3), dtype=bool)  # OpenCV's contours follow 8-connected regions


def transition(attn: torch.Tensor, iters: int = 3, backend: str = "auto") -> torch.Tensor:
    """CAA transition (B, N, N) from head- and layer-averaged attention (B, N, N) without the CLS token.

    `iters` rounds of column then row normalisation, symmetrise, square (on attn's device).
    """
    return caa_transition(attn, iters=iters, backend=backend)


def _above(cam: np.ndarray, threshold: float, compat: bool) -> np.ndarray:
    if compat:  # the public code thresholds a uint8 copy: (255 * cam) > int(threshold * max)
        q = (cam * 255).astype(np.uint8)
        return q > int(threshold * q.max())
    return cam > threshold * cam.max()


def box_mask(cam, threshold: float = BOX_THRESHOLD, compat: bool = False):
    """Union of the bounding boxes of all 8-connected regions of cam > threshold * max(cam); (h, w) bool.

    cam: (h, w) numpy array or tensor (the result has the same kind, on the same device). Regions
    nested in another region's hole are regions too (their boxes lie inside the outer box). An
    all-zero map gives an empty mask. compat=True reproduces the public CLIP-ES code: a uint8-
    quantised threshold and boxes whose far edge is exclusive and clipped to h-1 / w-1, so the last
    row and column of the grid never count.
    """
    from scipy import ndimage

    is_tensor = isinstance(cam, torch.Tensor)
    arr = cam.detach().float().cpu().numpy() if is_tensor else np.asarray(cam, dtype=np.float32)
    if arr.ndim != 2:
        raise ShapeError(f"box_mask takes one (h, w) map, got shape {arr.shape}")
    h, w = arr.shape
    out = np.zeros((h, w), dtype=bool)
    if arr.size and arr.max() > 0:
        labels, _ = ndimage.label(_above(arr, threshold, compat), structure=_EIGHT)
        for sl in ndimage.find_objects(labels):
            if sl is None:
                continue
            ys, xs = sl
            if compat:
                ys = slice(ys.start, min(ys.stop, h - 1))
                xs = slice(xs.start, min(xs.stop, w - 1))
            out[ys, xs] = True
    return torch.from_numpy(out).to(cam.device) if is_tensor else out


def _components(fg: torch.Tensor) -> torch.Tensor:
    """Per-map 8-connected component labels (M, h, w) long: the smallest flat index in each region, -1 outside."""
    M, h, w = fg.shape
    n = h * w
    big = n  # larger than any index
    idx = torch.arange(n, device=fg.device).view(1, h, w).expand(M, h, w)
    lab = torch.where(fg, idx, torch.full_like(idx, big))
    while True:
        # min over the 3x3 neighbourhood (as -maxpool of -lab), restricted to foreground
        nb = -F.max_pool2d(-lab.float().unsqueeze(1), 3, stride=1, padding=1).squeeze(1).long()
        new = torch.where(fg, torch.minimum(lab, nb), lab)
        # pointer jumping: adopt the label of the pixel our label points at (same region, smaller or equal)
        flat = new.view(M, n)
        ptr = flat.clamp_max(n - 1)
        jumped = torch.where(flat < big, torch.gather(flat, 1, ptr), flat).view(M, h, w)
        if torch.equal(jumped, lab):
            break
        lab = jumped
    return torch.where(fg, lab, torch.full_like(lab, -1))


def box_masks(cams: torch.Tensor, threshold: float = BOX_THRESHOLD) -> torch.Tensor:
    """`box_mask` for every map of cams (..., h, w), batched on cams' device; bool of the same shape."""
    if cams.dim() < 2:
        raise ShapeError(f"box_masks needs (..., h, w) maps, got {tuple(cams.shape)}")
    shape = cams.shape
    h, w = shape[-2:]
    x = cams.detach().float().reshape(-1, h, w)
    M = x.shape[0]
    if M == 0 or h * w == 0:
        return torch.zeros(shape, dtype=torch.bool, device=cams.device)
    peak = x.flatten(1).amax(1).view(M, 1, 1)
    fg = (x > threshold * peak) & (peak > 0)
    lab = _components(fg)
    n = h * w
    dev = cams.device
    # bounding box of each component, indexed by (map, representative pixel)
    key = (torch.arange(M, device=dev).view(M, 1, 1) * n + lab).view(-1)
    ok = lab.view(-1) >= 0
    ys = torch.arange(h, device=dev).view(1, h, 1).expand(M, h, w).reshape(-1)
    xs = torch.arange(w, device=dev).view(1, 1, w).expand(M, h, w).reshape(-1)
    key, ys, xs = key[ok], ys[ok], xs[ok]
    big = torch.full((M * n,), n, device=dev, dtype=torch.long)
    small = torch.full((M * n,), -1, device=dev, dtype=torch.long)
    y0 = big.clone().scatter_reduce_(0, key, ys, "amin")
    x0 = big.clone().scatter_reduce_(0, key, xs, "amin")
    y1 = small.clone().scatter_reduce_(0, key, ys, "amax")
    x1 = small.clone().scatter_reduce_(0, key, xs, "amax")
    roots = torch.nonzero(y1 >= 0).flatten()
    m = roots // n
    # paint the union of boxes with a 2-D difference array, then cumulative sums
    diff = torch.zeros(M, h + 1, w + 1, device=dev, dtype=torch.int32)
    one = torch.ones_like(m, dtype=torch.int32)
    flat = diff.view(-1)
    stride_m, stride_y = (h + 1) * (w + 1), w + 1
    for yy, xx, sign in ((y0[roots], x0[roots], 1), (y0[roots], x1[roots] + 1, -1),
                         (y1[roots] + 1, x0[roots], -1), (y1[roots] + 1, x1[roots] + 1, 1)):
        flat.index_add_(0, m * stride_m + yy * stride_y + xx, sign * one)
    cover = diff.cumsum(1).cumsum(2)[:, :h, :w] > 0
    return cover.reshape(shape)


def refine(cams: torch.Tensor, transition: torch.Tensor, masks: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """F_c = A @ (b_c * vec(M_c)) for every class, min-max normalised per class: (B, C, h, w).

    cams and masks (B, C, h, w) (masks bool or 0/1), transition (B, N, N) with N = h * w row-major.
    """
    return caa_propagate(transition, cams, masks, backend=backend)


def refine_from_attention(attn: torch.Tensor, cams: torch.Tensor, threshold: float = BOX_THRESHOLD,
                          iters: int = 3, backend: str = "auto") -> torch.Tensor:
    """Box masks + refinement straight from the averaged attention (B, N, N), without forming A = S @ S.

    Same result as refine(cams, transition(attn), box_masks(cams, threshold)) up to rounding.
    """
    masks = box_masks(cams, threshold)
    return caa_refine(attn, cams, masks, iters=iters, backend=backend)
