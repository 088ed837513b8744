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


def _public_clims_miou(preds, gts, n):
    """The CLIMS/IRN evaluation (step/eval_sem_seg.py on chainercv), rewritten from its documented behaviour:
    predicted 255 -> 0, ground-truth 255 -> -1 (dropped), confusion cropped to n x n, nanmean of IoU."""
    conf = np.zeros((256, 256), np.int64)
    for p, g in zip(preds, gts):
        p = p.astype(np.int64).copy()
        p[p == 255] = 0
        g = np.where(g == 255, -1, g.astype(np.int64))
        keep = g >= 0
        conf += np.bincount(256 * g[keep] + p[keep], minlength=256 * 256).reshape(256, 256)
    conf = conf[:n, :n]
    gtj, resj, tp = conf.sum(1), conf.sum(0), np.diag(conf)
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.nanmean(tp / (gtj + resj - tp)))


def _masks_with_255(seed=0, n=5, count=4, share=0.05):
    rng = np.random.default_rng(seed)
    preds, gts = [], []
    for _ in range(count):
        h, w = rng.integers(20, 41, size=2)
        g = rng.integers(0, n, (h, w))
        g[rng.random((h, w)) < 0.05] = 255
        p = np.where(rng.random((h, w)) < 0.6, g, rng.integers(0, n, (h, w)))
        p[rng.random((h, w)) < share] = 255
        preds.append(p.astype(np.uint8))
        gts.append(g.astype(np.uint8))
    return preds, gts


def test_predicted_255_counts_as_background_like_the_public_evaluation():
    n = 5
    preds, gts = _masks_with_255()
    cm = ConfusionMatrix(n)
    for p, g in zip(preds, gts):
        cm.update(p, g)
    assert cm.pred_ignored.sum() > 0
    assert cm.miou() == pytest.approx(_public_clims_miou(preds, gts, n), abs=1e-12)
    # the same figure from masks whose 255 were rewritten to 0 by hand
    ref = ConfusionMatrix(n, pred_ignore="miss")
    for p, g in zip(preds, gts):
        ref.update(np.where(p == 255, 0, p), g)
    np.testing.assert_allclose(cm.iou(), ref.iou(), rtol=0, atol=0)


def test_predicted_255_policies_miss_ignore_and_coverage():
    n = 5
    preds, gts = _masks_with_255(seed=1)
    cms = {pol: ConfusionMatrix(n, pred_ignore=pol) for pol in ("background", "miss", "ignore")}
    for p, g in zip(preds, gts):
        for cm in cms.values():
            cm.update(p, g)
    v = [g != 255 for g in gts]
    # miss: a predicted 255 is a false negative of its ground-truth class (the direct definition says so)
    np.testing.assert_allclose(cms["miss"].iou(), _direct_iou(preds, gts, n), rtol=1e-12)
    # ignore: the pixels predicted 255 are left out
    kept = [(p[p != 255], g[p != 255]) for p, g in zip(preds, gts)]
    np.testing.assert_allclose(cms["ignore"].iou(), _direct_iou(*zip(*kept), n), rtol=1e-12)
    # each matrix can give the others' figures
    for pol in cms:
        assert cms["background"].miou(pol) == pytest.approx(cms[pol].miou(), abs=1e-15)
    assert len({round(cm.miou(), 12) for cm in cms.values()}) == 3  # the policies really differ here
    expected = sum(int(((p != 255) & m).sum()) for p, m in zip(preds, v)) / sum(int(m.sum()) for m in v)
    assert cms["miss"].coverage() == pytest.approx(expected, rel=1e-12) and 0.9 < expected < 0.99
    d = cms["background"].to_dict()
    assert d["coverage"] == pytest.approx(expected) and d["miou_kept"] == pytest.approx(cms["ignore"].miou())
    assert "coverage" in cms["background"].table()
    assert ConfusionMatrix(n).coverage() == 1.0
    with pytest.raises(Exception, match="use one of"):
        ConfusionMatrix(n, pred_ignore="zero")
