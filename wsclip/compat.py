"""`--compat`: wsclip's own behaviour, or the public code's (docs/compat.md lists every difference and why).

ONE rule decides every setting that differs between the two: `SETTINGS` maps a setting to its
(wsclip, official) value, and `resolve(cfg)` fills each field of a job config that is named
there and left at None from the config's `compat` field. A value the user sets explicitly
(not None) always wins, so `--compat official --bn1 eval` is the public code but for bn1.

    cfg = resolve(ClimsConfig(compat="official"))   # cfg.bn1 == "train", cfg.mask_norm == "imagenet"
    params = resolve(CRFParams(), "official")       # params.uint8_wrap is True
"""

from __future__ import annotations

import dataclasses
from typing import Any

from wsclip.errors import WsclipError

__all__ = ["COMPATS", "SETTINGS", "check", "value", "resolve"]

COMPATS = ("wsclip", "official")

#: setting -> (wsclip value, official value: the public code's behaviour, METHODS.md section 10)
SETTINGS: dict[str, tuple[Any, Any]] = {
    # CLIMS: conv1/bn1 frozen. wsclip keeps bn1's statistics fixed too (eval mode); the public code only sets
    # requires_grad=False, so bn1 normalises with batch statistics during CLIMS training.
    "bn1": ("eval", "train"),
    # CLIMS: statistics of the masked images CLIP sees (the public code masks ImageNet-normalised pixels)
    "mask_norm": ("clip", "imagenet"),
    # CLIP-ES: resize of the input image. wsclip: antialiased bicubic on float pixels (on the device); public:
    # PIL bicubic on the uint8 image (torchvision Resize on a PIL image), then ToTensor + CLIP normalisation
    "preprocess": ("tensor", "pil"),
    # CLIP-ES CAA boxes: the public code's uint8-quantised threshold and exclusive far box edges
    "box_compat": (False, True),
    # dense CRF reference image: the public code's OpenCV BGR image minus the BGR mean, cast to uint8 (wraps)
    "uint8_wrap": (False, True),
    # CLIP activation when the file cannot tell (fp32 state dict, no sidecar): the public code loads every
    # checkpoint with OpenAI's `clip` package, which always builds QuickGELU
    "clip_act_fallback": ("gelu", "quick_gelu"),
    # CLIP-ES frozen ViT blocks: wsclip may run them in bf16 where the CPU does it natively and the maps
    # match fp32 (compute="auto"); the public code runs fp32 throughout
    "compute": ("auto", "fp32"),
    # evaluation of predicted 255: CLIMS/IRN evaluation maps it to background; wsclip does the same by default
    "pred_ignore": ("background", "background"),
}


def check(compat: str) -> str:
    """`compat` itself, or a WsclipError naming the choices."""
    if compat not in COMPATS:
        raise WsclipError(f"unknown --compat {compat!r}: use one of {', '.join(COMPATS)}")
    return compat


def value(name: str, compat: str = "wsclip"):
    """The value of setting `name` under `compat`."""
    return SETTINGS[name][COMPATS.index(check(compat))]


def resolve(cfg, compat: str | None = None):
    """A copy of dataclass `cfg` whose fields named in SETTINGS and left None hold the `compat` value.

    `compat` defaults to cfg.compat. A `crf_params` field (a CRFParams) is resolved the same way.
    """
    compat = check(compat if compat is not None else getattr(cfg, "compat", "wsclip"))
    names = {f.name for f in dataclasses.fields(cfg)}
    fill = {k: value(k, compat) for k in SETTINGS if k in names and getattr(cfg, k) is None}
    if "crf_params" in names and getattr(cfg, "crf_params") is not None:
        fill["crf_params"] = resolve(cfg.crf_params, compat)
    return dataclasses.replace(cfg, **fill) if fill else cfg
