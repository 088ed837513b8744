"""CAM network (METHODS.md section 2): ResNet at output stride 16 with a bias-free 1x1 head.

Backbones: "resnet50" (default; ImageNet weights from a local torchvision state dict),
"resnet18", and "tiny" (a 4-stage BasicBlock ResNet, widths 16-128) for CPU tests. All have
strides (2, 2, 2, 1): conv1 2, maxpool 2, layer2 2, layer3 2, layer4 1 (no dilation), so a
512 crop gives a 32x32 map. "tiny-s8" is a tiny one at output stride 8 (strides
(2, 2, 1, 1): layer3 keeps stride 1; widths 16-64), the synthetic world's backbone: a 128 px image
gives a 16x16 map. `CAMNet.stride` and `backbone_strides` tell the strides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from wsclip.errors import CheckpointError, MissingFileError, WsclipError

KIND = "camnet"
BACKBONES = ("resnet50", "resnet18", "tiny", "tiny-s8")
TINY_WIDTHS = (16, 32, 64, 128)
TINY_S8_WIDTHS = (16, 32, 64, 64)
#: output stride of each backbone (the stem's conv1 + maxpool give 4)
OUTPUT_STRIDE = {"resnet50": 16, "resnet18": 16, "tiny": 16, "tiny-s8": 8}


class TinyResNet(nn.Module):
    """ResNet with one BasicBlock per stage and small widths (torchvision blocks)."""

    def __init__(self, widths: Sequence[int] = TINY_WIDTHS, strides: Sequence[int] = (1, 2, 2, 1)):
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        w0 = widths[0]
        self.conv1 = nn.Conv2d(3, w0, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w0)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = w0
        for i, (w, stride) in enumerate(zip(widths, strides)):
            down = None
            if stride != 1 or cin != w:
                down = nn.Sequential(nn.Conv2d(cin, w, 1, stride, bias=False), nn.BatchNorm2d(w))
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, w, stride, down)))
            cin = w
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.out_channels = cin


def backbone_strides(name: str) -> tuple[int, int, int, int, int]:
    """Stride of the stem and of layer1..layer4 outputs relative to the input, e.g. (4, 4, 8, 16, 16)."""
    if name not in OUTPUT_STRIDE:
        raise WsclipError(f"unknown CAM backbone '{name}': use one of {', '.join(BACKBONES)}")
    return (4, 4, 8, OUTPUT_STRIDE[name], OUTPUT_STRIDE[name])


def build_backbone(name: str) -> nn.Module:
    """The ResNet trunk of a CAM network (no classifier), strides as `backbone_strides(name)`."""
    if name == "tiny":
        return TinyResNet()
    if name == "tiny-s8":  # stride 8 with layer4 at 64 channels: about the cost of "tiny" on 2x the pixels
        return TinyResNet(TINY_S8_WIDTHS, strides=(1, 2, 1, 1))
    net = torchvision_resnet(name)
    _set_last_stride_1(net)
    return net


def torchvision_resnet(name: str) -> nn.Module:
    """A torchvision ResNet without its classifier (fc, avgpool); `out_channels` set."""
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    net.out_channels = net.fc.in_features
    del net.fc, net.avgpool
    return net


def _set_last_stride_1(net: nn.Module) -> None:
    """Make layer4 stride 1 without dilation (CLIMS/IRN strides (2, 2, 2, 1))."""
    block = net.layer4[0]
    for conv in (getattr(block, "conv1", None), getattr(block, "conv2", None)):
        if conv is not None and conv.stride != (1, 1):
            conv.stride = (1, 1)
    if block.downsample is not None:
        block.downsample[0].stride = (1, 1)


def load_imagenet_weights(backbone: nn.Module, path) -> None:
    """Load a torchvision ImageNet state dict (fc dropped) into `backbone`; any mismatch is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"ImageNet weights not found: {path} (pass a torchvision ResNet state dict)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a bad file for the user
        raise CheckpointError(f"{path} is not a readable state dict: {exc}") from exc
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    sd = {k.removeprefix("module."): v for k, v in sd.items() if not k.removeprefix("module.").startswith("fc.")}
    try:
        missing, unexpected = backbone.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(
            f"{path} does not fit the backbone ({str(exc).splitlines()[-1].strip()}); "
            "pass torchvision's weights for this ResNet"
        ) from exc
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit the backbone: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); pass torchvision's weights for this ResNet"
        )


class CAMNet(nn.Module):
    """ResNet backbone (output stride `self.stride`: 16, 8 for "tiny-s8") + bias-free 1x1 classifier.

    forward(x) returns the raw (B, K, H/stride, W/stride) 1x1-conv maps (no activation).
    """

    def __init__(self, backbone: str = "resnet50", num_classes: int = 20):
        super().__init__()
        if backbone not in BACKBONES:
            raise WsclipError(f"unknown CAM backbone '{backbone}': use one of {', '.join(BACKBONES)}")
        self.backbone_name = backbone
        self.num_classes = int(num_classes)
        self.stride = OUTPUT_STRIDE[backbone]
        self.backbone = build_backbone(backbone)
        self.classifier = nn.Conv2d(self.backbone.out_channels, self.num_classes, 1, bias=False)
        nn.init.xavier_uniform_(self.classifier.weight)
        self._bn_frozen = False
        self._bn1_train = False
        for p in (*self.backbone.conv1.parameters(), *self.backbone.bn1.parameters()):
            p.requires_grad_(False)
        self.train()

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True):
        super().train(mode)
        if not self._bn1_train:
            self.backbone.bn1.eval()  # conv1/bn1 are frozen, statistics included
        if self._bn_frozen:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def set_bn1(self, mode: str) -> "CAMNet":
        """bn1 (frozen weights) in training: "eval" keeps its running statistics (wsclip), "train" normalises
        with batch statistics like the public CLIMS code, which freezes conv1/bn1 by requires_grad only."""
        if mode not in ("eval", "train"):
            raise WsclipError(f"bn1 mode must be 'eval' or 'train', got {mode!r}")
        self._bn1_train = mode == "train"
        return self.train(self.training)

    def freeze_bn(self) -> "CAMNet":
        """Keep every BatchNorm in eval mode (running statistics fixed) from now on."""
        self._bn_frozen = True
        return self.train(self.training)

    # ------------------------------------------------------------------ forward
    def features(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        return b.layer4(b.layer3(b.layer2(b.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def cam(self, x: torch.Tensor, mode: str = "relu") -> torch.Tensor:
        """CAMs (B, K, h, w): relu (inference) or sigmoid (CLIMS training) of the raw maps."""
        raw = self(x)
        if mode == "relu":
            return F.relu(raw)
        if mode == "sigmoid":
            return torch.sigmoid(raw)
        raise WsclipError(f"unknown CAM mode '{mode}': use 'relu' or 'sigmoid'")

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Multilabel logits (B, K): global average pooling of the raw maps."""
        return self(x).mean(dim=(2, 3))

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(trainable backbone parameters, head parameters); the head trains at 10x lr."""
        back = [p for p in self.backbone.parameters() if p.requires_grad]
        head = [p for p in self.classifier.parameters() if p.requires_grad]
        return back, head


def build_camnet(backbone: str = "resnet50", num_classes: int = 20, pretrained=None) -> CAMNet:
    """A CAM network; `pretrained` is a local torchvision ImageNet state dict for the backbone."""
    net = CAMNet(backbone, num_classes)
    if pretrained:
        load_imagenet_weights(net.backbone, pretrained)
    return net


def _unwrap(net: nn.Module) -> nn.Module:
    return getattr(net, "module", net)


def save_camnet(path, net: CAMNet, classes: Sequence[str], preset: str | None = None, extra: dict | None = None) -> None:
    """Save a CAM network as safetensors + JSON sidecar (kind 'camnet', architecture, classes)."""
    from wsclip.io import save_checkpoint

    net = _unwrap(net)
    if len(classes) != net.num_classes:
        raise WsclipError(f"{len(classes)} class names for a network with {net.num_classes} classes")
    meta = {
        "kind": KIND,
        "backbone": net.backbone_name,
        "num_classes": net.num_classes,
        "classes": list(classes),
        "preset": preset,
        **(extra or {}),
    }
    save_checkpoint(path, net.state_dict(), meta)


def load_camnet(path, device="cpu") -> tuple[CAMNet, dict]:
    """Load a CAM network saved by save_camnet; returns (net in eval mode, meta)."""
    from wsclip.io import describe_file, load_checkpoint, load_weights

    tensors, meta = load_checkpoint(path, expect_kind=None)
    if meta.get("kind") != KIND:
        raise CheckpointError(
            f"{path} is {describe_file(path)}, not a CAM network; pass the camnet.safetensors "
            "written by `wsclip train cam` or `wsclip train clims`"
        )
    backbone, k = meta.get("backbone"), meta.get("num_classes")
    if backbone not in BACKBONES or not isinstance(k, int):
        raise CheckpointError(f"{path}: sidecar names backbone {backbone!r} with {k!r} classes; expected one of {BACKBONES}")
    net = CAMNet(backbone, k)
    load_weights(net, tensors, path, f"a {backbone} CAM network with {k} classes (as its sidecar says)")
    return net.to(device).eval(), meta
