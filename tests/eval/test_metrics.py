import numpy as np
import pytest
import torch

from wsclip.errors import ShapeError
from wsclip.eval.metrics import ConfusionMatrix


def _direct_iou(preds, gts, n, ignore=255):
    """IoU per class straight from the definition, pooled over all images."""
    tp = np.zeros(n)
    fp = np.zeros(n)
    fn = np.zeros(n)
    for p, g in zip(preds, gts):
        v = g != ignore
        for c in range(n):
            tp[c] += np.sum((p == c) & (g == c) & v)
            fp[c] += np.sum((p == c) & (g != c) & v)
            fn[c] += np.sum((p != c) & (g == c) & v)
    d = tp + fp + fn
    return np.where(d > 0, tp / np.maximum(d, 1), np.nan)


def test_matches_direct_definition_over_many_images():
    rng = np.random.default_rng(1)
    n = 6
    preds, gts = [], []
    cm = ConfusionMatrix(n)
    for _ in range(5):
        h, w = rng.integers(3, 17, size=2)
        g = rng.integers(0, n - 1, size=(h, w))  # class n-1 never in GT
        g[rng.random((h, w)) < 0.1] = 255
        p = rng.integers(0, n - 2, size=(h, w))  # nor in prediction -> NaN
        preds.append(p)
        gts.append(g)
        cm.update(torch.from_numpy(p), g)  # tensors and arrays both accepted
    expected = _direct_iou(preds, gts, n)
    np.testing.assert_allclose(cm.iou(), expected, equal_nan=True)
    assert np.isnan(cm.iou()[n - 1])
    assert cm.miou() == pytest.approx(np.nanmean(expected))


def test_dataset_level_not_per_image_mean():
    cm = ConfusionMatrix(2)
    cm.update(np.array([1, 1, 1, 1]), np.array([1, 1, 1, 1]))  # perfect, 4 px
    cm.update(np.array([0, 0]), np.array([1, 1]))  # fully wrong, 2 px
    # pooled: class 1 TP=4, FN=2 -> 4/6; class 0 TP=0, FP=2 -> 0
    assert cm.iou()[1] == pytest.approx(4 / 6)
    assert cm.iou()[0] == 0.0
    assert cm.miou() == pytest.approx((4 / 6 + 0) / 2)


def test_ignore_and_out_of_range_predictions():
    cm = ConfusionMatrix(3)
    gt = np.array([0, 1, 2, 255, 1])
    pred = np.array([0, 7, 2, 1, 1])  # 7 is no class: a miss for GT class 1
    cm.update(pred, gt)
    iou = cm.iou()
    assert iou[0] == 1.0 and iou[2] == 1.0
    assert iou[1] == pytest.approx(1 / 2)  # TP 1, FN 1 (the 7), the 255 pixel ignored
    assert cm.pixel_accuracy() == pytest.approx(3 / 4)


def test_errors_and_merge():
    cm = ConfusionMatrix(3)
    with pytest.raises(ShapeError):
        cm.update(np.zeros(4), np.zeros(5))
    with pytest.raises(ShapeError, match="outside"):
        cm.update(np.zeros(2), np.array([0, 9]))
    a, b = ConfusionMatrix(3), ConfusionMatrix(3)
    a.update(np.array([0, 1]), np.array([0, 2]))
    b.update(np.array([2, 2]), np.array([2, 2]))
    both = ConfusionMatrix(3).update(np.array([0, 1, 2, 2]), np.array([0, 2, 2, 2]))
    np.testing.assert_array_equal(a.merge(b).mat, both.mat)
    assert "mIoU" in both.table(["bg", "a", "b"])
    assert ConfusionMatrix(2).miou() == 0.0
