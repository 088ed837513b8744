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

from wsclip.constants import CAM_BG_THRESHOLD, CAM_NET_STRIDE, CAM_STRIDE, IMAGENET_MEAN, IMAGENET_STD
from wsclip.errors import ShapeError, WsclipError
from wsclip.label.masks import background_argmax


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


def strided_size(hw, stride: int) -> tuple[int, int]:
    """ceil(H/stride), ceil(W/stride)."""
    return (int(hw[0]) + stride - 1) // stride, (int(hw[1]) + stride - 1) // stride


def strided_up_size(hw, stride: int) -> tuple[int, int]:
    """(H, W) rounded up to multiples of `stride`: the padded grid a stride-`stride` map covers."""
    return tuple(int(-(-int(s) // stride) * stride) for s in hw)


def pil_rescale(images: torch.Tensor, scale: float) -> torch.Tensor:
    """uint8 images (B, 3, H, W) resized by `scale` with PIL bicubic, as the public IRN/CLIMS code does
    (`pil_rescale(img, s, order=3)`: size round(H*s) x round(W*s); scale 1.0 leaves them as they are)."""
    from PIL import Image

    if scale == 1.0:
        return images
    if images.dtype != torch.uint8:
        raise ShapeError("preprocess='pil' (--compat official) resizes uint8 images; got " + str(images.dtype))
    h, w = (max(1, int(round(int(s) * scale))) for s in images.shape[-2:])
    out = [np.asarray(Image.fromarray(im).resize((w, h), Image.BICUBIC))
           for im in images.permute(0, 2, 3, 1).cpu().numpy()]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(images.device)


def multiscale_cams(camnet: nn.Module, images: torch.Tensor, normalize, scales: Sequence[float], flip: bool, sizes,
                    preprocess: str = "tensor") -> list[torch.Tensor]:
    """The one CAM inference rule (METHODS.md section 2), batched: relu CAMs of images (B, 3, H, W) at every
    scale and, with `flip`, of the mirrored input, each upsampled bilinearly to every size in `sizes` and
    summed. Returns one (B, K, h, w) per size, not normalised.

    preprocess "tensor" (wsclip): the normalised batch is resized bilinearly on its device and the maps
    are upsampled straight to each size (traceable: what the exported graph runs). "pil" (--compat
    official, the public IRN/CLIMS `make_cam`): uint8 images resized with PIL bicubic, then normalised;
    a map reaches the full image size through its padded stride grid, cropped to the image.
    """
    if preprocess not in ("tensor", "pil"):
        raise WsclipError(f"unknown CAM preprocess {preprocess!r}: use tensor (wsclip) or pil (official)")
    hw = tuple(images.shape[-2:])
    stride = int(getattr(camnet, "stride", CAM_NET_STRIDE))
    x = normalize(images) if preprocess == "tensor" else None
    totals: list = [None] * len(sizes)
    for s in scales:
        if preprocess == "pil":
            xs = normalize(pil_rescale(images, s))
        else:
            xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        raw = F.relu(camnet(xs).float())  # under bf16 autocast the head and everything after it stay float32
        if flip:
            raw = raw + torch.flip(F.relu(camnet(torch.flip(xs, dims=[3])).float()), dims=[3])
        for n, size in enumerate(sizes):
            size = tuple(size)
            if preprocess == "pil" and size == hw:
                up = strided_up_size(hw, stride)
                c = F.interpolate(raw, size=up, mode="bilinear", align_corners=False)[..., : hw[0], : hw[1]]
            else:
                c = F.interpolate(raw, size=size, mode="bilinear", align_corners=False)
            totals[n] = c if totals[n] is None else totals[n] + c
    return totals


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
                 eps: float = 1e-5, preprocess: str = "tensor"):
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
        self.preprocess = preprocess

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        cams = self.cams(images, labels)[0]
        return cams, background_argmax(cams, self.bg_threshold)

    def cams(self, images: torch.Tensor, labels: torch.Tensor | None = None, low: bool = False) -> list[torch.Tensor]:
        """[full-size CAMs (B, K, H, W)] (+ stride-4 CAMs (B, K, ceil(H/4), ceil(W/4)) with low=True), max-normalised."""
        hw = tuple(images.shape[-2:])
        sizes = [hw, strided_size(hw, CAM_STRIDE)] if low else [hw]
        out = multiscale_cams(self.camnet, images, self.normalize, self.scales, self.flip, sizes, self.preprocess)
        if labels is not None:
            out = [c * labels.to(c.dtype)[:, :, None, None] for c in out]
        return [c / (c.amax(dim=(2, 3), keepdim=True) + self.eps) for c in out]

    def config(self) -> dict:
        """Settings a sidecar records so the same labeler can be rebuilt."""
        return {"classes": list(self.classes), "mean": list(self.mean), "std": list(self.std),
                "bg_threshold": self.bg_threshold, "scales": list(self.scales), "flip": self.flip, "eps": self.eps,
                "preprocess": self.preprocess}


def load_cam_labeler(checkpoint, device="cpu", **options) -> CamLabeler:
    """A CamLabeler around a CAM network checkpoint (`wsclip.models.camnet.load_camnet`)."""
    from wsclip.models.camnet import load_camnet

    net, meta = load_camnet(checkpoint, device=device)
    return CamLabeler(net, meta["classes"], **options).to(device).eval()
