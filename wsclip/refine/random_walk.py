"""Random-walk refinement of CAMs (METHODS.md section 6): IRN from a boundary map, PSA from features.

Affinities are built here for the forward offsets of `neighbor_offsets(radius)`; propagation is
`wsclip.kernels.random_walk.random_walk` (a sparse stencil, never the dense HW x HW matrix).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from wsclip.errors import ShapeError
from wsclip.kernels.random_walk import neighbor_offsets, random_walk

__all__ = [
    "neighbor_offsets", "path_pixels", "edge_to_affinity", "feature_affinity", "irn_refine", "psa_refine",
    "IRN_BG_THRESHOLD", "IRN_BG_THRESHOLD_COCO",
]

IRN_BG_THRESHOLD = 0.20  # VOC
IRN_BG_THRESHOLD_COCO = 0.25


@functools.lru_cache(maxsize=None)
def path_pixels(radius: int) -> tuple[tuple[tuple[int, int], ...], ...]:
    """For each forward offset (dy, dx): the pixels (py, px) relative to i on the path from i to j.

    IRN's rule: pixels of the box spanned by i and j whose distance to the line through i and j is
    below 1, i.e. (dy * px - dx * py)^2 < dy^2 + dx^2; both end points are included.
    """
    paths = []
    for dy, dx in neighbor_offsets(radius).tolist():
        n2 = dy * dy + dx * dx
        pts = [
            (py, px)
            for py in range(min(0, dy), max(0, dy) + 1)
            for px in range(min(0, dx), max(0, dx) + 1)
            if (dy * px - dx * py) ** 2 < n2
        ]
        paths.append(tuple(pts))
    return tuple(paths)


def _as_maps(t: torch.Tensor, name: str) -> torch.Tensor:
    """(H, W), (B, H, W) or (B, 1, H, W) -> (B, H, W)."""
    if t.dim() == 2:
        return t[None]
    if t.dim() == 4 and t.shape[1] == 1:
        return t[:, 0]
    if t.dim() == 3:
        return t
    raise ShapeError(f"{name} must be (H, W), (B, H, W) or (B, 1, H, W), got {tuple(t.shape)}")


def edge_to_affinity(edge: torch.Tensor, radius: int = 5) -> torch.Tensor:
    """IRN affinities (B, K, H, W) from a class-boundary map in [0, 1] ((H, W), (B, H, W) or (B, 1, H, W)).

    a(i, j) = 1 - max of the boundary over the path pixels from i to j (`path_pixels`), the map padded
    with 1 outside the image; entry [b, k, y, x] pairs i = (y, x) with j = i + offset k.
    """
    e = _as_maps(edge, "edge").float()
    B, H, W = e.shape
    r = int(radius) - 1
    padded = F.pad(e, (r, r, 0, r), value=1.0)  # paths go down (dy >= 0) and both ways in x
    views: dict[tuple[int, int], torch.Tensor] = {}

    def view(py: int, px: int) -> torch.Tensor:
        if (py, px) not in views:
            views[(py, px)] = padded[:, py : py + H, r + px : r + px + W]
        return views[(py, px)]

    out = []
    for pts in path_pixels(radius):
        m = view(*pts[0])
        for p in pts[1:]:
            m = torch.maximum(m, view(*p))
        out.append(1.0 - m)
    if not out:
        return e.new_zeros(B, 0, H, W)
    return torch.stack(out, dim=1)


def feature_affinity(features: torch.Tensor, radius: int = 5) -> torch.Tensor:
    """PSA affinities (B, K, H, W): a(i, j) = exp(-mean over channels of |f_i - f_j|) for features (B, D, H, W).

    Entries whose neighbour j is outside the grid are 0 (the propagation ignores them anyway).
    """
    if features.dim() != 4:
        raise ShapeError(f"features must be (B, D, H, W), got {tuple(features.shape)}")
    f = features.float()
    B, D, H, W = f.shape
    out = f.new_zeros(B, len(neighbor_offsets(radius)), H, W)
    for k, (dy, dx) in enumerate(neighbor_offsets(radius).tolist()):
        x0, x1 = max(0, -dx), W - max(0, dx)
        if H - dy <= 0 or x1 <= x0:
            continue
        src = f[:, :, : H - dy, x0:x1]
        dst = f[:, :, dy:, x0 + dx : x1 + dx]
        out[:, k, : H - dy, x0:x1] = torch.exp(-(src - dst).abs().mean(1))
    return out


def _as_cams(cams: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if cams.dim() == 3:
        return cams[None], True
    if cams.dim() == 4:
        return cams, False
    raise ShapeError(f"cams must be (C, H, W) or (B, C, H, W), got {tuple(cams.shape)}")


def irn_refine(
    cams: torch.Tensor,
    edge: torch.Tensor,
    beta: float = 10.0,
    exp_times: int = 8,
    radius: int = 5,
    bg_threshold: float = IRN_BG_THRESHOLD,
    scale: int = 4,
    size: tuple[int, int] | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """IRN's random-walk refinement: (scores (B, 1+C, H', W'), labels (B, H', W') int64).

    cams (B, C, h, w) or (C, h, w) on the boundary map's grid (stride 4), edge (B, h, w) in [0, 1].
    Steps: x = cams * (1 - edge); propagate x T^(2^exp_times); upsample bilinearly by `scale` and crop
    to `size` (the image size; default the full upsampled grid); divide each image by its global max;
    prepend a constant background channel `bg_threshold`; argmax. labels are channel indices:
    0 = background, c + 1 = cams channel c. Unbatched input gives unbatched output.
    """
    x, single = _as_cams(cams)
    e = _as_maps(edge, "edge").to(x.device)
    if e.shape[0] == 1 and x.shape[0] > 1:
        e = e.expand(x.shape[0], -1, -1)
    if e.shape != (x.shape[0], *x.shape[2:]):
        raise ShapeError(f"edge {tuple(e.shape)} does not match cams {tuple(x.shape)}: both on the same (stride-4) grid")
    x = x.float() * (1.0 - e.float())[:, None]
    aff = edge_to_affinity(e, radius)
    rw = random_walk(x, aff, radius, beta=beta, exp_times=exp_times, backend=backend)
    up = F.interpolate(rw, scale_factor=scale, mode="bilinear", align_corners=False) if scale != 1 else rw
    if size is not None:
        up = up[..., : size[0], : size[1]]
    peak = up.flatten(1).amax(1).clamp_min(1e-5) if up.shape[1] else up.new_ones(up.shape[0])
    up = up / peak.view(-1, 1, 1, 1)
    scores = torch.cat([up.new_full((up.shape[0], 1, *up.shape[2:]), float(bg_threshold)), up], dim=1)
    labels = scores.argmax(1)
    return (scores[0], labels[0]) if single else (scores, labels)


def psa_refine(
    cams: torch.Tensor,
    features: torch.Tensor,
    beta: float = 8.0,
    exp_times: int = 8,
    radius: int = 5,
    alpha: float = 16.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """PSA's random-walk refinement: (scores (B, 1+C, H, W), labels (B, H, W) int64).

    cams (B, C, H, W) or (C, H, W) in [0, 1] at image size; features (B, D, h, w) from the affinity
    network (stride 8). Background (1 - max_c cams)^alpha is stacked in front, the stack is area-
    averaged to the feature grid, propagated with a = exp(-mean |f_i - f_j|), upsampled back
    (bilinear) and argmaxed; labels 0 = background, c + 1 = cams channel c.
    """
    x, single = _as_cams(cams)
    if features.dim() == 3:
        features = features[None]
    if features.dim() != 4 or features.shape[0] != x.shape[0]:
        raise ShapeError(f"features must be (B, D, h, w) with B = {x.shape[0]}, got {tuple(features.shape)}")
    x = x.float()
    fg_max = x.amax(1, keepdim=True) if x.shape[1] else torch.zeros_like(x[:, :1])
    stack = torch.cat([(1.0 - fg_max).clamp_min(0).pow(alpha), x], dim=1)
    grid = tuple(features.shape[-2:])
    small = F.interpolate(stack, size=grid, mode="area") if tuple(stack.shape[-2:]) != grid else stack
    aff = feature_affinity(features.to(x.device), radius)
    rw = random_walk(small, aff, radius, beta=beta, exp_times=exp_times, backend=backend)
    scores = F.interpolate(rw, size=x.shape[-2:], mode="bilinear", align_corners=False)
    labels = scores.argmax(1)
    return (scores[0], labels[0]) if single else (scores, labels)
