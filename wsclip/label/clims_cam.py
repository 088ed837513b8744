"""Multi-scale CAM inference for CAM networks (CLIMS, baseline) and CAM evaluation.

METHODS.md section 2: relu CAMs at scales (1.0, 0.5, 1.5, 2.0), each with its flip,
summed after bilinear upsampling to the stride-4 size and to the image size; ground-truth
classes only; each map divided by its spatial max (+1e-5).

CAM file format (shared with CLIP-ES): one compressed `<id>.npz` per image with
"keys" (int64 0-based foreground class indices present in the image), "cam"
(K', ceil(H/4), ceil(W/4)) float16 and "high_res" (K', H, W) float16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from wsclip.errors import BadFileError, DatasetLayoutError, MissingFileError, WsclipError
from wsclip.runtime import precision

DEFAULT_SCALES = (1.0, 0.5, 1.5, 2.0)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def strided_size(hw, stride: int) -> tuple[int, int]:
    """ceil(H/stride), ceil(W/stride)."""
    return (hw[0] + stride - 1) // stride, (hw[1] + stride - 1) // stride


def strided_up_size(hw, stride: int) -> tuple[int, int]:
    """H and W rounded up to a multiple of stride."""
    h, w = strided_size(hw, stride)
    return h * stride, w * stride


def multiscale_inputs(image: np.ndarray, scales: Sequence[float] = DEFAULT_SCALES) -> list[torch.Tensor]:
    """For each scale, a (2, 3, h, w) ImageNet-normalised batch: the rescaled image and its flip."""
    from wsclip.data.transforms import resize_image

    if image.ndim != 3 or image.shape[2] != 3:
        raise BadFileError(f"expected an RGB (H, W, 3) image, got shape {image.shape}")
    h, w = image.shape[:2]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = []
    for s in scales:
        size = (max(1, int(round(h * s))), max(1, int(round(w * s))))
        im = resize_image(np.ascontiguousarray(image), size)  # bicubic (PIL for uint8)
        x = torch.tensor(np.asarray(im)).permute(2, 0, 1).float()
        if image.dtype == np.uint8:
            x = x / 255.0
        x = (x - mean) / std
        out.append(torch.stack([x, x.flip(-1)]))
    return out


@torch.no_grad()
def multiscale_cam(net, inputs: Sequence[torch.Tensor], hw, keys: torch.Tensor, amp: bool = False):
    """(stride-4 CAM (K', ceil(H/4), ceil(W/4)), full CAM (K', H, W)) float32, max-normalised, for `keys`."""
    device = next(net.parameters()).device
    keys = keys.to(device)
    h4 = strided_size(hw, 4)
    up = strided_up_size(hw, getattr(net, "stride", 16))  # the maps' own grid, cropped to the image
    low = torch.zeros(len(keys), *h4, device=device)
    high = torch.zeros(len(keys), *hw, device=device)
    if len(keys) == 0:
        return low, high
    for x in inputs:
        with precision(device, amp):
            raw = net(x.to(device, non_blocking=True))
        cam = F.relu(raw.float()[:, keys])  # (2, K', h, w)
        cam = (cam[0] + cam[1].flip(-1))[None]
        low += F.interpolate(cam, h4, mode="bilinear", align_corners=False)[0]
        high += F.interpolate(cam, up, mode="bilinear", align_corners=False)[0, :, : hw[0], : hw[1]]
    low /= low.amax(dim=(1, 2), keepdim=True) + 1e-5
    high /= high.amax(dim=(1, 2), keepdim=True) + 1e-5
    return low, high


def write_cam_file(path, keys, cam, high_res) -> None:
    """One compressed .npz (keys, cam, high_res as float16), written atomically."""
    from wsclip.io import atomic_path

    def arr(x):
        return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, keys=arr(keys).astype(np.int64), cam=arr(cam).astype(np.float16),
                                high_res=arr(high_res).astype(np.float16))


def read_cam_file(path) -> dict:
    """Load a CAM .npz as {"keys", "cam", "high_res"}; a corrupt file is a BadFileError naming it."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"CAM file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - zip/format errors of every kind
        raise BadFileError(f"cannot read CAM file {path}: {exc}; delete it and re-run `wsclip cam`") from exc
    if "keys" not in out or "high_res" not in out:
        raise BadFileError(f"{path} lacks 'keys'/'high_res': not a wsclip CAM file")
    return out


class _Prepared(torch.utils.data.Dataset):
    """Runs in DataLoader workers: decode + multi-scale resize + normalise."""

    def __init__(self, dataset, indices, scales):
        self.dataset, self.indices, self.scales = dataset, list(indices), tuple(scales)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, n):
        i = self.indices[n]
        try:
            item = self.dataset[i]
        except WsclipError as exc:  # a bad image is skipped into errors.json; the run goes on
            return {"id": self.dataset.ids[i], "error": str(exc)}
        image = np.asarray(item["image"])
        keys = torch.nonzero(torch.as_tensor(item["labels"]) > 0.5).flatten()
        return {"id": item["id"], "hw": image.shape[:2], "keys": keys, "inputs": multiscale_inputs(image, self.scales)}


def _identity(x):
    return x


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
) -> dict:
    """Write `<out_dir>/<id>.npz` CAMs for every image of `data` (a spec or a dataset); resumes.

    checkpoint: a CAM network checkpoint path or a CAMNet. Images whose file exists are
    skipped. Returns {"written", "skipped", "total"}.
    """
    from wsclip.io import write_errors
    from wsclip.models.camnet import load_camnet
    from wsclip.progress import progress
    from wsclip.train.loop import resolve_device

    dev = resolve_device(device)
    if isinstance(checkpoint, torch.nn.Module):
        net = checkpoint.to(dev).eval()
        classes = None
    else:
        net, meta = load_camnet(checkpoint, device=dev)
        classes = meta.get("classes")
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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    todo = [i for i, image_id in enumerate(ds.ids) if not (out / f"{image_id}.npz").is_file()]
    skipped = len(ds) - len(todo)
    loader = torch.utils.data.DataLoader(
        _Prepared(ds, todo, scales), batch_size=None, shuffle=False, num_workers=num_workers,
        collate_fn=_identity, pin_memory=dev.type == "cuda",
    )
    written, failed = 0, []
    for item in progress(loader, total=len(todo), desc="cam", unit="img"):
        if "error" in item:
            failed.append((item["id"], item["error"]))
            continue
        low, high = multiscale_cam(net, item["inputs"], tuple(item["hw"]), item["keys"], amp=amp)
        write_cam_file(out / f"{item['id']}.npz", item["keys"], low, high)
        written += 1
        if on_image is not None:
            on_image(item["id"])
    write_errors(out, failed)
    return {"written": written, "skipped": skipped, "failed": failed, "total": len(ds)}


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
        if len(keys):
            best = cams.max(axis=0)
            label = (keys + 1)[cams.argmax(axis=0)]
        else:
            best = np.full(gt.shape, -np.inf, dtype=np.float32)
            label = np.zeros(gt.shape, dtype=np.int64)
        for t, cm in cms.items():
            cm.update(np.where(best > t, label, 0), gt)  # ties go to background, like argmax over [t, cams]
    return cms
