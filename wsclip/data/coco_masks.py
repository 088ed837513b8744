"""COCO segmentations to bitmaps without pycocotools: polygons, uncompressed and compressed RLE.

Polygons are rasterised by pixel centres: pixel (row r, column c) is inside when the point
(c + 0.5, r + 0.5) is inside the polygon (even-odd rule), which keeps the COCO area
convention (a polygon [0,0, 4,0, 4,3, 0,3] covers exactly 12 pixels).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from wsclip.errors import BadFileError


def polygon_to_mask(coords: Sequence[float], height: int, width: int) -> np.ndarray:
    """Bool (H, W) mask of one polygon given as a flat [x0, y0, x1, y1, ...] list."""
    pts = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    out = np.zeros((height, width), dtype=bool)
    if len(pts) < 3 or height == 0 or width == 0:
        return out
    x0, y0 = pts[:, 0], pts[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    keep = y0 != y1  # horizontal edges never cross a scanline
    x0, y0, x1, y1 = x0[keep], y0[keep], x1[keep], y1[keep]
    rows = np.arange(height, dtype=np.float64) + 0.5
    ylo, yhi = np.minimum(y0, y1), np.maximum(y0, y1)
    # an edge crosses scanline y when ylo <= y < yhi (half-open: each vertex counted once)
    cross = (rows[:, None] >= ylo[None]) & (rows[:, None] < yhi[None])
    r_idx, e_idx = np.nonzero(cross)
    if r_idx.size == 0:
        return out
    t = (rows[r_idx] - y0[e_idx]) / (y1[e_idx] - y0[e_idx])
    xs = x0[e_idx] + t * (x1[e_idx] - x0[e_idx])
    order = np.lexsort((xs, r_idx))
    r_idx, xs = r_idx[order], xs[order]
    # crossings pair up along each row: pixels with centre in [x_in, x_out) are inside
    starts = np.clip(np.ceil(xs[0::2] - 0.5), 0, width).astype(np.int64)
    ends = np.clip(np.ceil(xs[1::2] - 0.5), 0, width).astype(np.int64)
    rows_of = r_idx[0::2]
    diff = np.zeros((height, width + 1), dtype=np.int32)
    np.add.at(diff, (rows_of, starts), 1)
    np.add.at(diff, (rows_of, ends), -1)
    return np.cumsum(diff[:, :width], axis=1) > 0


def decode_rle_string(s: str | bytes) -> list[int]:
    """Run lengths from COCO's compressed RLE string (5-bit groups, '0'-offset, delta from i-2)."""
    if isinstance(s, bytes):
        s = s.decode("ascii")
    counts: list[int] = []
    p = 0
    while p < len(s):
        value, shift, more = 0, 0, True
        while more:
            if p >= len(s):
                raise BadFileError("truncated compressed RLE string")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise BadFileError(f"invalid character {s[p]!r} in compressed RLE string")
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            p += 1
            shift += 5
            if not more and c & 0x10:
                value -= 1 << shift  # sign-extend the last group
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def rle_to_mask(counts: Sequence[int], height: int, width: int) -> np.ndarray:
    """Bool (H, W) mask from run lengths over the column-major pixel order, starting with zeros."""
    counts = np.asarray(counts, dtype=np.int64)
    if (counts < 0).any() or counts.sum() != height * width:
        raise BadFileError(
            f"RLE runs sum to {int(counts.sum())} but the mask has {height}x{width} = {height * width} pixels"
        )
    values = np.arange(len(counts)) % 2 == 1
    flat = np.repeat(values, counts)
    return flat.reshape(width, height).T


def segmentation_to_mask(seg, height: int, width: int) -> np.ndarray:
    """Bool (H, W) mask of a COCO `segmentation` entry (polygon list, or RLE dict)."""
    if isinstance(seg, list):
        out = np.zeros((height, width), dtype=bool)
        for poly in seg:
            if len(poly) % 2:
                raise BadFileError(f"polygon with an odd number of coordinates ({len(poly)})")
            out |= polygon_to_mask(poly, height, width)
        return out
    if isinstance(seg, dict) and "counts" in seg:
        h, w = seg.get("size", (height, width))
        if (h, w) != (height, width):
            raise BadFileError(f"RLE size {h}x{w} does not match the image's {height}x{width}")
        counts = seg["counts"]
        if isinstance(counts, (str, bytes)):
            counts = decode_rle_string(counts)
        return rle_to_mask(counts, height, width)
    raise BadFileError(f"unknown segmentation format: {type(seg).__name__}")


def render_semantic_mask(anns: Sequence[dict], height: int, width: int) -> np.ndarray:
    """uint8 (H, W) class mask from [{"label", "segmentation", "iscrowd", "area"}].

    Objects are painted largest first so smaller ones stay visible where they overlap; crowd
    regions only fill pixels no single object claimed.
    """
    mask = np.zeros((height, width), dtype=np.uint8)
    singles = sorted((a for a in anns if not a.get("iscrowd")), key=lambda a: -float(a.get("area", 0)))
    for a in singles:
        mask[segmentation_to_mask(a["segmentation"], height, width)] = a["label"]
    for a in anns:
        if a.get("iscrowd"):
            m = segmentation_to_mask(a["segmentation"], height, width) & (mask == 0)
            mask[m] = a["label"]
    return mask
