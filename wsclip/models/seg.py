"""Segmentation network (METHODS.md section 7): DeepLab on a dilated ResNet.

Architectures:
- "deeplabv2" (the papers'): ResNet at output stride 8 (layer3 dilation 2, layer4 dilation 4,
  no striding) and ASPP as the SUM of four 3x3 dilated convolutions with bias (rates
  6/12/18/24), each giving class logits directly.
- "deeplabv3plus": ResNet at output stride 16 (layer4 dilation 2), ASPP with a 1x1 branch,
  three 3x3 dilated branches (6/12/18) and image pooling (torchvision's ASPP), then a
  decoder fusing the stride-4 features of layer1; logits at stride 4.

Backbones come from `wsclip.models.camnet` (torchvision ResNet-101/50/18, or the tiny
BasicBlock ResNet for CPU tests and the synthetic world); `pretrained` is a local
torchvision ImageNet state dict. `num_classes` counts the output channels, background
included (VOC: 21); `classes` in checkpoints are the foreground names.

forward(x) returns raw logits at the network's output stride; `predict()` returns class
probabilities at the input size, averaged over scales and flips. Both are ONNX-friendly:
no data-dependent Python control flow, interpolation sizes taken from tensor shapes.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from wsclip.errors import CheckpointError, WsclipError
from wsclip.constants import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 - re-exported

KIND = "seg"
ARCHS = ("deeplabv2", "deeplabv3plus")
BACKBONES = ("resnet101", "resnet50", "resnet18", "tiny")
DEFAULT_RATES = {"deeplabv2": (6, 12, 18, 24), "deeplabv3plus": (6, 12, 18)}
OUTPUT_STRIDES = {"deeplabv2": 8, "deeplabv3plus": 16}


# ============================================================================ backbone
def _dilate(layer: nn.Module, dilation: int) -> None:
    """Remove the striding of a ResNet stage and dilate its 3x3 convolutions (padding = dilation)."""
    for m in layer.modules():
        if isinstance(m, nn.Conv2d):
            m.stride = (1, 1)
            if m.kernel_size == (3, 3):
                m.dilation = (dilation, dilation)
                m.padding = (dilation, dilation)


def build_backbone(name: str, output_stride: int = 8, pretrained=None) -> nn.Module:
    """A ResNet from camnet's builders at output stride 8 or 16 (`.out_channels`, `.low_channels` set)."""
    from wsclip.models.camnet import TinyResNet, load_imagenet_weights, torchvision_resnet

    if name not in BACKBONES:
        raise WsclipError(f"unknown segmentation backbone '{name}': use one of {', '.join(BACKBONES)}")
    if output_stride not in (8, 16):
        raise WsclipError(f"output stride must be 8 or 16, got {output_stride}")
    net = TinyResNet() if name == "tiny" else torchvision_resnet(name)  # tiny: stride 16 before dilation
    net.low_channels = net.layer2[0].conv1.in_channels  # layer1's output width
    if pretrained:
        load_imagenet_weights(net, pretrained)
    if output_stride == 8:
        _dilate(net.layer3, 2)
        _dilate(net.layer4, 4)
    else:
        _dilate(net.layer4, 2)
    return net


def _backbone_features(b: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer1 features at stride 4, layer4 features at the output stride)."""
    low = b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x)))))
    return low, b.layer4(b.layer3(b.layer2(low)))


# ============================================================================ heads
class ASPPSum(nn.Module):
    """DeepLab-v2 head: sum of 3x3 dilated convolutions (with bias) straight to class logits."""

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int]):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r) for r in rates)
        for c in self.convs:
            nn.init.normal_(c.weight, std=0.01)
            nn.init.zeros_(c.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.convs[0](x)
        for conv in self.convs[1:]:
            out = out + conv(x)
        return out


def _conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DeepLabV3PlusHead(nn.Module):
    """ASPP (torchvision: 1x1, dilated 3x3s, image pooling) + decoder with stride-4 features."""

    def __init__(self, in_channels: int, low_channels: int, num_classes: int, rates: Sequence[int],
                 channels: int = 256):
        super().__init__()
        from torchvision.models.segmentation.deeplabv3 import ASPP

        low_out = max(8, channels * 3 // 16)  # 48 for 256 channels, as the paper
        self.aspp = ASPP(in_channels, list(rates), channels)
        self.reduce = _conv_bn_relu(low_channels, low_out, 1)
        self.fuse = nn.Sequential(_conv_bn_relu(channels + low_out, channels, 3), _conv_bn_relu(channels, channels, 3))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        x = self.aspp(high)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.fuse(torch.cat([x, self.reduce(low)], dim=1)))


# ============================================================================ network
class SegNet(nn.Module):
    """DeepLab (v2 or v3+) on a dilated ResNet; forward(x) -> logits (B, num_classes, h, w) at `output_stride`."""

    def __init__(self, arch: str = "deeplabv2", backbone: str = "resnet101", num_classes: int = 21,
                 rates: Sequence[int] | None = None, output_stride: int | None = None, pretrained=None,
                 head_channels: int | None = None):
        super().__init__()
        if arch not in ARCHS:
            raise WsclipError(f"unknown segmentation architecture '{arch}': use one of {', '.join(ARCHS)}")
        if int(num_classes) < 2:
            raise WsclipError(f"num_classes counts background too and must be at least 2, got {num_classes}")
        self.arch, self.backbone_name, self.num_classes = arch, backbone, int(num_classes)
        self.rates = tuple(int(r) for r in (rates or DEFAULT_RATES[arch]))
        if not self.rates or min(self.rates) < 1:
            raise WsclipError(f"ASPP rates must be positive integers, got {list(self.rates)}")
        self.output_stride = int(output_stride or OUTPUT_STRIDES[arch])
        self.backbone = build_backbone(backbone, self.output_stride, pretrained)
        self._bn_frozen = False
        cin = self.backbone.out_channels
        if arch == "deeplabv2":
            self.head = ASPPSum(cin, self.num_classes, self.rates)
            self.head_channels = None
        else:
            self.head_channels = int(head_channels or (64 if backbone == "tiny" else 256))
            self.head = DeepLabV3PlusHead(cin, self.backbone.low_channels, self.num_classes, self.rates,
                                          self.head_channels)

    @property
    def stride(self) -> int:
        """Input pixels per logit: the output stride (v2) or 4 (v3+ decoder)."""
        return self.output_stride if self.arch == "deeplabv2" else 4

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True):
        super().train(mode)
        if self._bn_frozen:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def freeze_bn(self) -> "SegNet":
        """Keep the backbone's BatchNorm layers fixed (statistics and affine), as DeepLab-v2 does."""
        self._bn_frozen = True
        for m in self.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for p in m.parameters():
                    p.requires_grad_(False)
        return self.train(self.training)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, high = _backbone_features(self.backbone, x)
        return self.head(high) if self.arch == "deeplabv2" else self.head(low, high)

    def predict(self, x: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = False) -> torch.Tensor:
        """Softmax probabilities (B, C, H, W) at the input size, averaged over `scales` and (optionally)
        horizontal flips; x is normalised (B, 3, H, W)."""
        size = x.shape[-2:]
        total, n = None, 0
        for s in scales:
            xs = x if float(s) == 1.0 else F.interpolate(x, scale_factor=float(s), mode="bilinear", align_corners=False)
            views = (xs, torch.flip(xs, dims=[3])) if flip else (xs,)
            for flipped, v in enumerate(views):
                logits = F.interpolate(self(v).float(), size=size, mode="bilinear", align_corners=False)
                p = torch.softmax(logits, dim=1)
                p = torch.flip(p, dims=[3]) if flipped else p
                total = p if total is None else total + p
                n += 1
        return total / n

    # ------------------------------------------------------------------ optimiser
    def param_groups(self, head_mult: float = 10.0, bias_mult: float = 20.0,
                     bias_decay: float | None = 0.0) -> list[dict]:
        """SGD groups (DeepLab-v2): backbone 1x; head weights `head_mult`x; head biases (and the head's
        BatchNorm parameters) `bias_mult`x with weight decay `bias_decay` (None keeps the optimiser's)."""
        back = [p for p in self.backbone.parameters() if p.requires_grad]
        weights = [p for p in self.head.parameters() if p.requires_grad and p.ndim > 1]
        biases = [p for p in self.head.parameters() if p.requires_grad and p.ndim <= 1]
        bias_group = {"params": biases, "lr_mult": float(bias_mult)}
        if bias_decay is not None:
            bias_group["weight_decay"] = float(bias_decay)
        return [{"params": back, "lr_mult": 1.0}, {"params": weights, "lr_mult": float(head_mult)}, bias_group]

    def meta(self, classes: Sequence[str]) -> dict:
        """Checkpoint sidecar fields (kind 'seg') that rebuild this network."""
        classes = list(classes)
        if len(classes) + 1 != self.num_classes:
            raise WsclipError(
                f"{len(classes)} foreground class names for a network with {self.num_classes} outputs "
                "(background + classes): pass the dataset's class list"
            )
        return {"kind": KIND, "arch": self.arch, "backbone": self.backbone_name, "num_classes": self.num_classes,
                "classes": classes, "rates": list(self.rates), "output_stride": self.output_stride,
                "head_channels": self.head_channels, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def build_seg_model(arch: str = "deeplabv2", backbone: str = "resnet101", num_classes: int = 21, pretrained=None,
                    **kw) -> SegNet:
    """A DeepLab network; `pretrained` is a local torchvision ImageNet state dict for the backbone.
    Extra keywords: rates, output_stride, head_channels."""
    return SegNet(arch, backbone, num_classes, pretrained=pretrained, **kw)


def save_seg_model(path, net: SegNet, classes: Sequence[str], extra: dict | None = None) -> None:
    """Save as safetensors + JSON sidecar (kind 'seg', arch, backbone, num_classes, classes, ...)."""
    from wsclip.io import save_checkpoint

    net = getattr(net, "module", net)
    save_checkpoint(path, net.state_dict(), {**net.meta(classes), **(extra or {})})


def model_from_meta(meta: dict, where="checkpoint") -> SegNet:
    """An untrained SegNet with the architecture a 'seg' sidecar describes."""
    arch, backbone, k = meta.get("arch"), meta.get("backbone"), meta.get("num_classes")
    if arch not in ARCHS or backbone not in BACKBONES or not isinstance(k, int):
        raise CheckpointError(
            f"{where}: sidecar names arch {arch!r}, backbone {backbone!r}, {k!r} classes; expected an arch in "
            f"{ARCHS} and a backbone in {BACKBONES}"
        )
    return SegNet(arch, backbone, k, rates=meta.get("rates"), output_stride=meta.get("output_stride"),
                  head_channels=meta.get("head_channels"))


def load_seg_model(path, device="cpu") -> tuple[SegNet, dict]:
    """Load a network saved by save_seg_model (or `wsclip train seg`); returns (net in eval mode, meta)."""
    from wsclip.io import load_checkpoint, load_weights

    tensors, meta = load_checkpoint(path, KIND, "pass the seg.safetensors written by `wsclip train seg`")
    net = model_from_meta(meta, str(path))
    load_weights(net, tensors, path, f"a {meta['arch']} {meta['backbone']} network with {meta['num_classes']} classes "
                 "(as its sidecar says)")
    return net.to(device).eval(), meta
