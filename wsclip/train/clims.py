"""CLIMS training (`wsclip train clims`), METHODS.md sections 2-3.

The CAM net runs in sigmoid mode; for every positive (image, class) pair the masked
foreground and background images are built by `wsclip.kernels.masked_batch` and encoded
by a frozen CLIP in ONE call (fg features serve both OTM and CBS); text features are
encoded once per run. L = alpha OTM + beta BTM + gamma CBS + delta REG.

Reductions are those of the global batch of a step: under DDP the OTM/BTM means use
the pair count of all processes and CBS sums over all of them (`loop.global_scale`),
so N processes train exactly like one process on the same global batch. With gradient
accumulation CBS is still the sum over the step's batch; OTM/BTM become the mean of the
micro-batch means (equal to the batch mean when micro-batches hold equal pair counts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch

from wsclip.config import ClimsConfig
from wsclip.errors import WsclipError
from wsclip.train import losses
from wsclip.constants import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 - re-exported



def resolve_text(cfg: ClimsConfig, classes: Sequence[str], dataset=None) -> tuple[list[str], list[str]]:
    """(prompt names per class, background words) for a dataset's classes under `cfg`."""
    from wsclip import vocab

    names = list(cfg.class_names) if cfg.class_names else None
    if names is None:
        canonical = vocab.DATASET_CLASSES.get(cfg.text)
        if canonical is not None and tuple(classes) == tuple(canonical):
            names = list(vocab.method_text(cfg.text, "clims")[0])
        else:
            names = list(classes)
    if len(names) != len(classes):
        raise WsclipError(f"{len(names)} prompt names (class_names) for a dataset with {len(classes)} classes")
    if cfg.background is not None:
        bg = list(cfg.background)
    elif getattr(dataset, "background_words", None):
        bg = list(dataset.background_words)
    elif dataset is not None and getattr(dataset, "root", None) and (Path(dataset.root) / "backgrounds.txt").is_file():
        bg = [w.strip() for w in (Path(dataset.root) / "backgrounds.txt").read_text().splitlines() if w.strip()]
    elif cfg.text == "synth":
        from wsclip.data.synth import SYNTH_BACKGROUND_WORDS

        bg = list(SYNTH_BACKGROUND_WORDS)
    elif cfg.text in ("voc", "coco"):
        bg = list(vocab.method_text(cfg.text, "clims")[1])
    else:
        raise WsclipError(f"no background words for vocabulary '{cfg.text}': pass --background WORD ...")
    return names, bg


def background_mask(cfg: ClimsConfig, classes: Sequence[str], background: Sequence[str]) -> torch.Tensor | None:
    """(K, L) bool: which background words CBS uses per class (None = all, the official version)."""
    if not cfg.background_per_class:
        return None
    from wsclip.vocab import class_index

    mask = torch.zeros(len(classes), len(background), dtype=torch.bool)
    for cls, words in cfg.background_per_class.items():
        k = class_index(cls, classes)
        for w in words:
            if w not in background:
                raise WsclipError(f"background word '{w}' for class '{cls}' is not in the background list {list(background)}")
            mask[k, list(background).index(w)] = True
    return mask


class ClimsObjective:
    """step_fn for the Trainer: the four CLIMS losses on one batch.

    clip: a frozen wsclip ClipModel; fg_text (K, D) and bg_text (L, D) L2-normalised text
    features computed once; bg_mask (K, L) optional per-class CBS word mask.
    """

    def __init__(self, clip, fg_text: torch.Tensor, bg_text: torch.Tensor, cfg: ClimsConfig,
                 bg_mask: torch.Tensor | None = None):
        from wsclip.compat import resolve

        cfg = resolve(cfg)
        self.clip, self.cfg = clip, cfg
        self.fg_text, self.bg_text = fg_text, bg_text
        self.bg_mask = bg_mask.to(fg_text.device) if bg_mask is not None else None
        self.norm = mask_normalisation(clip, cfg.mask_norm)

    def __call__(self, model, batch):
        from wsclip.train.loop import global_scale, world_size

        cfg = self.cfg
        x = batch["image"]
        cams, pairs, f_fg, f_bg = encode_masked_pairs(model, batch, self.clip, self.norm, cfg.kernel_backend)
        m = pairs.shape[0]
        t = self.fg_text[pairs[:, 1]]
        s_fg = (f_fg * t).sum(-1)
        s_bg = (f_bg * t).sum(-1)
        c = f_fg @ self.bg_text.t()  # (M, L): fg features reused
        word_mask = self.bg_mask[pairs[:, 1]] if self.bg_mask is not None else None

        accum = max(1, int(cfg.accum_steps))
        mean_scale = global_scale(m, x.device)  # local mean -> share of the global-batch mean
        sum_scale = world_size() * accum  # local sum -> share of the global-batch sum
        terms = {
            "otm": losses.otm(s_fg) * mean_scale,
            "btm": losses.btm(s_bg) * mean_scale,
            "cbs": losses.cbs(c, cfg.tau, word_mask) * sum_scale,
            "reg": losses.area(cams),
        }
        loss = cfg.alpha * terms["otm"] + cfg.beta * terms["btm"] + cfg.gamma * terms["cbs"] + cfg.delta * terms["reg"]
        return loss, terms


def mask_normalisation(clip, mask_norm: str) -> tuple[tuple, tuple]:
    """(mean, std) the masked CLIP inputs are normalised with: CLIP's own, or ImageNet's as in the public code."""
    if mask_norm == "clip":
        return tuple(clip.mean), tuple(clip.std)
    if mask_norm == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    raise WsclipError(f"mask_norm must be 'clip' or 'imagenet', got '{mask_norm}'")


def encode_masked_pairs(model, batch, clip, norm, backend: str = "auto"):
    """Sigmoid CAMs of the batch and CLIP features of every (image, class) pair's fg and bg image.

    Returns cams (B, K, h, w), pairs (M, 2) = labels.nonzero(), f_fg (M, D), f_bg (M, D): all
    2M masked images go through the frozen CLIP image encoder in one call.
    """
    from wsclip.kernels import masked_batch

    x, labels = batch["image"], batch["labels"]
    cams = torch.sigmoid(model(x).float())  # (B, K, h, w)
    pairs = labels.nonzero()  # (M, 2): (image, class)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    images = (x.float() * std + mean).clamp(0.0, 1.0)  # back to [0, 1]; zero padding -> mean colour
    # (2M, 3, S, S) = [fg of every pair; bg of every pair], one CLIP batch, one encoder call
    both = masked_batch(images, cams, pairs, size=clip.image_size, mean=norm[0], std=norm[1],
                        out_dtype=clip.dtype, backend=backend, stacked=True)
    m = pairs.shape[0]
    feats = clip.encode_image(both)
    return cams, pairs, feats[:m], feats[m:]


def prepare_camnet(net, cfg: ClimsConfig):
    """The CAM network as CLIMS trains it under `cfg` (resolved): bn1 in eval (wsclip) or train (public) mode."""
    from wsclip.compat import resolve

    return net.set_bn1(resolve(cfg).bn1)


def load_frozen_clip(spec: str, device, precision: str = "fp32", act: str | None = None, compat: str = "wsclip"):
    """load_clip + an explicit freeze (eval mode, no parameter requires grad); `act`/`compat` as load_clip's."""
    from wsclip.models.clip import load_clip

    clip = load_clip(spec, device=device, precision=precision, act=act, compat=compat)
    clip.model.eval()
    for p in clip.model.parameters():
        p.requires_grad_(False)
    return clip


def train_clims(cfg: ClimsConfig, resume: bool = False, dataset=None, clip=None, callbacks: Iterable = ()) -> Path:
    """Train a CAM network with the CLIMS losses; returns the path of the final checkpoint.

    `dataset` / `clip` may be given pre-built (tests, notebooks); otherwise they come from
    cfg.data and cfg.clip.
    """
    from wsclip.train.baseline_cam import fit_cam_network, init_cam_network, open_train_dataset
    from wsclip.train.loop import init_distributed, resolve_device, seed_everything

    from wsclip.compat import resolve

    cfg = resolve(cfg.validate())
    init_distributed()
    device = resolve_device(cfg.device)
    ds = dataset if dataset is not None else open_train_dataset(cfg)
    classes = tuple(ds.classes)
    names, background = resolve_text(cfg, classes, ds)
    word_mask = background_mask(cfg, classes, background)

    seed_everything(cfg.seed)
    net = init_cam_network(cfg, classes, "note: CLIMS starts from a baseline CAM network in the papers; pass "
                           "--init (the output of `wsclip train cam`)")

    prepare_camnet(net, cfg)
    if clip is None:
        clip = load_frozen_clip(cfg.clip, device, cfg.clip_precision, act=cfg.clip_act, compat=cfg.compat)
    fg_text = clip.encode_text([cfg.template.format(n) for n in names]).to(device)
    bg_text = clip.encode_text([cfg.template.format(w) for w in background]).to(device)
    objective = ClimsObjective(clip, fg_text, bg_text, cfg, word_mask)

    return fit_cam_network(net, objective, ds, classes, cfg, "train clims", resume, callbacks,
                           {"trained": "clims", "clip": str(cfg.clip), "prompts": names, "background": background})
