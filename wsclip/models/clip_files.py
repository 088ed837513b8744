"""Reading CLIP weights: file-format sniffing, state-dict clean-up, architecture inference.

Private helpers of `wsclip.models.clip`; the public entry point is `load_clip`.
Formats: OpenAI TorchScript archives, torch pickles (read with weights_only=True),
safetensors. Key layouts: OpenAI / open_clip `CLIP` (flat text tower) and open_clip
`CustomTextCLIP` (text tower under `text.`).
"""

from __future__ import annotations

import copy
import math
import pickle
import warnings
import zipfile
from pathlib import Path

import torch

from wsclip.errors import CheckpointError

# Entries some archives carry that are not weights of an open_clip model.
EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask", "text.attn_mask")
# Text-tower keys that CustomTextCLIP keeps under `text.` and CLIP keeps at the top level.
_TEXT_PREFIXES = ("text_projection", "positional_embedding", "token_embedding", "transformer", "ln_final")
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_KEY_PREFIXES = ("module.", "_orig_mod.", "model.", "clip_model.", "clip.")
EXPECTED_KEYS = ("visual.conv1.weight (ViT) or visual.layer1.0.conv1.weight (ResNet)",
                 "token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection")


# ----------------------------------------------------------------------------- reading files
def sniff_format(path: Path) -> str:
    """'torchscript', 'pickle' or 'safetensors', judged from the file's bytes (not its suffix)."""
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the download or copy did not finish; fetch it again")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise CheckpointError(f"{path} is a truncated or corrupt archive ({exc}); fetch it again") from exc
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":  # legacy (non-zip) torch.save pickle
        return "pickle"
    raise CheckpointError(f"{path} is not a model checkpoint ({_describe_bytes(head)}); expected an OpenAI CLIP "
                          "'.pt' file, an open_clip '.pt'/'.bin' state dict or a '.safetensors' file")


def _describe_bytes(head: bytes) -> str:
    if head[:3] == b"\xff\xd8\xff":
        return "it is a JPEG image"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "it is a PNG image"
    if head[:1] in (b"{", b"["):
        return "it looks like JSON"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "it looks like a text file"
    return f"unknown leading bytes {head[:8].hex()}"


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict of tensors, format) from any supported file; clear CheckpointError otherwise."""
    fmt = sniff_format(path)
    if fmt == "torchscript":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notices
                obj = torch.jit.load(str(path), map_location="cpu").state_dict()
        except (RuntimeError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is a truncated or corrupt TorchScript archive ({_first_line(exc)})") from exc
    elif fmt == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path} is a truncated or corrupt safetensors file ({_first_line(exc)})") from exc
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            text = str(exc)
            if "truncated" in text or "EOF" in text:
                raise CheckpointError(f"{path} is a truncated or corrupt torch file ({_first_line(exc)})") from exc
            detail = next((ln.strip() for ln in text.splitlines() if "Unsupported global" in ln), _first_line(exc))
            raise CheckpointError(
                f"{path} holds Python objects besides tensors, which are not unpickled for safety ({detail}); "
                "re-save the weights alone with torch.save(model.state_dict(), path)"
            ) from exc
        except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
            raise CheckpointError(f"{path} is a truncated or corrupt torch file ({_first_line(exc)})") from exc
    return unwrap_state_dict(obj, path), fmt


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def unwrap_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    """Take the tensors out of {'state_dict': ...}-style wrappers and strip 'module.'-style prefixes."""
    for _ in range(3):
        if isinstance(obj, dict):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is not None and not any(isinstance(v, torch.Tensor) for v in obj.values()):
                obj = inner
                continue
        break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path} does not hold a state dict (found {type(obj).__name__}); "
                              f"expected a CLIP state dict with keys such as {', '.join(EXPECTED_KEYS)}")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in _KEY_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


# ----------------------------------------------------------------------------- key layouts
def flat_text_layout(sd: dict) -> dict:
    """CustomTextCLIP keys (`text.token_embedding.weight`...) -> CLIP keys (`token_embedding.weight`...)."""
    if "token_embedding.weight" in sd or "text.token_embedding.weight" not in sd:
        return dict(sd)
    return {(k[5:] if k.startswith("text.") and k[5:].startswith(_TEXT_PREFIXES) else k): v for k, v in sd.items()}


def to_model_layout(sd: dict, model: torch.nn.Module) -> dict:
    """Adapt a flat-layout state dict to `model`'s layout and drop entries that are not weights."""
    sd = {k: v for k, v in sd.items() if k not in EXTRA_KEYS}
    if hasattr(model, "text") and not hasattr(model, "token_embedding"):
        sd = {("text." + k if k.startswith(_TEXT_PREFIXES) else k): v for k, v in sd.items()}
    own = model.state_dict()
    for name in ("logit_scale", "logit_bias"):
        if name in sd and name in own and sd[name].shape != own[name].shape and sd[name].numel() == own[name].numel():
            sd[name] = sd[name].reshape(own[name].shape)
    return sd


def check_is_clip(sd: dict, path) -> None:
    """Raise CheckpointError naming the expected keys when `sd` is not a CLIP state dict."""
    text_ok = "token_embedding.weight" in sd and "positional_embedding" in sd
    vision_ok = any(k.startswith("visual.") for k in sd)
    if text_ok and vision_ok:
        return
    found = ", ".join(list(sd)[:6]) + (", ..." if len(sd) > 6 else "")
    missing = [k for k in ("visual.*", "token_embedding.weight", "positional_embedding")
               if (k == "visual.*" and not vision_ok) or (k != "visual.*" and k not in sd)]
    raise CheckpointError(
        f"{path} is not a CLIP checkpoint: it lacks {', '.join(missing)}. Expected an OpenAI/open_clip CLIP state "
        f"dict with keys such as {', '.join(EXPECTED_KEYS)}; found {len(sd)} tensors: {found}"
    )


def looks_openai(sd: dict, fmt: str) -> bool:
    """Hints that weights come from OpenAI's CLIP (trained with QuickGELU)."""
    if fmt == "torchscript" or "input_resolution" in sd:
        return True
    conv, ln = sd.get("visual.conv1.weight"), sd.get("ln_final.weight")
    # OpenAI's released weights: conv/linear layers in fp16, LayerNorms in fp32
    return conv is not None and ln is not None and conv.dtype == torch.float16 and ln.dtype == torch.float32


# ----------------------------------------------------------------------------- architecture inference
def _count_blocks(sd: dict, prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()}
    return max(idx) + 1 if idx else 0


def _tower_extras(sd: dict, prefix: str, width: int) -> dict:
    cfg = {}
    fc = sd.get(f"{prefix}0.mlp.c_fc.weight")
    if fc is not None and fc.shape[0] != 4 * width:
        cfg["mlp_ratio"] = fc.shape[0] / width
    if f"{prefix}0.ls_1.gamma" in sd:
        cfg["ls_init_value"] = 1e-5  # the value is overwritten by the loaded weights
    return cfg


def infer_model_cfg(sd: dict, path=None) -> dict:
    """An open_clip model config (embed_dim, vision_cfg, text_cfg) from the shapes of a flat-layout state dict.

    Head counts cannot be read from weights: they follow CLIP's convention of 64-wide heads.
    """
    check_is_clip(sd, path)
    if "visual.conv1.weight" in sd and "visual.positional_embedding" in sd:
        conv = sd["visual.conv1.weight"]
        width, patch = int(conv.shape[0]), int(conv.shape[-1])
        n_pos = int(sd["visual.positional_embedding"].shape[0]) - 1
        grid = math.isqrt(n_pos)
        if grid * grid != n_pos:
            raise CheckpointError(f"{path}: the vision positional embedding has {n_pos} patch positions, not a square "
                                  "grid; pass arch= or a JSON sidecar with the model config")
        if any(k.startswith("visual.attn_pool") for k in sd):
            raise CheckpointError(f"{path}: attentional-pooling vision towers cannot be inferred; pass arch=")
        vision = {"image_size": patch * grid, "layers": _count_blocks(sd, "visual.transformer.resblocks."),
                  "width": width, "patch_size": patch, "head_width": 64 if width % 64 == 0 else width,
                  **_tower_extras(sd, "visual.transformer.resblocks.", width)}
        if "visual.ln_pre.weight" not in sd:
            vision["no_ln_pre"] = True
        embed_dim = int(sd["visual.proj"].shape[1]) if "visual.proj" in sd else None
    elif "visual.layer1.0.conv1.weight" in sd and "visual.attnpool.positional_embedding" in sd:
        layers = [_count_blocks(sd, f"visual.layer{b}.") for b in (1, 2, 3, 4)]
        out_hw = math.isqrt(int(sd["visual.attnpool.positional_embedding"].shape[0]) - 1)
        vision = {"image_size": out_hw * 32, "layers": layers, "width": int(sd["visual.layer1.0.conv1.weight"].shape[0]),
                  "patch_size": None}
        embed_dim = int(sd["visual.attnpool.c_proj.weight"].shape[0]) if "visual.attnpool.c_proj.weight" in sd else None
    else:
        raise CheckpointError(f"{path}: the vision tower is neither an OpenAI-style ViT nor a ModifiedResNet; "
                              "pass arch= (an open_clip model name) or a JSON sidecar with the model config")
    twidth = int(sd["ln_final.weight"].shape[0]) if "ln_final.weight" in sd else int(sd["token_embedding.weight"].shape[1])
    text = {"context_length": int(sd["positional_embedding"].shape[0]),
            "vocab_size": int(sd["token_embedding.weight"].shape[0]), "width": twidth,
            "heads": max(1, twidth // 64), "layers": _count_blocks(sd, "transformer.resblocks."),
            **_tower_extras(sd, "transformer.resblocks.", twidth)}
    if "text_projection" in sd:
        embed_dim = embed_dim or int(sd["text_projection"].shape[1])
    elif "text_projection.weight" in sd:
        text["proj_bias"] = "text_projection.bias" in sd
        embed_dim = embed_dim or int(sd["text_projection.weight"].shape[0])
    else:
        text["proj_type"] = "none"
    return {"embed_dim": embed_dim or twidth, "vision_cfg": vision, "text_cfg": text}


def describe_cfg(cfg: dict) -> str:
    """One line: the sizes that identify a CLIP architecture."""
    v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if v.get("timm_model_name"):
        vis = f"timm {v['timm_model_name']}"
    elif isinstance(v.get("layers"), (list, tuple)):
        vis = f"ResNet layers {list(v['layers'])} width {v.get('width', 64)}"
    else:
        vis = f"ViT width {v.get('width', 768)} x {v.get('layers', 12)} layers, patch {v.get('patch_size', 16)}"
    return (f"{vis}, image {v.get('image_size', 224)}; text width {t.get('width', 512)} x {t.get('layers', 12)} "
            f"layers, context {t.get('context_length', 77)}; embed {cfg.get('embed_dim')}")


def build_model(model_cfg: dict, cast_dtype: torch.dtype | None = None, device=None) -> torch.nn.Module:
    """An open_clip CLIP / CustomTextCLIP from a config dict, never downloading tower weights."""
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = copy.deepcopy(model_cfg)
    cfg.pop("preprocess_cfg", None)
    if "multimodal_cfg" in cfg:
        raise CheckpointError("CoCa (captioning) models are not supported: use a contrastive CLIP")
    text_cfg, vision_cfg = cfg.get("text_cfg", {}), cfg.get("vision_cfg", {})
    if "hf_model_name" in text_cfg:
        text_cfg["hf_model_pretrained"] = False
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False
    custom = cfg.pop("custom_text", False) or "hf_model_name" in text_cfg
    cls = CustomTextCLIP if custom else CLIP
    with torch.device(device or "cpu"):
        return cls(**cfg, cast_dtype=cast_dtype)


def shape_mismatches(sd: dict, model: torch.nn.Module, limit: int = 4) -> list[str]:
    """Differences between a (model-layout) state dict and the model's own, as short strings."""
    own = model.state_dict()
    own = {k: v for k, v in own.items() if k not in EXTRA_KEYS}
    out = [f"missing {k}" for k in own if k not in sd]
    out += [f"unexpected {k}" for k in sd if k not in own]
    out += [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
            for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


def _coarse_key(cfg: dict) -> tuple:
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    layers = v.get("layers", 12)
    return (cfg.get("embed_dim"), tuple(layers) if isinstance(layers, (list, tuple)) else layers,
            v.get("width", 768), v.get("patch_size", 16), v.get("image_size", 224),
            t.get("width", 512), t.get("layers", 12), t.get("context_length", 77), t.get("vocab_size", 49408))


def match_registry(model_cfg: dict, sd: dict) -> tuple[str, dict] | None:
    """(name, config) of the open_clip registry architecture whose weights have exactly these shapes, if any.

    Prefers the plain name over its '-quickgelu' twin; structure only, QuickGELU is decided elsewhere.
    """
    import open_clip

    want = _coarse_key(model_cfg)
    shapes = {k: tuple(v.shape) for k, v in sd.items() if k not in EXTRA_KEYS}
    names = sorted(open_clip.list_models(), key=lambda n: ("quickgelu" in n, len(n), n))
    for name in names:
        cfg = open_clip.get_model_config(name)
        if not cfg or cfg.get("custom_text") or "multimodal_cfg" in cfg:
            continue
        v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
        if "timm_model_name" in v or "hf_model_name" in t:
            continue
        try:
            if _coarse_key(cfg) != want:
                continue
            meta = build_model(cfg, device="meta")
        except Exception:  # noqa: BLE001 - an exotic registry entry we cannot compare with
            continue
        own = {k: tuple(x.shape) for k, x in meta.state_dict().items() if k not in EXTRA_KEYS}
        if own == shapes:
            return name, cfg
    return None
