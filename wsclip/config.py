"""Training configs as dataclasses, the papers' presets, YAML in/out, and CLI flag mapping.

Presets reproduce METHODS.md sections 2-3 and are named after them: "voc-official",
"coco-official" (improved public CLIMS code), "voc-paper" (CLIMS paper), and "synth"
(the tiny synthetic world; its numbers are starting points for a 2-core CPU, not a
paper's). Precedence: dataclass defaults < preset < YAML file (--config) < CLI flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsclip import vocab
from wsclip.errors import BadFileError, MissingFileError, WsclipError


def _f(default, help: str):
    """A dataclass field with a help text (shown by --help); lists/dicts get factories."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def opt(default, help: str, *, flag: str | None = None, choices=None, parse=None, cli: bool = True):
    """A job-config field with its --help text and how its generated CLI flag reads it (`add_config_args`):
    `flag` (default --field-name), `choices`, `parse` (text -> value), `cli=False` for no flag."""
    meta = {"help": help, "cli": cli, "flag": flag, "choices": choices, "parse": parse}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def parse_numbers(text: str) -> tuple[float, ...]:
    """'1.0,0.5' -> (1.0, 0.5): positive numbers, comma-separated (flag parser of scale lists)."""
    try:
        values = tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got '{text}'")
    return values


@dataclass
class TrainConfig:
    """Settings every CAM-network training shares (data, network, optimiser, loop)."""

    data: str = _f("", "dataset: a path or spec for wsclip.data.open_dataset (voc:DIR, coco:DIR, folder:DIR)")
    split: str = _f("train_aug", "training split")
    out: str = _f("runs/train", "output folder (checkpoints, log.jsonl, config.yaml, final model)")
    backbone: str = _f("resnet50", "CAM backbone: resnet50, resnet18 or tiny")
    pretrained: str | None = _f(None, "local torchvision ImageNet state dict for the backbone")
    lr: float = _f(0.1, "base learning rate (backbone); the head uses lr * head_lr_mult")
    head_lr_mult: float = _f(10.0, "learning-rate multiplier of the 1x1 CAM head")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(1e-4, "SGD weight decay")
    poly_power: float = _f(0.9, "poly schedule: lr * (1 - step/max_steps)^power")
    batch_size: int = _f(16, "global batch per optimizer step (all processes and accumulation steps together)")
    epochs: int = _f(5, "training epochs (ignored when max_steps is set)")
    max_steps: int | None = _f(None, "optimizer steps (overrides epochs)")
    accum_steps: int = _f(1, "gradient accumulation micro-batches per optimizer step")
    crop: int = _f(512, "random crop size (zero padding)")
    resize_long: tuple[int, int] = _f((320, 640), "random long-side resize range (min max)")
    num_workers: int = _f(4, "DataLoader worker processes")
    seed: int = _f(0, "random seed (model init, data order, augmentation)")
    amp: bool = _f(True, "mixed precision: bf16 autocast on CUDA (CPU always runs fp32)")
    sync_bn: bool = _f(False, "synchronise BatchNorm statistics across processes under DDP")
    ckpt_every: int = _f(500, "save a resumable checkpoint every N optimizer steps (0 = only at the end)")
    log_every: int = _f(10, "log loss terms to log.jsonl every N steps")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    preset: str | None = _f(None, "name of the preset these settings started from (recorded in checkpoints)")

    def validate(self) -> "TrainConfig":
        for name in ("batch_size", "accum_steps", "crop", "epochs"):
            if getattr(self, name) < 1:
                raise WsclipError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise WsclipError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.lr <= 0:
            raise WsclipError(f"lr must be positive, got {self.lr}")
        lo, hi = self.resize_long
        if not 0 < lo <= hi:
            raise WsclipError(f"resize_long must be two sizes min <= max, got {self.resize_long}")
        return self


@dataclass
class CamConfig(TrainConfig):
    """Baseline CAM training: GAP + multilabel soft-margin, frozen BN (METHODS.md section 2)."""

    out: str = _f("runs/cam", "output folder; the final network is <out>/camnet.safetensors")
    freeze_bn: bool = _f(True, "keep BatchNorm statistics fixed (IRN/CLIMS baseline)")
    from_scratch: str = _f(
        "auto", "without --pretrained (resnet backbones): auto = trainable BatchNorm and lr at most 0.01, said in "
        "the log (frozen BN and lr 0.1 diverge from random weights); as-given = the settings exactly as given")

    def validate(self) -> "CamConfig":
        super().validate()
        if self.from_scratch not in ("auto", "as-given"):
            raise WsclipError(f"from_scratch must be auto or as-given, got '{self.from_scratch}'")
        return self


@dataclass
class ClipGuidedConfig(TrainConfig):
    """What the CLIP-guided CAM trainers (CLIMS, QA-CLIMS) share: start, frozen CLIP, prompts, masking."""

    epochs: int = _f(15, "training epochs (ignored when max_steps is set)")
    sync_bn: bool = _f(True, "synchronise BatchNorm statistics across processes under DDP")
    init: str | None = _f(None, "baseline CAM checkpoint to start from (`wsclip train cam` output)")
    freeze_bn: bool = _f(False, "keep BatchNorm statistics fixed (the papers train BN)")
    clip: str = _f("ViT-B-32", "CLIP weights: a local file, or name:tag for open_clip's registry")
    clip_precision: str = _f("fp32", "CLIP precision: fp32, fp16 or bf16")
    template: str = _f(vocab.CLIMS_TEMPLATE, "prompt template")
    class_names: tuple[str, ...] | None = _f(None, "prompt names per class (default: the vocabulary's)")
    mask_norm: str = _f(
        "clip", "statistics of the masked CLIP inputs: clip (clean) or imagenet (public code's behaviour)"
    )
    kernel_backend: str = _f("auto", "masked_batch backend: auto, triton or torch")

    #: field -> allowed values (None too: a --compat setting not yet resolved)
    CHOICES = {"mask_norm": ("clip", "imagenet")}

    def validate(self) -> "ClipGuidedConfig":
        super().validate()
        for name, allowed in self.CHOICES.items():
            if getattr(self, name) not in (None, *allowed):
                raise WsclipError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        return self


@dataclass
class ClimsConfig(ClipGuidedConfig):
    """CLIMS training (METHODS.md sections 2-3)."""

    out: str = _f("runs/clims", "output folder; the final network is <out>/camnet.safetensors")
    lr: float = _f(2.5e-4, "base learning rate (backbone); the head uses lr * head_lr_mult")
    alpha: float = _f(10.0, "OTM weight")
    beta: float = _f(24.0, "BTM weight")
    gamma: float = _f(1.0, "CBS weight")
    delta: float = _f(0.2, "area (REG) weight")
    tau: float = _f(0.26, "CBS similarity threshold")
    text: str = _f("voc", "vocabulary for prompts and background words: voc, coco, synth, or custom")
    background: tuple[str, ...] | None = _f(None, "co-occurring background words (default: the vocabulary's)")
    background_per_class: dict | None = _f(
        None, "JSON {class: [words]}: CBS uses only these words for each class (paper version)"
    )
    compat: str = _f("wsclip", "wsclip (cleaner defaults) or official (every public-code behaviour, docs/compat.md)")
    bn1: str | None = _f(None, "bn1 in training: eval (statistics frozen too) or train (batch statistics, public code); "
                               "default from --compat")
    mask_norm: str | None = _f(
        None, "statistics of the masked CLIP inputs: clip (clean) or imagenet (public code's behaviour); "
              "default from --compat"
    )
    clip_act: str | None = _f(None, "CLIP activation: quick_gelu (OpenAI weights) or gelu; default from the checkpoint "
                                    "(files that cannot tell: gelu, quick_gelu under --compat official)")

    CHOICES = {**ClipGuidedConfig.CHOICES, "bn1": ("eval", "train"), "clip_act": ("quick_gelu", "gelu")}

    def validate(self) -> "ClimsConfig":
        from wsclip import compat

        compat.check(self.compat)
        return super().validate()


@dataclass
class QaClimsConfig(ClipGuidedConfig):
    """QA-CLIMS training (METHODS.md section 4): CLIMS's CAM net and masking, VQA-answer texts, FRC + BRC + area."""

    out: str = _f("runs/qa-clims", "output folder; the final network is <out>/camnet.safetensors")
    lr: float = _f(3.5e-4, "base learning rate (backbone); the head uses lr * head_lr_mult")
    batch_size: int = _f(8, "global batch per optimizer step (all processes and accumulation steps together)")
    corpus: tuple[str, ...] = _f((), "VQA corpus: a wsclip JSON file (wsclip qa-corpus), or the original fg.npy bg.npy pair")
    missing: str = _f("error", "(image, class) pairs absent from the corpus: error, or skip (label text only, no contrast)")
    w1: float = _f(10.0, "FRC (foreground region contrast) weight")
    w2: float = _f(8.0, "BRC (background region contrast) weight")
    w3: float = _f(0.2, "area (REG) weight")
    tau: float = _f(0.7, "temperature of FRC and BRC")
    label_weight: float = _f(0.5, "t_fg = w e(label) + (1 - w) mean e(answers)")
    max_bg_texts: int = _f(10, "background answer texts kept per (image, class) pair")
    template: str = _f(vocab.CLIMS_TEMPLATE, "prompt template for labels and answers")
    class_names: tuple[str, ...] | None = _f(
        None, "label names in prompts, one per class (default: readable class names, 'diningtable' -> 'dining table')"
    )


@dataclass
class IrnConfig(TrainConfig):
    """IRN boundary-network training (METHODS.md section 6): CAM seeds, affinity labels, frozen backbone."""

    out: str = _f("runs/irn", "output folder; the final network is <out>/irn.safetensors, seeds in <out>/seeds")
    cams: str = _f("", "folder of CAM files (<id>.npz from `wsclip cam`) for the training split")
    seeds: str | None = _f(None, "folder for the seed PNGs (default <out>/seeds; finished ones are reused)")
    fg_threshold: float = _f(0.30, "seed foreground threshold (COCO 0.35)")
    bg_threshold: float = _f(0.10, "seed background threshold")
    crf: str = _f("auto", "refine seeds with a dense CRF: auto (when the [crf] extra is installed), on, off")
    seed_workers: int = _f(0, "processes computing the seeds (0: one per CPU core)")
    radius: int = _f(10, "affinity radius on the stride-4 grid")
    backbone_from: str | None = _f(None, "take the frozen backbone from this CAM checkpoint instead of --pretrained")
    lr: float = _f(0.1, "learning rate of the boundary branch")
    batch_size: int = _f(32, "global batch per optimizer step (all processes and accumulation steps together)")
    epochs: int = _f(3, "training epochs (ignored when max_steps is set)")


# ----------------------------------------------------------------------------- presets
_VOC = dict(data="", split="train_aug", crop=512, resize_long=(320, 640))
_COCO = dict(split="train", crop=512, resize_long=(320, 640))
# the synthetic world (128 px scenes): the tiny ResNet at output stride 8, so CAMs are 16x16 on a 128 px image
_SYNTH = dict(split="train", backbone="tiny-s8", crop=128, resize_long=(96, 160), num_workers=2, ckpt_every=100,
              log_every=5)

PRESETS: dict[type, dict[str, dict[str, Any]]] = {
    IrnConfig: {
        "voc-official": dict(_VOC, lr=0.1, batch_size=32, epochs=3, fg_threshold=0.30, bg_threshold=0.10, radius=10),
        "coco-official": dict(_COCO, lr=0.1, batch_size=32, epochs=3, fg_threshold=0.35, bg_threshold=0.10, radius=10),
        "synth": dict(_SYNTH, lr=0.1, batch_size=16, epochs=3, fg_threshold=0.30, bg_threshold=0.10, radius=5),
    },
    QaClimsConfig: {
        # METHODS.md section 4; COCO's lr and batch are the public run script's (2 GPUs x 4)
        "voc-qa": dict(_VOC, lr=3.5e-4, batch_size=8, epochs=15, w1=10.0, w2=8.0, w3=0.2, tau=0.7),
        "coco-qa": dict(_COCO, lr=1e-5, batch_size=8, epochs=15, w1=30.0, w2=24.0, w3=0.2, tau=0.7),
        "synth": dict(_SYNTH, lr=0.01, batch_size=8, epochs=10, w1=10.0, w2=8.0, w3=0.2, tau=0.7),
    },
    CamConfig: {
        "voc-official": dict(_VOC, lr=0.1, batch_size=16, epochs=5),
        "coco-official": dict(_COCO, lr=0.1, batch_size=16, epochs=5),
        "voc-paper": dict(_VOC, lr=0.1, batch_size=16, epochs=5),
        # random init: BN trains (frozen, its statistics would stay at (0, 1), the features unnormalised)
        "synth": dict(_SYNTH, lr=0.05, batch_size=16, epochs=10, freeze_bn=False),
    },
    ClimsConfig: {
        "voc-official": dict(
            _VOC, lr=2.5e-4, batch_size=16, epochs=15, alpha=10.0, beta=24.0, gamma=1.0, delta=0.2,
            tau=0.26, text="voc", class_names=vocab.CLIMS_VOC_NAMES, background=vocab.CLIMS_VOC_BACKGROUND,
            compat="official",  # bn1 in train mode, ImageNet-normalised masked pixels, ... (wsclip/compat.py)
        ),
        "coco-official": dict(
            _COCO, lr=5e-4, batch_size=32, epochs=8, alpha=2.0, beta=14.0, gamma=1.25, delta=0.2,
            tau=0.285, text="coco", class_names=vocab.CLIMS_COCO_NAMES, background=vocab.CLIMS_COCO_BACKGROUND,
            compat="official",
        ),
        "voc-paper": dict(
            _VOC, lr=2.5e-4, batch_size=16, epochs=15, alpha=10.0, beta=25.0, gamma=29.5, delta=1.15,
            tau=0.26, text="voc", class_names=vocab.CLIMS_VOC_NAMES[:14] + ("person",) + vocab.CLIMS_VOC_NAMES[15:],
            background=tuple(dict.fromkeys(w for ws in vocab.CLIMS_PAPER_VOC_BACKGROUND.values() for w in ws)),
            background_per_class={k: list(v) for k, v in vocab.CLIMS_PAPER_VOC_BACKGROUND.items()},
        ),
        # the paper's lr and trainable BN (METHODS.md section 2): the baseline it starts from trained its BN
        # too (random init), so BN has statistics to start from. With BN frozen at its (0, 1) init the
        # unnormalised features let a few steps blow the CAM logits up to 1e10+ (every map saturated, no
        # gradient left; BENCHMARKS.md). delta: the CLIMS paper's REG weight
        "synth": dict(
            _SYNTH, lr=2.5e-4, batch_size=16, epochs=10, alpha=10.0, beta=24.0, gamma=1.0, delta=1.15,
            tau=0.26, text="synth",  # freeze_bn: ClipGuidedConfig's default (False)
        ),
    },
}


def preset_names(cls: type) -> list[str]:
    return sorted(PRESETS.get(cls, {}))


def from_preset(cls: type, name: str | None = None, **overrides):
    """cls with a preset's values (None = dataclass defaults) and then `overrides` applied."""
    values: dict[str, Any] = {}
    if name is not None:
        presets = PRESETS.get(cls, {})
        if name not in presets:
            raise WsclipError(f"unknown preset '{name}' for {cls.__name__}: use one of {', '.join(sorted(presets))}")
        values.update(presets[name], preset=name)
    values.update(overrides)
    return _build(cls, values, f"preset {name}")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp, True
    return tp, False


def _coerce(name: str, tp, value):
    base, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise WsclipError(f"config field '{name}' cannot be empty")
    origin = typing.get_origin(base)
    try:
        if origin is tuple:
            return tuple(value)
        if base is bool:
            if isinstance(value, str):
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        if base in (int, float, str):
            return base(value)
        if base is dict or origin is dict:
            return dict(value)
    except (TypeError, ValueError) as exc:
        raise WsclipError(f"config field '{name}': cannot use {value!r} as {base}: {exc}") from exc
    return value


def _build(cls, values: dict, source: str):
    types_ = _field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise WsclipError(f"{source}: unknown {cls.__name__} fields {unknown}; known: {', '.join(types_)}")
    return cls(**{k: _coerce(k, types_[k], v) for k, v in values.items()})


# ----------------------------------------------------------------------------- YAML
def to_dict(cfg) -> dict:
    """Plain dict of a config (tuples as lists), ready for YAML/JSON."""
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def save_yaml(cfg, path) -> None:
    """Write a config as YAML, atomically."""
    import yaml

    from wsclip.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_yaml(cls, path, base=None):
    """Read a YAML config for `cls`; keys present override `base` (or the defaults)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise BadFileError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise BadFileError(f"{path} must hold a mapping of config fields, got {type(data).__name__}")
    values = to_dict(base) if base is not None else {}
    values.update(data)
    return _build(cls, values, str(path))


# ----------------------------------------------------------------------------- CLI mapping
def add_config_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per dataclass field (--field-name, or the field's `opt` metadata), plus --preset and --config.

    Flags default to 'not given', so only what the user types overrides the preset.
    """
    names = preset_names(cls)
    if names:
        parser.add_argument("--preset", choices=names, help="settings of a paper/setup (flags override it)")
    parser.add_argument("--config", type=Path, help="YAML file of settings (overrides the preset)")
    types_ = _field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name == "preset" or not f.metadata.get("cli", True):
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        base, optional = _strip_optional(types_[f.name])
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=f.metadata.get("help"))
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        origin = typing.get_origin(base)
        if f.metadata.get("parse"):
            kw["type"] = f.metadata["parse"]
        elif base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin is tuple:
            args = typing.get_args(base)
            kw["type"] = args[0] if args else str
            kw["nargs"] = "+" if (len(args) == 2 and args[1] is Ellipsis) else len(args)
            kw["metavar"] = args[0].__name__.upper() if args else "X"
        elif base is dict or origin is dict:
            kw["type"] = json.loads
            kw["metavar"] = "JSON"
        else:
            kw["type"] = base
        parser.add_argument(flag, **kw)


def config_from_args(cls: type, args: argparse.Namespace):
    """Build `cls` from parsed flags: defaults < --preset < --config YAML < explicit flags."""
    cfg = from_preset(cls, getattr(args, "preset", None))
    if getattr(args, "config", None):
        cfg = load_yaml(cls, args.config, base=cfg)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
             if f.name != "preset" and hasattr(args, f.name)}
    if given:
        cfg = _build(cls, {**to_dict(cfg), **given}, "command line")
    return cfg.validate()
