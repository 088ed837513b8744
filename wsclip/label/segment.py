"""Segment images with a trained network (`wsclip segment`, METHODS.md section 7 at test time).

Each image runs whole (no crop) at every scale, with its horizontal flip; the softmax
probabilities, upsampled bilinearly to the image size, are averaged; an optional dense CRF
(CLIP-ES/DeepLab settings) refines them; the argmax is written as a palette PNG
`<out>/<id>.png` (0 = background, k = class k), which `wsclip eval --pred` reads.
Images whose PNG exists are skipped, so an interrupted run resumes.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from wsclip.errors import WsclipError
from wsclip.runtime import precision

DEFAULT_SCALES = (0.5, 0.75, 1.0)


def image_tensor(image: np.ndarray, mean: Sequence[float], std: Sequence[float], device=None) -> torch.Tensor:
    """(1, 3, H, W) normalised float32 from an RGB uint8 (H, W, 3) image."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).to(device).permute(2, 0, 1)[None].float() / 255.0
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


@torch.no_grad()
def segment_probs(net, image: np.ndarray, scales: Sequence[float] = DEFAULT_SCALES, flip: bool = True,
                  mean=None, std=None, amp: bool = False) -> torch.Tensor:
    """Class probabilities (C, H, W) float32 of one RGB uint8 image, averaged over scales and flips."""
    from wsclip.models.seg import IMAGENET_MEAN, IMAGENET_STD

    device = next(net.parameters()).device
    x = image_tensor(image, mean or IMAGENET_MEAN, std or IMAGENET_STD, device)
    with precision(device, amp):
        return net.predict(x, scales, flip)[0].float()


def _crf_argmax(job) -> np.ndarray:
    from wsclip.refine.crf import dense_crf

    image, probs, params = job
    return dense_crf(image, probs, params).argmax(0).astype(np.uint8)


class _Images(torch.utils.data.Dataset):
    """Decodes images in DataLoader workers."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, n):
        i = self.indices[n]
        try:
            return self.dataset.ids[i], np.asarray(self.dataset.load_image(i))
        except WsclipError as exc:  # a bad image is skipped into errors.json; the run goes on
            return self.dataset.ids[i], str(exc)


def _identity(x):
    return x


def parse_scales(spec: str) -> list[float]:
    """'0.5,0.75,1.0' -> [0.5, 0.75, 1.0]; a clear error for anything else."""
    try:
        scales = [float(s) for s in str(spec).split(",") if s.strip()]
    except ValueError:
        raise WsclipError(f"--scales must be comma-separated numbers, got '{spec}'") from None
    if not scales or any(s <= 0 for s in scales):
        raise WsclipError(f"--scales must be positive numbers, got '{spec}'")
    return scales


def segment(
    checkpoint,
    images,
    out_dir,
    split: str | None = None,
    scales: Sequence[float] = DEFAULT_SCALES,
    flip: bool = True,
    crf: bool = False,
    crf_params=None,
    crf_workers: int | None = None,
    device: str = "auto",
    num_workers: int = 2,
    amp: bool = False,
    on_image: Callable[[str], None] | None = None,
) -> dict:
    """Write `<out_dir>/<id>.png` masks for every image of `images` (a folder, dataset spec or dataset).

    checkpoint: a `wsclip train seg` checkpoint path or a SegNet. Finished PNGs are skipped.
    With crf, a dense CRF refines the probabilities in `crf_workers` processes (default: all
    cores). A bad image is skipped into <out_dir>/errors.json. Returns {"written", "skipped", "failed", "total"}.
    """
    from wsclip.io import write_errors, write_mask
    from wsclip.models.seg import load_seg_model
    from wsclip.progress import progress
    from wsclip.train.loop import resolve_device

    dev = resolve_device(device)
    if isinstance(checkpoint, torch.nn.Module):
        net, meta = checkpoint.to(dev).eval(), {}
    else:
        net, meta = load_seg_model(checkpoint, device=dev)
    if not scales or any(s <= 0 for s in scales):
        raise WsclipError(f"scales must be positive numbers, got {list(scales)}")
    if isinstance(images, (str, Path)):
        from wsclip.data import open_images

        ds = open_images(images, split)
    else:
        ds = images
    params = None
    if crf:
        from wsclip.refine.crf import CRFParams, check_available, default_workers

        check_available()
        params = crf_params or CRFParams()
        crf_workers = default_workers() if crf_workers is None else max(1, int(crf_workers))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    todo = [i for i, image_id in enumerate(ds.ids) if not (out / f"{image_id}.png").is_file()]
    loader = torch.utils.data.DataLoader(_Images(ds, todo), batch_size=None, shuffle=False,
                                         num_workers=num_workers, collate_fn=_identity)
    written, failed = 0, []

    def done(image_id, mask):
        nonlocal written
        write_mask(out / f"{image_id}.png", mask)
        written += 1
        if on_image is not None:
            on_image(image_id)

    pool = None
    if crf and crf_workers > 1:
        from wsclip.refine.crf import crf_pool

        pool = crf_pool(crf_workers)
    pending: deque = deque()
    try:
        for image_id, image in progress(loader, total=len(todo), desc="segment", unit="img"):
            if isinstance(image, str):
                failed.append((image_id, image))
                continue
            probs = segment_probs(net, image, scales, flip, meta.get("mean"), meta.get("std"), amp=amp)
            if not crf:
                done(image_id, probs.argmax(0).to(torch.uint8).cpu().numpy())
                continue
            job = (image, probs.cpu().numpy(), params)
            if pool is None:
                done(image_id, _crf_argmax(job))
                continue
            pending.append((image_id, pool.submit(_crf_argmax, job)))
            while len(pending) > 2 * crf_workers:  # bounded: the network does not run ahead of the CRF
                image_id, fut = pending.popleft()
                done(image_id, fut.result())
        while pending:
            image_id, fut = pending.popleft()
            done(image_id, fut.result())
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    write_errors(out, failed)
    return {"written": written, "skipped": len(ds.ids) - len(todo), "failed": failed, "total": len(ds.ids)}
