"""Frozen CLIP from a local file (or an explicit open_clip `name:tag`), with a text-embedding cache and ViT access.

    clip = load_clip("ViT-B-16.pt")                      # OpenAI archive, state dict or safetensors
    feats = clip.encode_image(clip.preprocess_tensor(images))
    texts = clip.encode_text(["a photo of cat."])         # cached per (model, prompt)
    trace = clip.vit_forward(pixels, attn_layers=range(4, 12))   # CLIP-ES

Architecture source, first found wins: `arch=` (open_clip name or config dict), a JSON sidecar
next to the weights (`{"kind": "clip", "name", "model_cfg"}`, as `save_clip` writes), an
`open_clip_config.json` in the same folder (Hugging Face layout), else inferred from the
state dict's shapes (matched against open_clip's registry for the exact head layout).
"""

from __future__ import annotations

import copy
import json
import os
import threading
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from wsclip.errors import CheckpointError, MissingFileError, ShapeError, WsclipError
from wsclip.models.clip_vit import ViTTrace, interpolate_pos_embed
from wsclip.constants import CLIP_MEAN, CLIP_STD  # noqa: F401 - re-exported

__all__ = ["CLIP_MEAN", "CLIP_STD", "ACTS", "ClipModel", "ViTTrace", "interpolate_pos_embed", "load_clip", "save_clip"]

#: the activations a CLIP may need: OpenAI's weights were trained with QuickGELU, open_clip's own with GELU
ACTS = ("quick_gelu", "gelu")

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin", ".pth")
_DIR_PREFERENCE = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                   "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")
_TEXT_BATCH = 256


class ClipModel:
    """A frozen open_clip CLIP (`.model`, eval mode, no parameter requires grad) plus what callers need."""

    def __init__(self, model: torch.nn.Module, name: str, model_cfg: dict, *, mean=CLIP_MEAN, std=CLIP_STD,
                 dtype: torch.dtype = torch.float32, source: str = "", identity: str | None = None):
        from open_clip.model import get_model_tokenize_cfg

        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.name = name
        self.model_cfg = model_cfg
        self.source = source
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.dtype = dtype
        self.device = next(model.parameters()).device
        visual = model.visual
        size = getattr(visual, "image_size", None) or model_cfg.get("vision_cfg", {}).get("image_size", 224)
        self.image_hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.image_size = self.image_hw[0]
        ps = getattr(visual, "patch_size", None)
        self.patch_size = None if ps is None or not self.is_vit else int(ps if isinstance(ps, int) else ps[0])
        self.embed_dim = int(model_cfg.get("embed_dim") or getattr(visual, "output_dim"))
        self.context_length = int(get_model_tokenize_cfg(model).get("context_length", 77))
        self.identity = identity or f"{name}@{source}:{dtype}"
        #: the activation the model runs (ACTS) and what decided it (e.g. "sidecar", "--clip-act", "ambiguous")
        self.act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
        self.act_source = "config"
        self.text_cache: dict[tuple[str, str], torch.Tensor] = {}
        self._lock = threading.Lock()
        self._tokenizer = None

    def __repr__(self) -> str:
        return (f"ClipModel(name={self.name!r}, image_size={self.image_size}, patch_size={self.patch_size}, "
                f"embed_dim={self.embed_dim}, device={self.device}, dtype={self.dtype})")

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale) of the checkpoint (100 for OpenAI's released weights); 100 when the model has none."""
        ls = getattr(self.model, "logit_scale", None)
        return float(ls.detach().float().exp()) if isinstance(ls, torch.Tensor) else 100.0

    @property
    def is_vit(self) -> bool:
        from open_clip.transformer import VisionTransformer

        return isinstance(self.model.visual, VisionTransformer)

    # ------------------------------------------------------------------ text
    @property
    def tokenizer(self):
        """open_clip's tokenizer for this model (built on first use)."""
        if self._tokenizer is None:
            self._tokenizer = _make_tokenizer(self.name, self.model_cfg, self.context_length)
        return self._tokenizer

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids (T, context_length), long, on the CPU."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.tokenizer(texts).long()

    def encode_text(self, texts: str | Sequence[str], normalize: bool = True) -> torch.Tensor:
        """Text embeddings (T, D) float32 without gradients; each prompt is encoded once, then served from the cache."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        with self._lock:
            todo = [t for t in dict.fromkeys(texts) if (self.identity, t) not in self.text_cache]
            for start in range(0, len(todo), _TEXT_BATCH):
                chunk = todo[start:start + _TEXT_BATCH]
                tokens = self.tokenize(chunk).to(self.device)
                with torch.no_grad():
                    feats = self.model.encode_text(tokens, normalize=False).float()
                for text, f in zip(chunk, feats):
                    self.text_cache[(self.identity, text)] = f
            if not texts:
                return torch.zeros(0, self.embed_dim, device=self.device)
            out = torch.stack([self.text_cache[(self.identity, t)] for t in texts])
        return F.normalize(out, dim=-1) if normalize else out

    def clear_text_cache(self) -> None:
        with self._lock:
            self.text_cache.clear()

    # ------------------------------------------------------------------ images
    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image embeddings (B, D) float32 of CLIP-normalised pixels (B, 3, S, S); gradients flow to `pixels`."""
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ShapeError(f"pixels must be (B, 3, H, W), got {tuple(pixels.shape)}")
        if tuple(pixels.shape[-2:]) != self.image_hw:
            raise ShapeError(f"{self.name} takes {self.image_hw[0]}x{self.image_hw[1]} images, got "
                             f"{pixels.shape[-2]}x{pixels.shape[-1]}: resize first (preprocess_tensor does)")
        feats = self.model.encode_image(pixels.to(device=self.device, dtype=self.dtype)).float()
        return F.normalize(feats, dim=-1) if normalize else feats

    def preprocess_tensor(self, images, size=None, resize: str = "tensor") -> torch.Tensor:
        """(B, 3, h, w) float32 CLIP-normalised pixels on the model's device from uint8 or [0, 1] float images.

        Accepts (3, H, W), (B, 3, H, W) or channels-last (H, W, 3) / (B, H, W, 3), tensors or numpy arrays;
        resizes to `size` (int or (h, w); default the model's input size). resize="tensor": bicubic,
        antialiased, on float pixels on the device; resize="pil": the public CLIP-ES code's PIL bicubic on
        the uint8 image (torchvision Resize on a PIL image; uint8 images only), on the CPU.
        """
        if resize not in ("tensor", "pil"):
            raise WsclipError(f"unknown resize {resize!r}: use 'tensor' or 'pil'")
        if isinstance(images, torch.Tensor):
            x = images
        else:
            import numpy as np

            arr = np.asarray(images)
            x = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
        if x.dim() == 3:
            x = x[None]
        if x.dim() != 4 or 3 not in (x.shape[1], x.shape[-1]):
            raise ShapeError(f"images must be (B, 3, H, W) or (B, H, W, 3), got {tuple(x.shape)}")
        if x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)
        hw = self.image_hw if size is None else ((size, size) if isinstance(size, int) else tuple(size))
        if resize == "pil":
            x = _pil_bicubic(x, hw)
        x = x.to(self.device)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if tuple(x.shape[-2:]) != tuple(hw):
            x = F.interpolate(x, size=hw, mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 1.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def vit_forward(self, pixels: torch.Tensor, attn_layers=None, **options) -> ViTTrace:
        """CLIP-ES access to the ViT: see `wsclip.models.clip_vit.vit_forward` (options) and `ViTTrace`."""
        from wsclip.models.clip_vit import vit_forward

        if not self.is_vit:
            raise CheckpointError(f"{self.name} has a {type(self.model.visual).__name__} image tower, not a ViT: "
                                  "CLIP-ES needs a ViT CLIP (e.g. ViT-B-16); load a ViT checkpoint")
        return vit_forward(self.model.visual, pixels.to(self.device), attn_layers, **options)


def _pil_bicubic(x: torch.Tensor, hw) -> torch.Tensor:
    """uint8 (B, 3, H, W) resized to hw one image at a time with PIL's bicubic (two separable passes, each
    rounded and clipped to uint8), as torchvision's Resize does on a PIL image; uint8 on the CPU."""
    import numpy as np
    from PIL import Image

    if x.dtype != torch.uint8:
        raise WsclipError("the public code's PIL resize (--compat official) takes uint8 images")
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    out = []
    for im in x.permute(0, 2, 3, 1).cpu().numpy():
        resized = Image.fromarray(np.ascontiguousarray(im)).resize((int(hw[1]), int(hw[0])), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(resized).copy()))
    return torch.stack(out).permute(0, 3, 1, 2)


# ============================================================================ loading
def load_clip(path_or_name, device="cpu", precision: str = "fp32", arch=None, quick_gelu: bool | None = None,
              act: str | None = None, compat: str = "wsclip") -> ClipModel:
    """Load a frozen CLIP from a local file or folder, or from open_clip's registry when given `name:tag`.

    Files: OpenAI `.pt` (TorchScript archive or state dict), open_clip `.pt`/`.bin`/`.pth` state dicts (also
    wrapped in {"state_dict": ...} with "module." prefixes), `.safetensors`. `arch`: an open_clip model name
    or config dict that overrides the sidecar and inference. Never downloads unless given `name:tag` or
    `hf-hub:org/repo`. precision: fp32 | fp16 | bf16.

    Activation (QuickGELU or GELU), first found wins: `act` ("quick_gelu" | "gelu") or `quick_gelu`; the
    config (arch=, sidecar `model_cfg`, open_clip_config.json) or a sidecar's "act"; an OpenAI TorchScript
    archive or OpenAI's release layout (fp16 conv/linear, fp32 LayerNorm) -> QuickGELU. A plain state dict
    cannot tell (OpenAI's and open_clip's key layouts are the same): then `compat` decides (wsclip: GELU,
    official: QuickGELU as the public code's `clip` package) and a warning says so. The choice is in
    `clip.act` / `clip.act_source`.
    """
    if precision not in PRECISIONS:
        raise WsclipError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if act is not None:
        if act not in ACTS:
            raise WsclipError(f"unknown CLIP activation {act!r}: use one of {', '.join(ACTS)}")
        quick_gelu = act == "quick_gelu"
    dev = _device(device)
    spec = os.fspath(path_or_name)
    path = Path(spec).expanduser()
    hub_cfg = None
    if path.is_dir():
        path, hub_cfg = _resolve_dir(path)
    elif path.is_file() and path.suffix == ".json":
        path = _weights_for_sidecar(path)
    elif not path.is_file():
        if _is_hub_spec(spec):
            return _load_hub(spec, dev, precision)
        raise MissingFileError(_missing_message(spec))
    if hub_cfg is None:
        hub_cfg = _read_json(path.parent / "open_clip_config.json")
    return _load_file(path, dev, precision, arch, quick_gelu, hub_cfg, compat)


def _load_file(path: Path, dev: torch.device, precision: str, arch, quick_gelu, hub_cfg, compat="wsclip") -> ClipModel:
    import open_clip
    from open_clip.model import convert_weights_to_lp

    from wsclip.io import sidecar_path
    from wsclip.models import clip_files as cf

    sd, fmt = cf.read_state_dict(path)
    sd = cf.flat_text_layout(sd)
    cf.check_is_clip(sd, path)
    openai = cf.looks_openai(sd, fmt)
    side = _read_sidecar(path)
    side_act = side.get("act") if side is not None else None
    if side_act is not None and side_act not in ACTS:
        raise CheckpointError(f"{sidecar_path(path)}: 'act' is {side_act!r}; use one of {', '.join(ACTS)}")
    if side is not None and "model_cfg" not in side:  # a sidecar that only states the activation
        side = None
    mean, std = CLIP_MEAN, CLIP_STD
    act_source = None
    if arch is not None:
        if isinstance(arch, dict):
            cfg, name, origin = copy.deepcopy(arch), path.stem, "the arch= config"
        else:
            name = str(arch).replace("/", "-")
            cfg = open_clip.get_model_config(name)
            if cfg is None:
                raise WsclipError(f"unknown arch {arch!r}: not an open_clip model name "
                                  f"(open_clip.list_models() has e.g. ViT-B-32, ViT-B-16, ViT-L-14, RN50)")
            origin = f"arch={arch!r}"
        if quick_gelu is None and "quick_gelu" not in cfg and openai:
            cfg["quick_gelu"] = True
        act_source = origin
    elif side is not None:
        cfg, name, origin = copy.deepcopy(side["model_cfg"]), str(side.get("name") or path.stem), f"sidecar {sidecar_path(path).name}"
        mean, std = side.get("mean", mean), side.get("std", std)
        act_source = origin
    elif hub_cfg is not None:
        cfg, name, origin = copy.deepcopy(hub_cfg["model_cfg"]), path.parent.name, "open_clip_config.json"
        pp = hub_cfg.get("preprocess_cfg") or {}
        mean, std = pp.get("mean", mean), pp.get("std", std)
        act_source = origin
    else:
        inferred = cf.infer_model_cfg(sd, path)
        found = cf.match_registry(inferred, sd)
        name, cfg = (found[0], copy.deepcopy(found[1])) if found else (_custom_name(inferred), inferred)
        cfg["quick_gelu"] = openai
        origin = "inferred"
        act_source = "OpenAI file layout" if openai else None
    if quick_gelu is not None:
        cfg["quick_gelu"] = bool(quick_gelu)
        act_source = "--clip-act"
    elif side_act is not None:
        cfg["quick_gelu"] = side_act == "quick_gelu"
        act_source = f"sidecar {sidecar_path(path).name}"
    elif act_source is None:  # nothing in or beside the file says which activation it needs
        from wsclip.compat import value

        fallback = value("clip_act_fallback", compat)
        cfg["quick_gelu"] = fallback == "quick_gelu"
        act_source = "ambiguous"
        warnings.warn(f"{path}: a plain state dict cannot say whether its CLIP needs QuickGELU (OpenAI weights) or "
                      f"GELU (open_clip's); using {fallback} (--compat {compat}). State it with --clip-act "
                      f"quick_gelu|gelu or a sidecar {sidecar_path(path).name} holding {{\"act\": ...}}",
                      stacklevel=3)

    dtype = PRECISIONS[precision]
    cast = None if precision == "fp32" else dtype
    skeleton = cf.build_model(cfg, cast_dtype=cast, device="meta")  # check shapes before allocating anything
    sd = cf.to_model_layout(sd, skeleton)
    bad = cf.shape_mismatches(sd, skeleton)
    if bad:
        if origin == "inferred":
            raise CheckpointError(f"could not infer the architecture of {path} ({'; '.join(bad)}): pass arch= "
                                  "(an open_clip model name) or add a JSON sidecar with the model config")
        try:
            held = cf.describe_cfg(cf.infer_model_cfg(cf.flat_text_layout(sd), path))
        except CheckpointError:
            held = "another architecture"
        raise CheckpointError(f"{path} does not fit {origin}: the file holds {held}, but {origin} describes "
                              f"{cf.describe_cfg(cfg)} ({'; '.join(bad)})")
    model = cf.build_model(cfg, cast_dtype=cast)
    model.load_state_dict(sd, strict=True)
    if precision != "fp32":
        convert_weights_to_lp(model, dtype=dtype)
    model.to(dev)
    stat = path.stat()
    act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
    identity = f"{name}@{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{precision}:{act}"
    clip = ClipModel(model, name, cfg, mean=mean, std=std, dtype=dtype, source=str(path), identity=identity)
    clip.act_source = act_source
    return clip


def _load_hub(spec: str, dev: torch.device, precision: str) -> ClipModel:
    """Explicitly requested open_clip pretrained weights (may download, or use open_clip's cache)."""
    import open_clip

    if spec.startswith("hf-hub:"):
        name, tag = spec, None
    else:
        name, tag = spec.split(":", 1)
        name = name.replace("/", "-")
    try:
        model = open_clip.create_model(name, pretrained=tag, precision=precision, device=dev, require_pretrained=True)
    except Exception as exc:  # noqa: BLE001 - open_clip raises RuntimeError/OSError/HTTP errors alike
        tags = open_clip.list_pretrained_tags_by_model(name) if tag is not None else []
        known = f" Known tags for {name}: {', '.join(tags)}." if tags else ""
        raise CheckpointError(
            f"could not load open_clip's pretrained weights {spec!r}: {str(exc).splitlines()[0][:300]}.{known} "
            "Downloading needs network access (or open_clip's cache); otherwise pass a local checkpoint file."
        ) from exc
    cfg = (open_clip.get_model_config(name) if tag is not None else None) or {}
    pp = open_clip.get_model_preprocess_cfg(model)
    return ClipModel(model, name, cfg, mean=pp.get("mean", CLIP_MEAN), std=pp.get("std", CLIP_STD),
                     dtype=PRECISIONS[precision], source=spec, identity=f"{spec}:{precision}")


def save_clip(path, model, model_cfg: dict, name: str, mean=None, std=None) -> None:
    """Save a CLIP as safetensors + JSON sidecar {"kind": "clip", "name", "model_cfg"} that `load_clip` reads."""
    from wsclip.io import save_checkpoint

    module = model.model if isinstance(model, ClipModel) else model
    meta = {"kind": "clip", "name": name, "model_cfg": model_cfg}
    if mean is not None:
        meta["mean"] = [float(m) for m in mean]
    if std is not None:
        meta["std"] = [float(s) for s in std]
    save_checkpoint(path, module.state_dict(), meta)


# ============================================================================ helpers
def _device(device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WsclipError(f"device {device!r} requested but CUDA is not available here: use device='cpu'")
    return dev


def _is_hub_spec(spec: str) -> bool:
    if spec.startswith("hf-hub:"):
        return True
    if ":" not in spec:
        return False
    import open_clip

    name = spec.split(":", 1)[0].replace("/", "-")
    return name in open_clip.list_models()


def _missing_message(spec: str) -> str:
    import open_clip

    if spec.replace("/", "-") in open_clip.list_models():
        tags = open_clip.list_pretrained_tags_by_model(spec.replace("/", "-"))
        hint = f" (e.g. '{spec}:{tags[0]}')" if tags else ""
        return (f"CLIP checkpoint not found: {spec} is no file. To let open_clip download its pretrained weights, "
                f"name a tag{hint}; otherwise give the path of a local .pt/.bin/.safetensors file")
    return f"CLIP checkpoint not found: {spec} (give the path of a .pt, .bin or .safetensors file, or open_clip's name:tag)"


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or "model_cfg" not in data:
        return None
    return data


def _read_sidecar(path: Path) -> dict | None:
    """The wsclip sidecar next to `path` (same stem, .json) when it describes a CLIP; None when absent."""
    from wsclip.io import sidecar_path

    side = sidecar_path(path)
    if not side.is_file() or side == path:
        return None
    try:
        data = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{side} is not valid JSON ({exc}); fix or delete it") from exc
    if not isinstance(data, dict):
        return None
    kind = data.get("kind")
    if kind is not None and kind != "clip":
        raise CheckpointError(f"{path} is a '{kind}' checkpoint (per {side.name}), expected a 'clip' checkpoint")
    if "model_cfg" not in data:
        if "act" in data:  # states the activation only; the architecture is inferred
            return data
        if kind == "clip":
            raise CheckpointError(f"{side} lacks 'model_cfg' (the open_clip config with embed_dim, vision_cfg, text_cfg)")
        return None
    return data


def _weights_for_sidecar(side: Path) -> Path:
    for suffix in _WEIGHT_SUFFIXES:
        cand = side.with_suffix(suffix)
        if cand.is_file():
            return cand
    raise MissingFileError(f"{side} is a JSON file; no weights next to it ({side.stem} with one of {', '.join(_WEIGHT_SUFFIXES)})")


def _resolve_dir(folder: Path) -> tuple[Path, dict | None]:
    """The weights file in a folder (Hugging Face / open_clip layout) and its open_clip_config.json, if any."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES]
    if not files:
        raise MissingFileError(f"no CLIP weights in folder {folder} (expected e.g. open_clip_model.safetensors)")
    by_name = {p.name: p for p in files}
    chosen = next((by_name[n] for n in _DIR_PREFERENCE if n in by_name), None)
    if chosen is None:
        if len(files) > 1:
            raise CheckpointError(f"{folder} holds several weight files ({', '.join(sorted(by_name))}): name one")
        chosen = files[0]
    return chosen, _read_json(folder / "open_clip_config.json")


def _custom_name(cfg: dict) -> str:
    v = cfg["vision_cfg"]
    if isinstance(v.get("layers"), (list, tuple)):
        return f"custom-RN{'-'.join(str(n) for n in v['layers'])}-w{v['width']}"
    return f"custom-ViT-w{v['width']}-l{v['layers']}-p{v['patch_size']}-s{v['image_size']}"


def _make_tokenizer(name: str, model_cfg: dict, context_length: int):
    import open_clip
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    text_cfg = model_cfg.get("text_cfg", {}) if model_cfg else {}
    if name.startswith("hf-hub:") or (name in open_clip.list_models()
                                      and (text_cfg.get("hf_tokenizer_name") or "siglip" in name.lower())):
        return open_clip.get_tokenizer(name, context_length=context_length)
    if text_cfg.get("hf_tokenizer_name"):
        return HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length,
                           **(text_cfg.get("tokenizer_kwargs") or {}))
    return SimpleTokenizer(context_length=context_length, **(text_cfg.get("tokenizer_kwargs") or {}))
