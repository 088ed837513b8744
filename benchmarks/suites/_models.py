"""Randomly initialised models of the real architectures (no pretrained weights exist here; speed does
not depend on the weights), the reduced variants CPU runs use, and FLOP counts from the architecture."""

from __future__ import annotations

import copy

import torch

#: tiny configs for --tiny runs (and the tests)
TINY_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
TINY_VIT = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "patch_size": 8,
                                            "head_width": 32}, "text_cfg": TINY_TEXT}
TINY_RN = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
           "text_cfg": TINY_TEXT}


def require_open_clip():
    """open_clip, or a Skip naming what to install (the suites build CLIP models with it)."""
    from wsclip.bench.suite import Skip

    try:
        import open_clip
    except ImportError as exc:
        raise Skip(f"open_clip is not installed ({exc}): pip install open_clip_torch") from None
    return open_clip


def clip_config(name: str, image_size: int | None = None, width: int | None = None,
                text_width: int | None = None) -> dict:
    """open_clip's config of `name` (e.g. ViT-B-32, RN50), optionally at another input size, or reduced:
    `width` shrinks the ViT image tower (same depth and patch size), `text_width` the text tower."""
    open_clip = require_open_clip()

    if name == "tiny-vit":
        return copy.deepcopy(TINY_VIT)
    if name == "tiny-rn":
        return copy.deepcopy(TINY_RN)
    cfg = copy.deepcopy(open_clip.get_model_config(name))
    if cfg is None:
        raise ValueError(f"unknown open_clip model {name}")
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    if image_size:
        v["image_size"] = int(image_size)
    if width:
        v["width"] = int(width)
        v["head_width"] = 64
        cfg["embed_dim"] = min(cfg["embed_dim"], int(width))
    if text_width:
        t["width"] = int(text_width)
        t["heads"] = max(1, int(text_width) // 64)
    return cfg


def describe(name: str, cfg: dict) -> str:
    v = cfg["vision_cfg"]
    if name.startswith("tiny"):
        return f"{name} (toy)"
    ref_cfg = clip_config(name)
    ref, t, ref_t = ref_cfg["vision_cfg"], cfg["text_cfg"], ref_cfg["text_cfg"]
    out = f"{name}@{v['image_size']}"
    cut = []
    if v.get("width") != ref.get("width"):
        cut.append(f"image width {v['width']} (real {ref['width']})")
    if t.get("width") != ref_t.get("width"):
        cut.append(f"text width {t['width']} (real {ref_t['width']})")
    return out + (f" reduced to {', '.join(cut)}" if cut else "")


def random_clip(cfg: dict, name: str, device, precision: str = "fp32", seed: int = 0):
    """A frozen wsclip ClipModel with random weights of this architecture (as load_clip builds it)."""
    from open_clip.model import convert_weights_to_lp

    from wsclip.models.clip import PRECISIONS, ClipModel
    from wsclip.models.clip_files import build_model

    torch.manual_seed(seed)
    dtype = PRECISIONS[precision]
    dev = torch.device(device)
    model = build_model(cfg, cast_dtype=None if precision == "fp32" else dtype,
                        device=dev if dev.type == "cuda" else None)
    if precision != "fp32":
        convert_weights_to_lp(model, dtype=dtype)
    model.to(dev)
    return ClipModel(model, name, cfg, dtype=dtype, source="random", identity=f"random-{name}-{seed}-{precision}")


def image_gflop(cfg: dict) -> float:
    """GFLOP (2 per multiply-add) of one image through the image tower, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from wsclip.models.clip_files import build_model

    model = build_model(cfg, device="meta")
    s = cfg["vision_cfg"]["image_size"]
    counter = FlopCounterMode(display=False)
    with counter:
        model.visual(torch.empty(1, 3, s, s, device="meta"))
    return counter.get_total_flops() / 1e9
