"""The PyTorch modules that get exported, each built from a checkpoint plus options.

Every exportable module has `input_names`, `output_names`, `run(x, labels=None)` (numpy dict
out), `config()` (what the sidecar records so parity can rebuild it) and is described by a
`ModelSpec`: example inputs for tracing, symbolic shapes, and which axes may be dynamic.

    camnet      CamLabeler (wsclip.label.cam_labeler): uint8/float images -> cams, mask
    clip-image  ClipImageEncoder: images at the CLIP input size -> L2-normalised embeddings
    clip-text   ClipTextEncoder: int32 tokens (B, context_length) -> L2-normalised embeddings
    seg         SegLabeler (wsclip.label.seg_labeler): images -> probs, mask
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from wsclip.errors import ShapeError, WsclipError
from wsclip.label.cam_labeler import NormalizeImages, as_image_batch

MODELS = ("camnet", "clip-image", "clip-text", "seg")
INPUT_DTYPES = {"uint8": torch.uint8, "float32": torch.float32}


class _EncoderRun:
    """`run()` for single-input encoders: numpy/torch in, {"embeddings": float32 (B, D)} out."""

    output_names = ("embeddings",)

    def run(self, x, labels=None) -> dict[str, np.ndarray]:
        dev = next(self.parameters()).device
        x = self.prepare(x).to(dev)
        with torch.inference_mode():
            out = self(x)
        return {"embeddings": out.float().cpu().numpy()}


class ClipImageEncoder(_EncoderRun, nn.Module):
    """uint8 or [0, 1] float (B, 3, S, S) -> CLIP normalisation -> open_clip visual tower -> (B, D)."""

    input_names = ("images",)

    def __init__(self, clip_model: nn.Module, mean, std, image_hw: tuple[int, int], normalize: bool = True):
        super().__init__()
        self.visual = clip_model.visual.eval()
        self.normalize_pixels = NormalizeImages(mean, std)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.image_hw = tuple(int(s) for s in image_hw)
        self.l2 = bool(normalize)
        self.classes: tuple[str, ...] = ()

    def prepare(self, x):
        x = as_image_batch(x)
        if tuple(x.shape[-2:]) != self.image_hw:
            raise ShapeError(f"this CLIP image encoder takes {self.image_hw[0]}x{self.image_hw[1]} images, got "
                             f"{x.shape[-2]}x{x.shape[-1]}: resize them first")
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.visual(self.normalize_pixels(images))
        return F.normalize(feats, dim=-1) if self.l2 else feats

    def config(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std), "image_size": list(self.image_hw), "l2_normalize": self.l2}


class ClipTextEncoder(_EncoderRun, nn.Module):
    """int32 token ids (B, L) -> open_clip `encode_text` -> (B, D)."""

    input_names = ("tokens",)

    def __init__(self, clip_model: nn.Module, context_length: int, normalize: bool = True):
        super().__init__()
        self.clip = clip_model.eval()
        self.context_length = int(context_length)
        self.l2 = bool(normalize)
        self.classes: tuple[str, ...] = ()

    def prepare(self, x):
        t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
        if t.dim() == 1:
            t = t[None]
        if t.dim() != 2 or t.shape[1] != self.context_length or t.is_floating_point():
            raise ShapeError(f"tokens must be integer (B, {self.context_length}), got {tuple(t.shape)} {t.dtype}")
        return t.to(torch.int32)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(tokens, normalize=self.l2)

    def config(self) -> dict:
        return {"context_length": self.context_length, "l2_normalize": self.l2}


# ============================================================================ specs
@dataclass
class ModelSpec:
    """How to trace one model: example inputs and the symbolic shape of every input and output."""

    model: str
    module: nn.Module
    inputs: dict[str, tuple]   # name -> shape with str for symbolic axes
    outputs: dict[str, tuple]
    dtypes: dict[str, str]     # name -> numpy dtype name
    meta: dict                 # classes, normalisation, tokenizer ... for the sidecar

    def example_inputs(self, batch: int, hw: tuple[int, int] | None) -> tuple[torch.Tensor, ...]:
        """Random example inputs with the given batch (and H, W where symbolic)."""
        g = torch.Generator().manual_seed(0)
        out = []
        for name, shape in self.inputs.items():
            dims = []
            for d in shape:
                if d == "batch":
                    dims.append(batch)
                elif d in ("height", "width"):
                    dims.append(hw[0] if d == "height" else hw[1])
                else:
                    dims.append(int(d))
            dt = self.dtypes[name]
            if dt == "uint8":
                out.append(torch.randint(0, 256, dims, generator=g, dtype=torch.uint8))
            elif dt == "int32":
                out.append(torch.randint(0, 49407, dims, generator=g, dtype=torch.int32))
            elif name == "labels":
                out.append((torch.rand(dims, generator=g) > 0.5).float())
            else:
                out.append(torch.rand(dims, generator=g))
        return tuple(out)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx legacy-exporter dynamic axes from the symbolic dims."""
        axes = {}
        for name, shape in {**self.inputs, **self.outputs}.items():
            sym = {i: d for i, d in enumerate(shape) if isinstance(d, str)}
            if sym:
                axes[name] = sym
        return axes


def _image_shape(dynamic_hw: bool, hw: tuple[int, int]) -> tuple:
    return ("batch", 3, "height", "width") if dynamic_hw else ("batch", 3, int(hw[0]), int(hw[1]))


def _spatial(dynamic_hw: bool, hw: tuple[int, int]) -> tuple:
    return ("height", "width") if dynamic_hw else (int(hw[0]), int(hw[1]))


def _camnet_spec(checkpoint, *, dynamic_hw=True, hw=(512, 512), input_dtype="uint8", **options) -> ModelSpec:
    from wsclip.label.cam_labeler import load_cam_labeler

    lab = load_cam_labeler(checkpoint, **options)
    if lab.preprocess != "tensor":
        from wsclip.errors import WsclipError

        raise WsclipError("an exported CAM labeler resizes on the device (preprocess 'tensor'); the official "
                          "PIL-bicubic path (--compat official) runs in PyTorch only")
    k = len(lab.classes)
    return ModelSpec(
        "camnet", lab,
        inputs={"images": _image_shape(dynamic_hw, hw), "labels": ("batch", k)},
        outputs={"cams": ("batch", k, *_spatial(dynamic_hw, hw)), "mask": ("batch", *_spatial(dynamic_hw, hw))},
        dtypes={"images": input_dtype, "labels": "float32", "cams": "float32", "mask": "int64"},
        meta={**lab.config(), "normalisation": _norm(lab.mean, lab.std, input_dtype)},
    )


def _norm(mean, std, input_dtype) -> dict:
    return {"mean": list(mean), "std": list(std), "input_scale": 1 / 255 if input_dtype == "uint8" else 1.0,
            "in_graph": True, "formula": "(x * input_scale - mean) / std"}


def _load_clip(checkpoint):
    from wsclip.models.clip import load_clip

    return load_clip(checkpoint, device="cpu", precision="fp32")


def _clip_image_spec(checkpoint, *, dynamic_hw=False, hw=None, input_dtype="float32", normalize=True) -> ModelSpec:
    clip = _load_clip(checkpoint)
    if dynamic_hw:
        raise WsclipError("the CLIP image encoder has a fixed input size (its positional embedding and attention "
                          f"pooling are sized for {clip.image_hw[0]}x{clip.image_hw[1]}): export it without --dynamic-hw")
    if hw is not None and tuple(hw) != tuple(clip.image_hw):
        raise ShapeError(f"{clip.name} takes {clip.image_hw[0]}x{clip.image_hw[1]} images; --size {hw[0]}x{hw[1]} "
                         "does not fit: leave --size out")
    enc = ClipImageEncoder(clip.model, clip.mean, clip.std, clip.image_hw, normalize)
    return ModelSpec(
        "clip-image", enc,
        inputs={"images": ("batch", 3, *clip.image_hw)}, outputs={"embeddings": ("batch", clip.embed_dim)},
        dtypes={"images": input_dtype, "embeddings": "float32"},
        meta={**enc.config(), "clip_name": clip.name, "embed_dim": clip.embed_dim,
              "normalisation": _norm(clip.mean, clip.std, input_dtype)},
    )


def _clip_text_spec(checkpoint, *, dynamic_hw=False, hw=None, input_dtype=None, normalize=True) -> ModelSpec:
    clip = _load_clip(checkpoint)
    if dynamic_hw:
        raise WsclipError("--dynamic-hw does not apply to the CLIP text encoder (its input is tokens)")
    enc = ClipTextEncoder(clip.model, clip.context_length, normalize)
    return ModelSpec(
        "clip-text", enc,
        inputs={"tokens": ("batch", clip.context_length)}, outputs={"embeddings": ("batch", clip.embed_dim)},
        dtypes={"tokens": "int32", "embeddings": "float32"},
        meta={**enc.config(), "clip_name": clip.name, "embed_dim": clip.embed_dim,
              "tokenizer": f"open_clip.get_tokenizer({clip.name!r}) or wsclip.models.clip.ClipModel.tokenize, as int32"},
    )


def _seg_spec(checkpoint, *, dynamic_hw=True, hw=(513, 513), input_dtype="uint8", **options) -> ModelSpec:
    from wsclip.label.seg_labeler import load_seg_labeler

    lab = load_seg_labeler(checkpoint, **options)
    c = len(lab.classes) + 1
    return ModelSpec(
        "seg", lab,
        inputs={"images": _image_shape(dynamic_hw, hw)},
        outputs={"probs": ("batch", c, *_spatial(dynamic_hw, hw)), "mask": ("batch", *_spatial(dynamic_hw, hw))},
        dtypes={"images": input_dtype, "probs": "float32", "mask": "int64"},
        meta={**lab.config(), "normalisation": _norm(lab.mean, lab.std, input_dtype)},
    )


_BUILDERS: dict[str, Callable[..., ModelSpec]] = {
    "camnet": _camnet_spec, "clip-image": _clip_image_spec, "clip-text": _clip_text_spec, "seg": _seg_spec,
}
_DEFAULT_DYNAMIC_HW = {"camnet": True, "clip-image": False, "clip-text": False, "seg": True}
_DEFAULT_INPUT = {"camnet": "uint8", "clip-image": "float32", "clip-text": None, "seg": "uint8"}


def build_spec(model: str, checkpoint, *, dynamic_hw: bool | None = None, hw: Sequence[int] | None = None,
               input_dtype: str | None = None, **options) -> ModelSpec:
    """Build the module for `model` (one of MODELS) from `checkpoint`, with its tracing spec."""
    if model not in _BUILDERS:
        raise WsclipError(f"unknown model '{model}': use one of {', '.join(MODELS)}")
    if not Path(checkpoint).exists():
        from wsclip.errors import MissingFileError

        raise MissingFileError(f"checkpoint not found: {checkpoint}")
    dyn = _DEFAULT_DYNAMIC_HW[model] if dynamic_hw is None else bool(dynamic_hw)
    kw = dict(dynamic_hw=dyn, **options)
    if model != "clip-text":
        dt = input_dtype or _DEFAULT_INPUT[model]
        if dt not in INPUT_DTYPES:
            raise WsclipError(f"unknown input dtype '{dt}': use uint8 or float32")
        kw["input_dtype"] = dt
    if hw is not None:
        kw["hw"] = tuple(int(s) for s in hw)
    return _BUILDERS[model](checkpoint, **kw)


def spec_from_sidecar(side: dict, checkpoint) -> ModelSpec:
    """Rebuild the exported PyTorch module from an artefact's sidecar and the source checkpoint."""
    model, cfg = side["model"], dict(side.get("config", {}))
    options: dict = {"dynamic_hw": side.get("dynamic_hw"), "input_dtype": side["inputs"][0]["dtype"]}
    if model in ("camnet", "seg"):
        for key in ("bg_threshold", "scales", "flip", "eps", "mean", "std"):
            if key in cfg:
                options[key] = tuple(cfg[key]) if isinstance(cfg[key], list) else cfg[key]
        if not options["dynamic_hw"]:
            options["hw"] = tuple(side["inputs"][0]["shape"][2:])
    elif model in ("clip-image", "clip-text"):
        options["normalize"] = cfg.get("l2_normalize", True)
        if model == "clip-text":
            options.pop("input_dtype")
    return build_spec(model, checkpoint, **options)
