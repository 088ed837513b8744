"""Fully connected CRF (METHODS.md section 5) on top of pydensecrf2 (extra `[crf]`).

`dense_crf` refines one image's stacked score maps; `dense_crf_many` runs many images in
parallel worker processes. The defaults are CLIP-ES's: 10 mean-field iterations, unary
-log(clip(P, 1e-5, 1)), Gaussian kernel sxy=1 compat=3, bilateral sxy=67 srgb=3 compat=4.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from wsclip.errors import MissingExtraError, ShapeError
from wsclip.workers import die_with_parent

#: BGR Caffe/ImageNet mean the public CLIP-ES code subtracts from its OpenCV (BGR) image (uint8 compat only)
_COMPAT_MEAN_BGR = np.array([104.008, 116.669, 122.675], dtype=np.float64)


@dataclass(frozen=True)
class CRFParams:
    """Dense CRF settings; the defaults are the CLIP-ES values."""

    iters: int = 10
    gauss_sxy: float = 1.0
    gauss_compat: float = 3.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    bilateral_compat: float = 4.0
    #: reproduce the public code: feed the BGR image minus the BGR mean cast to uint8, so negative values
    #: wrap (None: decided by --compat, `wsclip.compat`; off for wsclip)
    uint8_wrap: bool | None = None


def _densecrf():
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as exc:
        raise MissingExtraError("pydensecrf2", "crf", "the dense CRF (--crf)") from exc
    return dcrf


def check_available() -> None:
    """Raise MissingExtraError (naming the `crf` extra) when pydensecrf2 is not installed."""
    _densecrf()


def crf_image(image: np.ndarray, uint8_wrap: bool = False) -> np.ndarray:
    """The reference image the bilateral kernel sees from an RGB uint8 image.

    Default: the RGB image itself. uint8_wrap: the public CLIP-ES code's, i.e. the image in BGR channel
    order (it reads with OpenCV) minus the BGR mean, cast to uint8 so negative values wrap. The
    bilateral kernel is not symmetric in channel order (srgb is per channel), so the order matters.
    """
    image = np.asarray(image)
    if not uint8_wrap:
        return np.ascontiguousarray(image.astype(np.uint8))
    shifted = image[..., ::-1].astype(np.float64) - _COMPAT_MEAN_BGR
    # C casts of negative floats to uint8 are undefined; truncate then wrap modulo 256 explicitly
    return np.ascontiguousarray((np.trunc(shifted).astype(np.int64) & 0xFF).astype(np.uint8))


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """Mean-field posterior (C, H, W) float32 of stacked scores `probs` (C, H, W) given RGB uint8 `image` (H, W, 3)."""
    dcrf = _densecrf()
    image = np.asarray(image)
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3:
        raise ShapeError(f"CRF scores must be (C, H, W), got shape {probs.shape}")
    c, h, w = probs.shape
    if image.ndim != 3 or image.shape[:2] != (h, w) or image.shape[2] != 3:
        raise ShapeError(f"CRF image must be ({h}, {w}, 3) to match the scores, got {image.shape}")
    unary = -np.log(np.clip(probs, 1e-5, 1.0)).reshape(c, -1)
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=crf_image(image, bool(params.uint8_wrap)),
        compat=params.bilateral_compat,
    )
    q = crf.inference(params.iters)
    return np.asarray(q, dtype=np.float32).reshape(c, h, w)


def _crf_job(args):
    image, probs, params = args
    return dense_crf(image, probs, params)


def default_workers() -> int:
    """Worker processes for CRF: the CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def crf_pool(workers: int, spawn: bool = False) -> ProcessPoolExecutor:
    """Worker processes for CRF jobs (pydensecrf holds the GIL); they exit with their parent."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn") if spawn else None
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=die_with_parent)


def dense_crf_many(
    images: Iterable[np.ndarray],
    probs: Iterable[np.ndarray],
    params: CRFParams = CRFParams(),
    workers: int | None = None,
) -> Iterator[np.ndarray]:
    """Posteriors of many images, in input order, computed by `workers` processes (1 = in this process)."""
    check_available()
    jobs = ((im, p, params) for im, p in zip(images, probs))
    workers = default_workers() if workers is None else int(workers)
    if workers <= 1:
        for job in jobs:
            yield _crf_job(job)
        return
    with crf_pool(workers) as pool:
        yield from pool.map(_crf_job, jobs, chunksize=1)


def crf_labels(
    image: np.ndarray,
    probs: np.ndarray,
    params: CRFParams = CRFParams(),
    confidence: float | None = None,
    ignore_index: int = 255,
) -> np.ndarray:
    """Argmax of the CRF posterior (H, W) int64; with `confidence`, pixels whose max posterior is below it get `ignore_index`."""
    q = dense_crf(image, probs, params)
    return posterior_labels(q, confidence, ignore_index)


def posterior_labels(q: np.ndarray, confidence: float | None = None, ignore_index: int = 255) -> np.ndarray:
    """Channel argmax (H, W) of scores (C, H, W); pixels with max below `confidence` become `ignore_index`."""
    q = np.asarray(q)
    labels = q.argmax(0).astype(np.int64)
    if confidence is not None:
        labels[q.max(0) < confidence] = ignore_index
    return labels


__all__: Sequence[str] = (
    "CRFParams", "check_available", "crf_image", "dense_crf", "dense_crf_many", "crf_labels",
    "posterior_labels", "default_workers",
)
