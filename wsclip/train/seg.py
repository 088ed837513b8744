"""Segmentation-network training on pseudo masks (`wsclip train seg`, METHODS.md section 7).

DeepLab on the pseudo masks of a WSSS pipeline: random scale 0.5-2.0, flip, random 321
crop (image padded with the mean colour, mask with 255), SGD lr 2.5e-4 with the head at
10x and its biases at 20x (no weight decay on those), momentum 0.9, weight decay 5e-4,
poly 0.9, batch 10, 20k iterations. Cross-entropy ignores 255, which is how the
confidence-guided loss (CGL) of CLIP-ES acts: pixels its CRF was unsure of carry 255.
Logits are upsampled bilinearly to the crop before the loss. The shared Trainer does AMP,
DDP, checkpoints, exact resume and the JSON log; the final network is <out>/seg.safetensors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from wsclip.config import PRESETS, TrainConfig, _f, save_yaml
from wsclip.errors import BadFileError, DatasetLayoutError, MissingFileError, ShapeError, WsclipError

# torch and the data stack are imported inside functions: the CLI imports this module for its flags

FINAL_NAME = "seg.safetensors"
IGNORE = 255


# ============================================================================ config
@dataclass
class SegConfig(TrainConfig):
    """DeepLab training on pseudo masks (METHODS.md section 7)."""

    out: str = _f("runs/seg", "output folder; the final network is <out>/seg.safetensors")
    pseudo: str | None = _f(None, "folder of <id>.png pseudo masks (255 = ignored); default: the dataset's own masks")
    arch: str = _f("deeplabv2", "deeplabv2 (the papers': ASPP sum, stride 8) or deeplabv3plus")
    backbone: str = _f("resnet101", "resnet101, resnet50, resnet18 or tiny")
    rates: tuple[int, ...] | None = _f(None, "ASPP dilation rates (default 6 12 18 24 for v2, 6 12 18 for v3+)")
    output_stride: int | None = _f(None, "backbone output stride, 8 or 16 (default 8 for v2, 16 for v3+)")
    lr: float = _f(2.5e-4, "base learning rate (backbone); the head uses lr * head_lr_mult")
    head_lr_mult: float = _f(10.0, "learning-rate multiplier of the head's weights (ASPP)")
    bias_lr_mult: float = _f(20.0, "learning-rate multiplier of the head's biases (no weight decay on them)")
    weight_decay: float = _f(5e-4, "SGD weight decay")
    batch_size: int = _f(10, "global batch per optimizer step (all processes and accumulation steps together)")
    max_steps: int | None = _f(20000, "optimizer steps (20k-30k in the papers; overrides epochs)")
    crop: int = _f(321, "random crop size (image padded with the mean colour, mask with 255)")
    scale_range: tuple[float, float] = _f((0.5, 2.0), "random rescaling factor range (min max)")
    balanced_ce: bool = _f(False, "balanced cross-entropy: (mean over background + mean over foreground pixels) / 2")
    freeze_bn: bool | None = _f(None, "freeze the backbone's BatchNorm (default: frozen when --pretrained is given)")

    def validate(self) -> "SegConfig":
        super().validate()
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise WsclipError(f"scale_range must be two factors 0 < min <= max, got {self.scale_range}")
        return self


_SEG_VOC = dict(split="train_aug", arch="deeplabv2", backbone="resnet101", lr=2.5e-4, head_lr_mult=10.0,
                bias_lr_mult=20.0, momentum=0.9, weight_decay=5e-4, batch_size=10, max_steps=20000, crop=321,
                scale_range=(0.5, 2.0))
PRESETS[SegConfig] = {
    "voc-official": _SEG_VOC,
    "voc-resnet50": dict(_SEG_VOC, backbone="resnet50"),
    # the tiny synthetic world on a 2-core CPU (about 7 minutes), tuned on it, not a paper's setting: on 64 px
    # images v2's stride-8 logits are an 8x8 grid, v3+'s decoder (stride 4) does clearly better
    "synth": dict(split="train", arch="deeplabv3plus", backbone="tiny", rates=(1, 2, 3), lr=0.005, head_lr_mult=10.0,
                  bias_lr_mult=20.0, weight_decay=5e-4, batch_size=8, max_steps=2400, crop=64, scale_range=(0.75, 1.5),
                  num_workers=2, ckpt_every=200, log_every=10, freeze_bn=False),
}


# ============================================================================ data
class RandomScale:
    """Rescale image (bicubic) and mask (nearest) by a factor drawn uniformly from [min, max]
    (torch's global RNG, or `generator`: a torch.Generator or a seed)."""

    def __init__(self, min: float = 0.5, max: float = 2.0, generator=None):  # noqa: A002 - names of the spec
        from wsclip.data.transforms import RandomTransform

        if not 0 < min <= max:
            raise ValueError(f"need 0 < min <= max, got {min}, {max}")
        self.lo, self.hi = float(min), float(max)
        self._rng = RandomTransform(generator)

    def __call__(self, sample: dict) -> dict:
        from wsclip.data.transforms import image_size, resize_image, resize_mask

        s = self.lo + (self.hi - self.lo) * self._rng.rand()
        h, w = image_size(sample["image"])
        size = (max(1, int(round(h * s))), max(1, int(round(w * s))))
        out = dict(sample)
        out["image"] = resize_image(sample["image"], size)
        if "mask" in sample:
            out["mask"] = resize_mask(sample["mask"], size)
        return out


def seg_train_transform(crop: int = 321, scale_range=(0.5, 2.0)) -> Compose:
    """Random scale, random flip, ImageNet normalisation, random crop (pad 0 / 255), CHW tensor."""
    from wsclip.data.transforms import Compose, Normalize, RandomCrop, RandomHFlip, ToTensor

    return Compose([
        RandomScale(*scale_range),
        RandomHFlip(0.5),
        Normalize(),
        RandomCrop(crop, fill=0.0, mask_fill=IGNORE),
        ToTensor(),
    ])


class PseudoMaskDataset:
    """Images of `base` paired by id with `<mask_dir>/<id>.png` (or base's own masks when mask_dir is None).

    Items: {"id", "image", "mask"} passed through `transform`. Labels above the class count
    (other than 255) are a clear error.
    """

    def __init__(self, base, mask_dir=None, transform=None):
        self.base, self.transform = base, transform
        self.classes, self.ids = tuple(base.classes), list(base.ids)
        self.mask_dir = Path(mask_dir) if mask_dir else None
        if self.mask_dir is not None:
            if not self.mask_dir.is_dir():
                raise MissingFileError(f"pseudo-mask folder not found: {self.mask_dir}")
            missing = [i for i in self.ids if not (self.mask_dir / f"{i}.png").is_file()]
            if missing:
                raise MissingFileError(
                    f"{len(missing)} of {len(self.ids)} images have no pseudo mask in {self.mask_dir}, e.g. "
                    f"'{missing[0]}.png': make masks for the whole split (`wsclip pseudo`) or pick the split they cover"
                )
        elif not getattr(base, "with_masks", False):
            raise DatasetLayoutError(f"{base!r} has no masks: pass --pseudo DIR (a folder of <id>.png pseudo masks)")

    def __len__(self) -> int:
        return len(self.ids)

    def load_mask(self, i: int):
        import numpy as np

        if self.mask_dir is None:
            return np.asarray(self.base.load_mask(i))
        from wsclip.io import read_mask

        return read_mask(self.mask_dir / f"{self.ids[i]}.png")

    def __getitem__(self, i: int) -> dict:
        import numpy as np

        image, mask = np.asarray(self.base.load_image(i)), self.load_mask(i)
        if mask.shape[:2] != image.shape[:2]:
            raise ShapeError(f"{self.ids[i]}: mask is {mask.shape[1]}x{mask.shape[0]}, image "
                             f"{image.shape[1]}x{image.shape[0]}; masks must match their images")
        top = int(mask[mask != IGNORE].max()) if (mask != IGNORE).any() else 0
        if top > len(self.classes):
            raise BadFileError(f"mask of '{self.ids[i]}' has label {top} but the dataset has {len(self.classes)} "
                               "classes (0 = background, 1..K, 255 = ignore): check --pseudo and --data")
        sample = {"id": self.ids[i], "image": image, "mask": mask}
        return self.transform(sample) if self.transform is not None else sample


def open_seg_dataset(cfg: SegConfig) -> PseudoMaskDataset:
    """The training split paired with its pseudo masks, with the training augmentation."""
    if not cfg.data:
        raise DatasetLayoutError("no training data given: pass --data (a VOC/COCO folder, folder:DIR or synth:)")
    from wsclip.data import open_images

    base = open_images(cfg.data, cfg.split, masks=not cfg.pseudo)
    if len(base) == 0:
        raise DatasetLayoutError(f"{cfg.data} split '{cfg.split}' has no images")
    return PseudoMaskDataset(base, cfg.pseudo, seg_train_transform(cfg.crop, cfg.scale_range))


# ============================================================================ loss
def seg_loss(logits, target, balanced: bool = False, ignore_index: int = IGNORE):
    """Pixel cross-entropy over non-ignored pixels (mean over the global batch under DDP).

    balanced: (mean over background pixels + mean over foreground pixels) / 2, a group absent
    from the whole batch dropped. logits (B, C, H, W), target (B, H, W) with 255 = ignore.
    """
    import torch
    import torch.nn.functional as F

    from wsclip.train.loop import all_reduce_sum, world_size

    target = target.long()
    if logits.shape[-2:] != target.shape[-2:] or logits.shape[0] != target.shape[0]:
        raise ShapeError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match")
    ce = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    valid = target != ignore_index
    if not balanced:
        sums, counts = ce.sum()[None], valid.sum()[None]
    else:
        bg, fg = valid & (target == 0), valid & (target != 0)
        sums = torch.stack([(ce * bg).sum(), (ce * fg).sum()])
        counts = torch.stack([bg.sum(), fg.sum()])
    counts = all_reduce_sum(counts.float())
    groups = (counts > 0).sum().clamp(min=1)
    # DDP averages gradients over processes: scale the local share of the global mean by world size
    return (sums / counts.clamp(min=1)).sum() * (world_size() / groups)


def seg_step(model, batch, balanced: bool = False):
    """One step: logits upsampled bilinearly to the crop, cross-entropy ignoring 255."""
    import torch.nn.functional as F

    target = batch["mask"]
    logits = F.interpolate(model(batch["image"]).float(), size=target.shape[-2:], mode="bilinear",
                           align_corners=False)
    loss = seg_loss(logits, target, balanced)
    return loss, {"ignored": (target == IGNORE).float().mean()}


# ============================================================================ training
def train_seg(cfg: SegConfig, resume: bool = False, dataset=None, callbacks: Iterable = ()) -> Path:
    """Train a DeepLab network on pseudo masks; returns the path of the final checkpoint (kind 'seg')."""
    from wsclip.models.seg import build_seg_model, save_seg_model
    from wsclip.train.baseline_cam import trainer_kwargs
    from wsclip.train.loop import Trainer, seed_everything

    cfg.validate()
    ds = dataset if dataset is not None else open_seg_dataset(cfg)
    seed_everything(cfg.seed)
    net = build_seg_model(cfg.arch, cfg.backbone, len(ds.classes) + 1, cfg.pretrained, rates=cfg.rates,
                          output_stride=cfg.output_stride)
    if cfg.freeze_bn if cfg.freeze_bn is not None else bool(cfg.pretrained):
        net.freeze_bn()
    trainer = Trainer(
        net, functools.partial(seg_step, balanced=cfg.balanced_ce), ds,
        param_groups=net.param_groups(cfg.head_lr_mult, cfg.bias_lr_mult),
        model_meta=net.meta(ds.classes), desc="train seg", callbacks=callbacks, **trainer_kwargs(cfg),
    )
    out = Path(cfg.out)
    if trainer.is_main:
        save_yaml(cfg, out / "config.yaml")
    model = trainer.fit(resume=resume)
    final = out / FINAL_NAME
    if trainer.is_main:
        save_seg_model(final, model, ds.classes, extra={
            "trained": "seg", "steps": trainer.max_steps, "data": str(cfg.data), "split": cfg.split,
            "pseudo": str(cfg.pseudo) if cfg.pseudo else None, "preset": cfg.preset})
    return final
