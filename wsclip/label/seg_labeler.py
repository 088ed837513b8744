"""`SegLabeler`: a segmentation network as a deployable labeler (what `wsclip export onnx --model seg` traces).

    labeler.run(images) -> {"probs": float32 (B, C, H, W), "mask": int64 (B, H, W)}

images (B, 3, H, W) uint8 or float in [0, 1] -> ImageNet normalisation -> DeepLab
(`wsclip.models.seg.SegNet.predict`: logits upsampled bilinearly to (H, W), softmax, averaged
over `scales` and flips) -> argmax. C counts the background (channel 0 = mask value 0).
Same interface as `wsclip.label.cam_labeler.CamLabeler`, without class selection.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from wsclip.label.cam_labeler import NormalizeImages, TorchLabelerMixin


class SegLabeler(TorchLabelerMixin, nn.Module):
    """Normalisation + segmentation network + upsampling + softmax + argmax, as one module."""

    input_names = ("images",)
    output_names = ("probs", "mask")

    def __init__(self, net: nn.Module, classes: Sequence[str], *, mean=None, std=None,
                 scales: Sequence[float] = (1.0,), flip: bool = False):
        super().__init__()
        from wsclip.models.seg import IMAGENET_MEAN, IMAGENET_STD

        self.net = net.eval()
        self.classes = tuple(classes)
        self.mean = tuple(float(m) for m in (mean or IMAGENET_MEAN))
        self.std = tuple(float(s) for s in (std or IMAGENET_STD))
        self.normalize = NormalizeImages(self.mean, self.std)
        self.scales = tuple(float(s) for s in scales)
        self.flip = bool(flip)

    def forward(self, images: torch.Tensor):
        probs = self.net.predict(self.normalize(images), self.scales, self.flip)
        return probs, probs.argmax(dim=1)

    def config(self) -> dict:
        """Settings a sidecar records so the same labeler can be rebuilt."""
        return {"classes": list(self.classes), "mean": list(self.mean), "std": list(self.std),
                "scales": list(self.scales), "flip": self.flip}


def load_seg_labeler(checkpoint, device="cpu", **options) -> SegLabeler:
    """A SegLabeler around a checkpoint of `wsclip train seg` (`wsclip.models.seg.load_seg_model`)."""
    from wsclip.models.seg import load_seg_model

    net, meta = load_seg_model(checkpoint, device=device)
    options.setdefault("mean", meta.get("mean"))
    options.setdefault("std", meta.get("std"))
    return SegLabeler(net, meta["classes"], **options).to(device).eval()
