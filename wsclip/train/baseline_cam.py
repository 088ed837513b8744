"""Baseline CAM training (`wsclip train cam`): GAP + multilabel soft-margin, frozen BN.

METHODS.md section 2: lr 0.1 (head 10x), batch 16, 5 epochs, poly SGD; its output is
the checkpoint CLIMS starts from (<out>/camnet.safetensors).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Iterable

import torch.nn.functional as F

from wsclip.config import CamConfig, TrainConfig
from wsclip.errors import DatasetLayoutError, WsclipError

FINAL_NAME = "camnet.safetensors"


def open_train_dataset(cfg: TrainConfig):
    """The training split with the CAM training augmentation (long-side resize, flip, normalise, crop)."""
    from wsclip.data import open_dataset
    from wsclip.data.transforms import clims_train_transform

    if not cfg.data:
        raise DatasetLayoutError("no training data given: pass --data (a VOC/COCO folder, folder:DIR or synth:)")
    tf = clims_train_transform(crop=cfg.crop, scale=tuple(cfg.resize_long))
    kw = {} if str(cfg.data).startswith("synth:") else {"masks": False}
    ds = open_dataset(cfg.data, split=cfg.split, transform=tf, **kw)
    if len(ds) == 0:
        raise DatasetLayoutError(f"{cfg.data} split '{cfg.split}' has no images")
    return ds


def camnet_meta(net, classes, preset) -> dict:
    """Sidecar fields that make a trainer checkpoint loadable with load_camnet."""
    return {"kind": "camnet", "backbone": net.backbone_name, "num_classes": net.num_classes,
            "classes": list(classes), "preset": preset}


def cam_step(model, batch):
    """Multilabel soft-margin loss on the GAP logits of the raw CAMs."""
    logits = model(batch["image"]).float().mean(dim=(2, 3))
    return F.multilabel_soft_margin_loss(logits, batch["labels"].float()), {}


def trainer_kwargs(cfg: TrainConfig) -> dict:
    """The Trainer settings a TrainConfig carries."""
    from wsclip.data.transforms import collate

    return dict(
        out_dir=cfg.out, batch_size=cfg.batch_size, lr=cfg.lr, max_steps=cfg.max_steps, epochs=cfg.epochs,
        momentum=cfg.momentum, weight_decay=cfg.weight_decay, poly_power=cfg.poly_power,
        accum_steps=cfg.accum_steps, amp=cfg.amp, seed=cfg.seed, ckpt_every=cfg.ckpt_every,
        log_every=cfg.log_every, sync_bn=cfg.sync_bn, device=cfg.device, num_workers=cfg.num_workers,
        collate_fn=collate,
    )


def init_cam_network(cfg, classes, note: str | None = None):
    """The CAM network a CLIP-guided trainer starts from: the baseline checkpoint `cfg.init` (its classes
    must match), else a fresh network (printing `note` on rank 0)."""
    from wsclip.models.camnet import build_camnet, load_camnet
    from wsclip.train.loop import rank

    if cfg.init:
        net, _ = load_camnet(cfg.init)
        if net.num_classes != len(classes):
            raise WsclipError(
                f"{cfg.init} was trained for {net.num_classes} classes, the dataset has {len(classes)}: "
                "start from a baseline trained on this dataset"
            )
        return net.train()
    if note and rank() == 0:
        print(note, file=sys.stderr)
    return build_camnet(cfg.backbone, len(classes), cfg.pretrained)


def fit_cam_network(net, step, ds, classes, cfg: TrainConfig, desc: str, resume: bool, callbacks: Iterable,
                    extra: dict) -> Path:
    """The training run every CAM-network trainer shares (baseline, CLIMS, QA-CLIMS): frozen BatchNorm
    when `cfg.freeze_bn`, backbone and head param groups, the Trainer, config.yaml, and the final `camnet.safetensors` with `extra` in its sidecar."""
    from wsclip.config import save_yaml
    from wsclip.models.camnet import save_camnet
    from wsclip.train.loop import Trainer

    if cfg.freeze_bn:
        net.freeze_bn()
    back, head = net.param_groups()
    trainer = Trainer(
        net, step, ds, param_groups=[(back, 1.0), (head, cfg.head_lr_mult)],
        model_meta=camnet_meta(net, classes, cfg.preset), desc=desc, callbacks=callbacks,
        **trainer_kwargs(cfg),
    )
    out = Path(cfg.out)
    if trainer.is_main and (resume or trainer.latest_checkpoint() is None):
        save_yaml(cfg, out / "config.yaml")
    model = trainer.fit(resume=resume)
    final = out / FINAL_NAME
    if trainer.is_main:
        save_camnet(final, model, classes, preset=cfg.preset, extra={**extra, "steps": trainer.max_steps})
    return final


SCRATCH_LR = 0.01


def scratch_settings(cfg: CamConfig, announce: bool = True) -> CamConfig:
    """Settings that train a resnet backbone from random weights (no --pretrained): the papers' frozen
    BatchNorm and lr 0.1 assume ImageNet statistics and diverge within a few steps from random ones.
    With from_scratch='auto' BatchNorm trains and lr is capped at SCRATCH_LR; the change is printed."""
    if cfg.pretrained or cfg.backbone.startswith("tiny"):  # no ImageNet weights for the tiny ones; presets start random
        return cfg
    if cfg.from_scratch == "as-given":
        if announce:
            print(f"note: the {cfg.backbone} backbone starts from random weights with the settings as given "
                  f"(lr {cfg.lr:g}, {'frozen' if cfg.freeze_bn else 'trainable'} BatchNorm)", file=sys.stderr)
        return cfg
    new = dataclasses.replace(cfg, freeze_bn=False, lr=min(cfg.lr, SCRATCH_LR))
    if announce:
        print(f"note: no --pretrained: the {cfg.backbone} backbone starts from random weights, so BatchNorm trains "
              f"and lr is {new.lr:g} (was {cfg.lr:g}{', frozen BatchNorm' if cfg.freeze_bn else ''}). The papers "
              "start from ImageNet: pass --pretrained FILE (a torchvision state dict) for their settings, or "
              "--from-scratch as-given to keep yours", file=sys.stderr)
    return new


def train_cam(cfg: CamConfig, resume: bool = False, dataset=None, callbacks: Iterable = ()) -> Path:
    """Train the baseline CAM network; returns the path of the final checkpoint."""
    from wsclip.models.camnet import build_camnet
    from wsclip.train.loop import rank, seed_everything

    cfg = scratch_settings(cfg.validate(), announce=rank() == 0)
    ds = dataset if dataset is not None else open_train_dataset(cfg)
    seed_everything(cfg.seed)
    net = build_camnet(cfg.backbone, len(ds.classes), cfg.pretrained)
    return fit_cam_network(net, cam_step, ds, ds.classes, cfg, "train cam", resume, callbacks,
                           {"trained": "cam", "data": str(cfg.data)})
