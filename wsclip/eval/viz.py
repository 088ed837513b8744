"""Pictures: palette masks, mask overlays, CAM heatmaps, panel grids and plots (PNG, atomic).

Images are RGB uint8 (H, W, 3) numpy arrays; masks uint8 (H, W) labels; CAMs float (h, w)
in [0, 1] (resized to the image). Plots use matplotlib's Agg canvas directly (no pyplot state).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from wsclip.errors import ShapeError
from wsclip.io import atomic_write_bytes, voc_palette

_PALETTE = np.asarray(voc_palette(), dtype=np.uint8).reshape(256, 3)


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _rgb(image) -> np.ndarray:
    """RGB uint8 (H, W, 3) from uint8 or [0, 1] float, HWC or CHW, grey or RGB."""
    img = _as_numpy(image)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = img.transpose(1, 2, 0)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ShapeError(f"expected an image (H, W, 3), got shape {img.shape}")
    if img.dtype != np.uint8:
        img = (np.clip(img.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return img


def colorize(mask) -> np.ndarray:
    """RGB uint8 (H, W, 3) of a label mask in the VOC palette (255 = ignore is light grey)."""
    m = _as_numpy(mask)
    if m.ndim != 2:
        raise ShapeError(f"mask must be 2-D (H, W), got shape {m.shape}")
    return _PALETTE[m.astype(np.uint8)]


def overlay(image, mask, alpha: float = 0.5, skip: Sequence[int] = (0,)) -> np.ndarray:
    """Blend the coloured mask over the image where the label is not in `skip` (default: background)."""
    img = _rgb(image)
    m = _as_numpy(mask)
    if m.shape != img.shape[:2]:
        raise ShapeError(f"mask {m.shape} and image {img.shape[:2]} differ in size")
    col = colorize(m).astype(np.float32)
    blend = (1 - alpha) * img.astype(np.float32) + alpha * col
    keep = np.isin(m, list(skip))[..., None]
    return np.where(keep, img, (blend + 0.5).astype(np.uint8)).astype(np.uint8)


def _resize_float(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if x.shape == size:
        return x
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def cam_heatmap(image, cam, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Colour-mapped CAM (values clipped to [0, 1], resized bilinearly to the image) blended over it."""
    from matplotlib import colormaps

    img = _rgb(image)
    c = _as_numpy(cam).astype(np.float32)
    if c.ndim != 2:
        raise ShapeError(f"cam must be 2-D (h, w), got shape {c.shape}")
    c = np.clip(_resize_float(c, img.shape[:2]), 0.0, 1.0)
    heat = colormaps[cmap](c)[..., :3] * 255.0
    return ((1 - alpha) * img + alpha * heat + 0.5).astype(np.uint8)


def encode_png(rgb) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_rgb(rgb)).save(buf, format="PNG")
    return buf.getvalue()


def save_png(path, rgb) -> Path:
    """Write an RGB (or grey) image as PNG atomically; returns the path."""
    atomic_write_bytes(path, encode_png(rgb))
    return Path(path)


def grid(images: Sequence, ncols: int = 4, titles: Sequence[str] | None = None, pad: int = 4,
         background: int = 255) -> np.ndarray:
    """Tile images (any sizes; each cell is as large as the largest) into one RGB picture,
    with an optional title above each panel."""
    from PIL import Image, ImageDraw, ImageFont

    if not images:
        raise ShapeError("grid() needs at least one image")
    if titles is not None and len(titles) != len(images):
        raise ShapeError(f"{len(titles)} titles for {len(images)} images")
    panels = [_rgb(im) for im in images]
    ncols = max(1, min(ncols, len(panels)))
    nrows = -(-len(panels) // ncols)
    ch = max(p.shape[0] for p in panels)
    cw = max(p.shape[1] for p in panels)
    font = ImageFont.load_default()
    th = 0
    if titles is not None:
        th = max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), t or " ", font=font)[3]
                 for t in titles) + 4
    canvas = Image.new("RGB", (ncols * (cw + pad) + pad, nrows * (ch + th + pad) + pad), (background,) * 3)
    draw = ImageDraw.Draw(canvas)
    for n, p in enumerate(panels):
        r, c = divmod(n, ncols)
        x, y = pad + c * (cw + pad), pad + r * (ch + th + pad)
        if titles is not None:
            draw.text((x, y), str(titles[n]), fill=(0, 0, 0), font=font)
        canvas.paste(Image.fromarray(p), (x, y + th))
    return np.asarray(canvas)


def _save_figure(fig, path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    fig.savefig(buf, format=fmt, dpi=100, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def bar_chart(path, table: Mapping[str, Mapping[str, float]], title: str = "", ylabel: str = "") -> Path:
    """Grouped bars: one group per outer key (e.g. method), one bar per inner key (e.g. metric)."""
    from matplotlib.figure import Figure

    if not table:
        raise ShapeError("bar_chart() needs a non-empty table")
    groups = list(table)
    series = list(dict.fromkeys(k for g in groups for k in table[g]))
    fig = Figure(figsize=(max(4.0, 1.2 * len(groups) * max(1, len(series)) ** 0.5 + 2), 3.5))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for n, s in enumerate(series):
        vals = [table[g].get(s, np.nan) for g in groups]
        bars = ax.bar(x + (n - (len(series) - 1) / 2) * width, vals, width, label=s)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(x, groups)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return _save_figure(fig, path)


def plot_lines(path, series: Mapping[str, Sequence[float] | tuple[Sequence[float], Sequence[float]]],
               xlabel: str = "", ylabel: str = "", title: str = "", logy: bool = False) -> Path:
    """Line plot of {name: ys} (x = 0, 1, ...) or {name: (xs, ys)}."""
    from matplotlib.figure import Figure

    if not series:
        raise ShapeError("plot_lines() needs at least one series")
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    for name, v in series.items():
        if isinstance(v, tuple) and len(v) == 2:
            xs, ys = v
        else:
            ys = list(v)
            xs = list(range(len(ys)))
        if len(xs) != len(ys):
            raise ShapeError(f"series '{name}' has {len(xs)} x values and {len(ys)} y values")
        ax.plot(xs, ys, marker="o" if len(ys) < 30 else None, markersize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return _save_figure(fig, path)
