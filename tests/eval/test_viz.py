"""Pictures: palette masks, overlays, heatmaps, grids and plots written as PNGs of the right size."""

import numpy as np
import pytest
import torch
from PIL import Image

from wsclip.errors import ShapeError
from wsclip.eval.viz import bar_chart, cam_heatmap, colorize, grid, overlay, plot_lines, save_png
from wsclip.io import voc_palette


def test_colorize_overlay_heatmap(voc14, tmp_path):
    img = np.asarray(Image.open(voc14 / "JPEGImages" / "2007_000033.jpg").convert("RGB"))
    mask = np.asarray(Image.open(voc14 / "SegmentationClass" / "2007_000033.png"))
    pal = np.asarray(voc_palette(), np.uint8).reshape(256, 3)
    col = colorize(mask)
    assert col.shape == (513, 513, 3) and col.dtype == np.uint8
    for v in np.unique(mask):
        assert (col[mask == v] == pal[v]).all()
    assert tuple(pal[1]) == (128, 0, 0)

    ov = overlay(img, mask, alpha=0.5)
    assert (ov[mask == 0] == img[mask == 0]).all()  # background untouched
    fg = mask == 1
    assert np.abs(ov[fg].astype(int) - (img[fg].astype(int) + pal[1]) / 2).max() <= 1

    cam = np.zeros((33, 33), np.float32)
    cam[10:20, 10:20] = 1.0
    heat = cam_heatmap(torch.from_numpy(img.copy()).permute(2, 0, 1), torch.from_numpy(cam), alpha=1.0)
    assert heat.shape == (513, 513, 3)
    assert heat[250, 250, 0] > 100 and heat[250, 250, 2] < 100  # hot = red in jet
    assert heat[5, 5, 2] > 100 and heat[5, 5, 0] < 50  # cold = blue

    for name, rgb in (("c.png", col), ("o.png", ov), ("h.png", heat), ("m.png", mask * 10)):
        p = save_png(tmp_path / "out" / name, rgb)
        with Image.open(p) as im:
            assert im.size == (513, 513) and im.mode == "RGB"
    assert sorted(x.name for x in (tmp_path / "out").iterdir()) == ["c.png", "h.png", "m.png", "o.png"]


def test_grid_sizes_and_titles(tmp_path):
    a = np.full((10, 20, 3), 50, np.uint8)
    b = np.full((30, 5, 3), 200, np.uint8)
    c = np.random.rand(3, 8, 8).astype(np.float32)  # CHW float in [0, 1]
    g = grid([a, b, c], ncols=2, pad=2)
    assert g.shape == (2 * (30 + 2) + 2, 2 * (20 + 2) + 2, 3)
    assert (g[2:12, 2:22] == 50).all() and (g[2:32, 24:29] == 200).all()
    t = grid([a, b, c], ncols=3, titles=["one", "two", "three"], pad=2)
    assert t.shape[1] == 3 * 22 + 2 and t.shape[0] > 30 + 4
    assert (t[: t.shape[0] - 32] < 128).any()  # title text drawn in black above the panels
    with Image.open(save_png(tmp_path / "g.png", t)) as im:
        assert im.size == (t.shape[1], t.shape[0])
    with pytest.raises(ShapeError):
        grid([a], titles=["x", "y"])
    with pytest.raises(ShapeError):
        colorize(np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(ShapeError):
        overlay(a, np.zeros((3, 3), np.uint8))


def test_charts(tmp_path):
    table = {"CLIMS": {"CAM": 56.6, "+IRN": 74.1}, "CLIP-ES": {"CAM": 58.6, "+CAA": 70.8, "+CRF": 75.0}}
    p = bar_chart(tmp_path / "bars.png", table, "VOC train mIoU", ylabel="mIoU")
    q = plot_lines(tmp_path / "plots" / "loss.png", {"otm": [3, 2, 1.5], "btm": ([0, 5, 10], [1, 0.5, 0.2])},
                   "step", "loss", "training")
    for path in (p, q):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 150
            assert len(np.unique(np.asarray(im.convert("L")))) > 10  # something was drawn
    assert not list(tmp_path.glob("**/*.tmp*"))  # atomic writes leave no temporaries
    with pytest.raises(ShapeError):
        plot_lines(tmp_path / "x.png", {"a": ([1, 2], [1])})
