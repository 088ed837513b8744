"""`wsclip cam --method clims`: CAM files of a dataset from a CAM network (CLIMS, baseline); CAM evaluation.

METHODS.md section 2: relu CAMs at scales (1.0, 0.5, 1.5, 2.0), each with its flip,
summed after bilinear upsampling to the stride-4 size and to the image size; ground-truth
classes only; each map divided by its spatial max (+1e-5). The rule itself lives in
`wsclip.label.cam_labeler` (one CAM predictor for `wsclip cam`, `wsclip label` and the server).

CAM file format (shared with CLIP-ES): one compressed `<id>.npz` per image with
"keys" (int64 0-based foreground class indices present in the image), "cam"
(K', ceil(H/4), ceil(W/4)) float16 and "high_res" (K', H, W) float16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from wsclip.errors import BadFileError, DatasetLayoutError, MissingFileError, WsclipError
from wsclip.formats import read_cam_file, write_cam_file  # noqa: F401 - re-exported
from wsclip.models.camnet import load_camnet
from wsclip.constants import CAM_SCALES
from wsclip.runtime import precision

DEFAULT_SCALES = CAM_SCALES


def cam_maps(net, image, keys, scales: Sequence[float] = DEFAULT_SCALES, flip: bool = True, amp: bool = False,
             preprocess: str = "tensor"):
    """(stride-4 CAMs (K', ceil(H/4), ceil(W/4)), full CAMs (K', H, W)) float32 of one RGB uint8 image for `keys`.

    `net`: a CAMNet or a CamLabeler; the rule is `wsclip.label.cam_labeler.multiscale_cams`, the same
    that `wsclip label`, the server and the exported graph run.
    """
    from wsclip.label.cam_labeler import CamLabeler

    lab = net if isinstance(net, CamLabeler) else CamLabeler(net, [str(k) for k in range(net.num_classes)],
                                                             scales=scales, flip=flip, preprocess=preprocess)
    device = next(lab.parameters()).device
    x = torch.from_numpy(np.require(image, np.uint8, ["C", "W"])).permute(2, 0, 1)[None].to(device)
    keys = torch.as_tensor(keys, dtype=torch.long).reshape(-1).to(device)
    y = torch.zeros(1, len(lab.classes), device=device)
    y[0, keys] = 1.0
    with torch.inference_mode(), precision(device, amp):
        high, low = lab.cams(x, y, low=True)
    return low[0, keys].float(), high[0, keys].float()


def load_image_and_keys(dataset, i: int) -> dict:
    """{"id", "image" RGB uint8 (H, W, 3), "keys" 0-based present classes} of dataset item i (DataLoader side)."""
    item = dataset[i]
    image = np.asarray(item["image"])
    if image.ndim != 3 or image.shape[2] != 3:
        raise BadFileError(f"expected an RGB (H, W, 3) image, got shape {image.shape}")
    keys = torch.nonzero(torch.as_tensor(item["labels"]) > 0.5).flatten()
    return {"id": item["id"], "image": np.require(image, np.uint8, ["C", "W"]), "keys": keys}


def make_cams(
    checkpoint,
    data,
    out_dir,
    split: str = "train",
    scales: Sequence[float] = DEFAULT_SCALES,
    device: str = "auto",
    num_workers: int = 2,
    amp: bool = False,
    on_image: Callable[[str], None] | None = None,
    restart: bool = False,
    on_error: str = "skip",
    compat: str = "wsclip",
) -> dict:
    """Write `<out_dir>/<id>.npz` CAMs for every image of `data` (a spec or a dataset); resumable (`wsclip.jobs`).

    checkpoint: a CAM network checkpoint path or a CAMNet. Every scale runs with its flip.
    Returns {"written", "skipped", "failed", "total"}.
    """
    from wsclip.jobs import Job, file_fingerprint, load_items
    from wsclip.label.cam_labeler import CamLabeler
    from wsclip.runtime import resolve_device

    dev = resolve_device(device)
    if isinstance(checkpoint, torch.nn.Module):
        net = checkpoint.to(dev).eval()
        classes, source = None, {"module": type(checkpoint).__name__}
    else:
        net, meta = load_camnet(checkpoint, device=dev)
        classes, source = meta.get("classes"), file_fingerprint(checkpoint)
    if isinstance(data, (str, Path)):
        from wsclip.data import open_images

        ds = open_images(data, split, classes=classes)  # a folder's label names map onto the model's classes
    else:
        ds = data
    if len(ds.classes) != net.num_classes:
        raise WsclipError(
            f"the CAM network has {net.num_classes} classes ({', '.join(classes or [])}) but the dataset has "
            f"{len(ds.classes)}: use the checkpoint trained for this dataset"
        )
    if not scales or any(s <= 0 for s in scales):
        raise WsclipError(f"scales must be positive numbers, got {list(scales)}")
    from wsclip.compat import value

    preprocess = value("preprocess", compat)
    lab = CamLabeler(net, list(ds.classes), scales=scales, flip=True, preprocess=preprocess).to(dev)
    settings = {"method": "clims", "checkpoint": source, "scales": [float(s) for s in scales], "amp": bool(amp),
                "preprocess": preprocess}
    with Job("cam", out_dir, settings, restart=restart, on_error=on_error, suffix=".npz", on_item=on_image) as job:
        for item in load_items(job, ds, job.start(list(ds.ids)), load_image_and_keys, num_workers):
            with job.item(item["id"]):
                low, high = cam_maps(lab, item["image"], item["keys"], amp=amp)
                write_cam_file(job.out / f"{item['id']}.npz", item["keys"], low, high)
        return job.result()


# ============================================================================ evaluation
def parse_thresholds(spec: str) -> list[float]:
    """'0.05:0.6:0.05' (start:stop:step, stop included), '0.1,0.15' or '0.15'."""
    try:
        if ":" in spec:
            start, stop, step = (float(x) for x in spec.split(":"))
            if step <= 0 or stop < start:
                raise ValueError("need start <= stop and step > 0")
            n = int(np.floor((stop - start) / step + 1e-6)) + 1
            return [round(start + i * step, 6) for i in range(n)]
        return [float(x) for x in spec.split(",") if x.strip()]
    except ValueError as exc:
        raise WsclipError(f"bad thresholds '{spec}': write start:stop:step (e.g. 0.05:0.6:0.05) or a list 0.1,0.15 ({exc})") from None


def evaluate_cams(cams_dir, gt_dir, thresholds: Sequence[float], num_classes: int, split=None, key: str = "high_res"):
    """{threshold: ConfusionMatrix}: background = constant threshold, argmax over [bg, present classes]."""
    from wsclip.eval.evaluate import read_split
    from wsclip.eval.metrics import ConfusionMatrix
    from wsclip.io import read_mask
    from wsclip.label.masks import background_argmax
    from wsclip.progress import progress

    cams_dir, gt_dir = Path(cams_dir), Path(gt_dir)
    for d, what in ((cams_dir, "CAM"), (gt_dir, "ground-truth")):
        if not d.is_dir():
            raise MissingFileError(f"{what} folder not found: {d}")
    ids = read_split(split) if split else sorted(p.stem for p in cams_dir.glob("*.npz"))
    if not ids:
        raise DatasetLayoutError(f"no CAM files (*.npz) in {cams_dir}")
    missing = [i for i in ids if not (cams_dir / f"{i}.npz").is_file() or not (gt_dir / f"{i}.png").is_file()]
    if missing:
        raise MissingFileError(
            f"{len(missing)} of {len(ids)} images lack a CAM file in {cams_dir} or a mask in {gt_dir}, e.g. {missing[0]}"
        )
    cms = {t: ConfusionMatrix(num_classes) for t in thresholds}
    for i in progress(ids, desc="eval-cam", unit="img"):
        z = read_cam_file(cams_dir / f"{i}.npz")
        gt = read_mask(gt_dir / f"{i}.png")
        cams = z[key].astype(np.float32)
        keys = z["keys"].astype(np.int64)
        if cams.shape[1:] != gt.shape:
            raise BadFileError(f"{i}: CAM '{key}' is {cams.shape[2]}x{cams.shape[1]}, mask {gt.shape[1]}x{gt.shape[0]}")
        for t, cm in cms.items():
            cm.update(background_argmax(cams, t, keys), gt)
    return cms
