"""Deployable labelers: one module from raw images to CAMs and a label mask.

`CamLabeler` is what `wsclip export onnx --model camnet` traces and what the PyTorch backend
of the batch labeler and the server runs. Every backend (PyTorch here, ONNX Runtime in
`wsclip.export.ort`, TensorRT in `wsclip.export.tensorrt`) has the same interface:

    labeler.run(images, labels=None) -> {"cams": float32 (B, K, H, W), "mask": int64 (B, H, W)}

`images` are (B, 3, H, W) uint8 or float in [0, 1] (numpy or torch); `labels` an optional
(B, K) 0/1 class selection (None = all classes). Outputs are numpy arrays. The mask holds
0 for background and k + 1 for class k (VOC convention): argmax over
[bg_threshold, cams]. `SegLabeler` (wsclip.label.seg_labeler) returns {"probs", "mask"}.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from wsclip.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from wsclip.errors import ShapeError, WsclipError

CAM_BG_THRESHOLD = 0.15  # METHODS.md section 3: CAM evaluation background threshold


@runtime_checkable
class Labeler(Protocol):
    """What the batch labeler and the server need from any backend."""

    classes: tuple[str, ...]
    output_names: tuple[str, ...]

    def run(self, images, labels=None) -> dict[str, np.ndarray]: ...


def as_image_batch(images) -> torch.Tensor:
    """(B, 3, H, W) tensor from a numpy array or tensor ((3, H, W) gets a batch axis); dtype kept."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[1] != 3:
        raise ShapeError(f"images must be (B, 3, H, W) uint8 or float in [0, 1], got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise ShapeError(f"images must be uint8 or float in [0, 1], got {x.dtype}")
    return x


def as_label_batch(labels, batch: int, num_classes: int, device=None) -> torch.Tensor:
    """(B, K) float32 class selection; None selects every class."""
    if labels is None:
        return torch.ones(batch, num_classes, device=device)
    y = labels if isinstance(labels, torch.Tensor) else torch.from_numpy(np.asarray(labels))
    if y.dim() == 1:
        y = y[None]
    if tuple(y.shape) != (batch, num_classes):
        raise ShapeError(f"labels must be (B, K) = ({batch}, {num_classes}), got {tuple(y.shape)}")
    return y.to(device=device, dtype=torch.float32)


class NormalizeImages(nn.Module):
    """uint8 or [0, 1] float (B, 3, H, W) -> normalised float32: (x / 255 - mean) / std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([float(s) for s in std]).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return (x - self.mean) / self.std


class TorchLabelerMixin:
    """`run()` for labeler modules: numpy/torch in, numpy dict out, no gradients."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    classes: tuple[str, ...]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def run(self, images, labels=None) -> dict[str, np.ndarray]:
        x = as_image_batch(images).to(self.device)
        args = [x]
        if "labels" in self.input_names:
            args.append(as_label_batch(labels, x.shape[0], len(self.classes), self.device))
        elif labels is not None:
            raise WsclipError(f"{type(self).__name__} has no class-selection input; pass labels=None")
        with torch.inference_mode():
            outs = self(*args)
        return {k: v.cpu().numpy() for k, v in zip(self.output_names, outs)}


class CamLabeler(TorchLabelerMixin, nn.Module):
    """Normalisation + CAM network (relu CAMs) + bilinear upsampling + class selection + max normalisation.

    forward(images (B,3,H,W) uint8|float, labels (B,K) float) -> (cams (B,K,H,W) float32, mask (B,H,W) int64).
    `scales` > (1.0,) or `flip` run the network on resized / mirrored copies and sum the
    upsampled relu CAMs before normalising (METHODS.md section 2); the default is one scale.
    """

    input_names = ("images", "labels")
    output_names = ("cams", "mask")

    def __init__(self, camnet: nn.Module, classes: Sequence[str], *, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 bg_threshold: float = CAM_BG_THRESHOLD, scales: Sequence[float] = (1.0,), flip: bool = False,
                 eps: float = 1e-5):
        super().__init__()
        k = getattr(camnet, "num_classes", len(classes))
        if len(classes) != k:
            raise ShapeError(f"{len(classes)} class names for a CAM network with {k} classes")
        self.camnet = camnet.eval()
        self.classes = tuple(classes)
        self.normalize = NormalizeImages(mean, std)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.bg_threshold = float(bg_threshold)
        self.scales = tuple(float(s) for s in scales)
        self.flip = bool(flip)
        self.eps = float(eps)

    def _cams_at(self, x: torch.Tensor, size) -> torch.Tensor:
        raw = self.camnet(x).float()  # under bf16 autocast the head and everything after it stay float32
        return F.interpolate(F.relu(raw), size=size, mode="bilinear", align_corners=False)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        size = images.shape[-2:]
        x = self.normalize(images)
        total = None
        for s in self.scales:
            xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
            views = [xs, torch.flip(xs, dims=[3])] if self.flip else [xs]
            for v, flipped in zip(views, (False, True)):
                c = self._cams_at(v, size)
                c = torch.flip(c, dims=[3]) if flipped else c
                total = c if total is None else total + c
        cams = total
        if labels is not None:
            cams = cams * labels.to(cams.dtype)[:, :, None, None]
        cams = cams / (cams.amax(dim=(2, 3), keepdim=True) + self.eps)
        # argmax over [bg_threshold, cams] without stacking them: ties go to the background
        top, idx = cams.max(dim=1)
        mask = torch.where(top > self.bg_threshold, idx + 1, torch.zeros_like(idx))
        return cams, mask

    def config(self) -> dict:
        """Settings a sidecar records so the same labeler can be rebuilt."""
        return {"classes": list(self.classes), "mean": list(self.mean), "std": list(self.std),
                "bg_threshold": self.bg_threshold, "scales": list(self.scales), "flip": self.flip, "eps": self.eps}


def load_cam_labeler(checkpoint, device="cpu", **options) -> CamLabeler:
    """A CamLabeler around a CAM network checkpoint (`wsclip.models.camnet.load_camnet`)."""
    from wsclip.models.camnet import load_camnet

    net, meta = load_camnet(checkpoint, device=device)
    return CamLabeler(net, meta["classes"], **options).to(device).eval()
