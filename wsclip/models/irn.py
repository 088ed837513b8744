"""IRNet's class-boundary network (METHODS.md section 6): a frozen ResNet and a trained edge branch.

The backbone is the CAM network's (wsclip.models.camnet: resnet50, resnet18, tiny or tiny-s8,
strides (2, 2, 2, 1) or (2, 2, 1, 1)); it is frozen, BatchNorm statistics included. The edge
branch reads the five stages (stem at stride 4, layer1 at 4, layer2 at 8, layer3 and layer4
at 16, or at 8 for tiny-s8): each goes
through a 1x1 conv to 32 channels, GroupNorm(4), an upsampling to stride 4 and a ReLU; the
concatenation (160 channels) goes through a 1x1 conv with bias to one boundary logit.
`forward` returns logits of shape (B, 1, ceil(H/4), ceil(W/4)); `boundary` their sigmoid.
(IRNet's displacement-field branch, used only for instance masks, is not included.)
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from wsclip.errors import CheckpointError
from wsclip.constants import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 - re-exported

KIND = "irn"
BRANCH_WIDTH = 32


def _stage_channels(backbone: nn.Module) -> list[int]:
    """Output channels of stem, layer1..layer4 (the last BatchNorm of each)."""
    def last_bn(m: nn.Module) -> int:
        bns = [x for x in m.modules() if isinstance(x, nn.BatchNorm2d)]
        return bns[-1].num_features

    return [backbone.bn1.num_features] + [last_bn(getattr(backbone, f"layer{i}")) for i in range(1, 5)]


class _Branch(nn.Sequential):
    def __init__(self, cin: int, width: int, scale: int):
        layers: list[nn.Module] = [nn.Conv2d(cin, width, 1, bias=False), nn.GroupNorm(4, width)]
        if scale > 1:
            layers.append(nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=False))
        layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class IRNEdgeNet(nn.Module):
    """Boundary network: frozen ResNet backbone + IRNet edge branch (trainable)."""

    def __init__(self, backbone: str = "resnet50", pretrained=None, width: int = BRANCH_WIDTH):
        super().__init__()
        from wsclip.models.camnet import backbone_strides, build_camnet

        self.backbone_name = backbone
        self.backbone = build_camnet(backbone, 1, pretrained).backbone
        self.backbone.requires_grad_(False)
        chans = _stage_channels(self.backbone)
        scales = [s // 4 for s in backbone_strides(backbone)]
        self.edge_branches = nn.ModuleList(_Branch(c, width, s) for c, s in zip(chans, scales))
        self.edge_out = nn.Conv2d(width * len(chans), 1, 1, bias=True)
        self.train()

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm statistics fixed
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("backbone.") and p.requires_grad]

    def load_backbone(self, state: dict) -> None:
        """Copy backbone weights (e.g. the `backbone.*` tensors of a CAM checkpoint)."""
        sub = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")} or state
        missing, unexpected = self.backbone.load_state_dict(sub, strict=False)
        if missing:
            raise CheckpointError(
                f"backbone weights do not fit a {self.backbone_name} backbone: {len(missing)} missing keys "
                f"(e.g. {missing[:3]}); use a CAM checkpoint with the same --backbone"
            )

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Detached features of stem, layer1..layer4."""
        b = self.backbone
        with torch.no_grad():
            s1 = b.maxpool(b.relu(b.bn1(b.conv1(x))))
            s2 = b.layer1(s1)
            s3 = b.layer2(s2)
            s4 = b.layer3(s3)
            s5 = b.layer4(s4)
        return [s.detach() for s in (s1, s2, s3, s4, s5)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Boundary logits (B, 1, ceil(H/4), ceil(W/4))."""
        feats = self.stages(x)
        h, w = feats[0].shape[-2:]
        maps = [branch(f)[..., :h, :w] for branch, f in zip(self.edge_branches, feats)]
        return self.edge_out(torch.cat(maps, dim=1))

    def boundary(self, x: torch.Tensor) -> torch.Tensor:
        """Boundary probabilities (B, ceil(H/4), ceil(W/4)) in [0, 1]."""
        return torch.sigmoid(self(x))[:, 0]


def build_irn(backbone: str = "resnet50", pretrained=None) -> IRNEdgeNet:
    """A boundary network; `pretrained` is a local torchvision ImageNet state dict for the backbone."""
    return IRNEdgeNet(backbone, pretrained)


def irn_meta(net: IRNEdgeNet, radius: int, extra: dict | None = None) -> dict:
    return {"kind": KIND, "backbone": net.backbone_name, "stride": 4, "radius": int(radius), **(extra or {})}


def save_irn(path, net: IRNEdgeNet, radius: int = 10, extra: dict | None = None) -> None:
    """Save a boundary network (whole state, backbone included) as safetensors + sidecar (kind 'irn')."""
    from wsclip.io import save_checkpoint

    net = getattr(net, "module", net)
    save_checkpoint(path, net.state_dict(), irn_meta(net, radius, extra))


def load_irn(path, device="cpu") -> tuple[IRNEdgeNet, dict]:
    """Load a boundary network saved by save_irn (or a `wsclip train irn` trainer checkpoint); eval mode."""
    from wsclip.io import load_checkpoint, load_weights

    tensors, meta = load_checkpoint(path, KIND, "pass the file written by `wsclip train irn`")
    net = IRNEdgeNet(meta.get("backbone", "resnet50"))
    load_weights(net, tensors, path, f"a {meta.get('backbone')} boundary network (as its sidecar says)")
    return net.to(device).eval(), meta


def _as_normalised_batch(image, device) -> torch.Tensor:
    import numpy as np

    from wsclip.errors import ShapeError

    x = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image))
    if x.dim() == 3 and x.shape[0] != 3 and x.shape[-1] == 3:
        x = x.permute(2, 0, 1)
    if x.dim() != 3 or x.shape[0] != 3:
        raise ShapeError(f"image must be (H, W, 3) or (3, H, W), got {tuple(x.shape)}")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x - mean) / std)[None].to(device)


def predict_boundary(image, model, flip: bool = True, device=None) -> torch.Tensor:
    """Class-boundary map B (ceil(H/4), ceil(W/4)) float32 in [0, 1] on the CPU.

    image: uint8 or [0, 1] float, (H, W, 3) or (3, H, W); model: an IRNEdgeNet or the path of
    its checkpoint. With `flip`, logits of the image and its mirror are averaged (IRNet).
    """
    from pathlib import Path

    if isinstance(model, (str, Path)):
        model, _ = load_irn(model, device or "cpu")
    model = getattr(model, "module", model)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        x = _as_normalised_batch(image, device)
        with torch.no_grad():
            logits = model(x)[0, 0]
            if flip:
                logits = (logits + model(x.flip(-1))[0, 0].flip(-1)) / 2
    finally:
        model.train(was_training)
    return torch.sigmoid(logits.float()).cpu()


__all__: Sequence[str] = ("IRNEdgeNet", "build_irn", "irn_meta", "load_irn", "predict_boundary", "save_irn", "KIND")
