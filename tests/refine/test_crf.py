"""Dense CRF: posterior sanity, parallel == serial, compat image, missing extra, real VOC images."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from wsclip.errors import MissingExtraError, ShapeError
from wsclip.refine import crf

ROOT = Path(__file__).resolve().parents[2]


def _two_region_case(h=37, w=53, seed=0):
    """A left/right two-colour image with noisy, boundary-shifted scores."""
    rng = np.random.default_rng(seed)
    image = np.zeros((h, w, 3), np.uint8)
    image[:, : w // 2] = (200, 30, 30)
    image[:, w // 2 :] = (20, 40, 210)
    image = np.clip(image + rng.integers(-2, 3, image.shape), 0, 255).astype(np.uint8)
    truth = np.zeros((h, w), np.int64)
    truth[:, w // 2 :] = 1
    fg = np.zeros((h, w), np.float32)
    fg[:, w // 2 - 6 :] = 0.7  # the score boundary is 6 px off the colour edge
    fg = np.clip(fg + 0.25 * rng.standard_normal((h, w)), 0, 1).astype(np.float32)
    return image, np.stack([1 - fg, fg]), truth


def test_posterior_is_a_distribution_and_snaps_to_colour_edge():
    image, probs, truth = _two_region_case()
    q = crf.dense_crf(image, probs)
    assert q.shape == probs.shape and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-4)
    before = (probs.argmax(0) == truth).mean()
    after = (q.argmax(0) == truth).mean()
    assert before < 0.9 and after > 0.98


def test_parallel_equals_serial():
    cases = [_two_region_case(h, w, s) for s, (h, w) in enumerate([(17, 23), (31, 12), (9, 40)])]
    images, probs = [c[0] for c in cases], [c[1] for c in cases]
    serial = list(crf.dense_crf_many(images, probs, workers=1))
    parallel = list(crf.dense_crf_many(images, probs, workers=2))
    assert len(parallel) == 3
    for a, b, p in zip(serial, parallel, probs):
        assert a.shape == p.shape
        np.testing.assert_array_equal(a, b)


def _direct_crf(rgbim, probs):
    """pydensecrf2 called directly with the METHODS.md section 5 values (written out, not taken from CRFParams)."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax  # -log(clip(P, 1e-5, 1)), as the public code calls it

    c, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=1, compat=3)
    d.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.ascontiguousarray(rgbim), compat=4)
    return np.asarray(d.inference(10), np.float32).reshape(c, h, w)


def _public_crf_image(rgb):
    """The public eval_cam_with_crf.py image: OpenCV's BGR float32 minus the BGR mean, cast to uint8 (wraps)."""
    image = np.ascontiguousarray(rgb[..., ::-1]).astype(np.float32)  # cv2.imread gives BGR
    image -= (104.008, 116.669, 122.675)
    return image.transpose(2, 0, 1).astype(np.uint8).transpose(1, 2, 0)


def _three_class_case(h=29, w=41, seed=3):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    image[:, : w // 3] = (250, 10, 120)  # colours whose channels differ, so the channel order matters
    image[:, 2 * w // 3 :] = (5, 180, 60)
    p = rng.random((3, h, w)).astype(np.float32) ** 3
    p[1, :, : w // 2] += 0.6
    p[0, 0, 0] = 0.0  # below the 1e-5 clip
    return image, (p / p.sum(0)).astype(np.float32)


def test_dense_crf_equals_a_direct_pydensecrf_call_with_the_methods_values():
    """Pins the unary (-log, clipped) and which compat goes with which kernel: a swap or a dropped -log fails."""
    image, probs = _three_class_case()
    np.testing.assert_allclose(crf.dense_crf(image, probs), _direct_crf(image, probs), atol=1e-6)
    swapped = crf.CRFParams(gauss_compat=4.0, bilateral_compat=3.0)
    assert np.abs(crf.dense_crf(image, probs, swapped) - _direct_crf(image, probs)).max() > 1e-3


def test_uint8_wrap_is_the_public_codes_bgr_image():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (5, 7, 3)).astype(np.uint8)
    got = crf.crf_image(image, uint8_wrap=True)
    np.testing.assert_array_equal(got, _public_crf_image(image))
    mean_bgr = (104.008, 116.669, 122.675)
    expected = np.array([[[int(v - m) % 256 for v, m in zip(px[::-1], mean_bgr)] for px in row] for row in image])
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(crf.crf_image(image), image)
    # the posterior is the public code's: the wrapped BGR image, not the RGB one
    img, probs = _three_class_case()
    q = crf.dense_crf(img, probs, crf.CRFParams(uint8_wrap=True))
    np.testing.assert_allclose(q, _direct_crf(_public_crf_image(img), probs), atol=1e-6)
    rgb_order = _direct_crf(np.ascontiguousarray(_public_crf_image(img)[..., ::-1]), probs)
    assert np.abs(q - rgb_order).max() > 1e-3


def test_confidence_filter_and_shape_errors():
    q = np.array([[[0.97, 0.5]], [[0.03, 0.5]]], np.float32)  # (2, 1, 2)
    np.testing.assert_array_equal(crf.posterior_labels(q, confidence=0.95), [[0, 255]])
    np.testing.assert_array_equal(crf.posterior_labels(q), [[0, 0]])
    with pytest.raises(ShapeError):
        crf.dense_crf(np.zeros((4, 4, 3), np.uint8), np.ones((2, 4, 5), np.float32))
    with pytest.raises(ShapeError):
        crf.dense_crf(np.zeros((4, 4, 3), np.uint8), np.ones((4, 4), np.float32))


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)  # makes the import fail
    with pytest.raises(MissingExtraError, match=r"wsclip\[crf\]"):
        crf.check_available()
    with pytest.raises(MissingExtraError, match="pydensecrf2"):
        crf.dense_crf(np.zeros((4, 4, 3), np.uint8), np.ones((2, 4, 4), np.float32))


def test_crf_raises_miou_on_real_voc_images(voc14):
    """Degraded ground truth -> CRF with the real image: mIoU rises (2 images for speed; all 14 in benchmarks/crf_voc14.py)."""
    spec = importlib.util.spec_from_file_location("crf_voc14", ROOT / "benchmarks" / "crf_voc14.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ids = ["2008_007814", "2009_001314"]
    before, after, _ = bench.evaluate(ids, workers=2, root=voc14)
    assert 0.3 < before < 0.95
    assert after > before + 0.01


def test_crf_pool_workers_die_with_a_killed_parent():
    """kill -9 of a job must not leave its CRF worker processes behind (PR_SET_PDEATHSIG)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import os, sys, time\n"
        "from wsclip.refine.crf import crf_pool\n"
        "pool = crf_pool(1)\n"
        "print(pool.submit(os.getpid).result(), flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())
        os.kill(worker, 0)  # alive while the parent is
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                break
            # a zombie reaped by init also counts as gone
            try:
                with open(f"/proc/{worker}/stat") as f:
                    if f.read().split()[2] == "Z":
                        break
            except FileNotFoundError:
                break
            time.sleep(0.05)
        else:
            os.kill(worker, signal.SIGKILL)
            raise AssertionError("the CRF worker outlived its killed parent")
    finally:
        if parent.poll() is None:
            parent.kill()
