"""Model kinds in one place: build / save / load / PyTorch predictor module / export spec.

A checkpoint's kind is read from its JSON sidecar ("kind") and an exported model's from its
export sidecar ("model"); `detect_kind` is the only place that does it. Functions are named as
"module:attribute" strings and imported on use, so importing the registry is cheap and the
layering holds (the registry sits beside config.py, above the stages it names).

    kind = detect_kind("runs/camnet.safetensors")        # "camnet"
    net, meta = get_kind(kind).load(path, device="cpu")
    module = get_kind(kind).predictor_module(path, device="cpu", scales=(1.0, 0.5))
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from wsclip.errors import BadFileError, CheckpointError, MissingFileError

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
EXPORT_SUFFIXES = (".onnx", *ENGINE_SUFFIXES)


def _ref(spec: str | None) -> Callable | None:
    if spec is None:
        return None
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class ModelKind:
    """One model kind: its names and where its functions live ("module:attribute")."""

    name: str                      # checkpoint sidecar "kind" and export "model"
    method: str | None             # labeling method ("cam", "seg", "clip-es"); None: not a labeler
    title: str                     # for messages
    build_fn: str | None = None
    save_fn: str | None = None
    load_fn: str | None = None
    predictor_fn: str | None = None  # PyTorch module wrapping the network for `run(images, labels)`
    spec_fn: str | None = None       # export ModelSpec builder (wsclip.export.wrappers)

    def build(self, *args, **kw):
        return _ref(self.build_fn)(*args, **kw)

    def save(self, *args, **kw):
        return _ref(self.save_fn)(*args, **kw)

    def load(self, path, device="cpu"):
        """(network, sidecar meta) of a checkpoint of this kind."""
        return _ref(self.load_fn)(path, device=device)

    def predictor_module(self, path, device="cpu", **options):
        """The PyTorch labeler module (CamLabeler / SegLabeler) around a checkpoint of this kind."""
        if self.predictor_fn is None:
            raise CheckpointError(f"a {self.title} does not label images on its own")
        return _ref(self.predictor_fn)(path, device=device, **options)


KINDS: dict[str, ModelKind] = {
    k.name: k for k in (
        ModelKind("camnet", "cam", "CAM network", "wsclip.models.camnet:build_camnet", "wsclip.models.camnet:save_camnet",
                  "wsclip.models.camnet:load_camnet", "wsclip.label.cam_labeler:load_cam_labeler", "camnet"),
        ModelKind("seg", "seg", "segmentation network", "wsclip.models.seg:build_seg_model",
                  "wsclip.models.seg:save_seg_model", "wsclip.models.seg:load_seg_model",
                  "wsclip.label.seg_labeler:load_seg_labeler", "seg"),
        ModelKind("irn", None, "IRN boundary network", "wsclip.models.irn:build_irn", "wsclip.models.irn:save_irn",
                  "wsclip.models.irn:load_irn"),
        ModelKind("clip-es", "clip-es", "CLIP model (CLIP-ES)", None, "wsclip.models.clip:save_clip",
                  "wsclip.models.clip:load_clip"),
        ModelKind("clip-image", None, "CLIP image encoder", spec_fn="clip-image"),
        ModelKind("clip-text", None, "CLIP text encoder", spec_fn="clip-text"),
    )
}
LABELER_KINDS = {k.method: k for k in KINDS.values() if k.predictor_fn is not None}  # "cam", "seg"


def get_kind(name: str) -> ModelKind:
    """The ModelKind named `name` (a kind or a method name); a CheckpointError for an unknown one."""
    if name in KINDS:
        return KINDS[name]
    for k in KINDS.values():
        if k.method == name:
            return k
    raise CheckpointError(f"unknown model kind '{name}': wsclip knows {', '.join(KINDS)}")


def is_export(path) -> bool:
    """True for an exported artefact (.onnx or a TensorRT engine)."""
    return Path(path).suffix in EXPORT_SUFFIXES


def detect_kind(path) -> str | None:
    """The kind of a checkpoint (sidecar "kind") or exported model (sidecar "model"); None when unrecorded."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"model not found: {path}")
    if is_export(path):
        from wsclip.export.onnx import read_sidecar

        return read_sidecar(path).get("model")
    from wsclip.io import sidecar_path

    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadFileError(f"{side} is not valid JSON: {exc}") from None
    return meta.get("kind") if isinstance(meta, dict) else None


def labeler_kind(path) -> ModelKind:
    """The ModelKind of a model file that labels images (CAM or segmentation network, any backend)."""
    kind = detect_kind(path)
    if kind in KINDS and KINDS[kind].predictor_fn is not None:
        return KINDS[kind]
    from wsclip.io import describe_file

    what = f"an exported '{kind}' model" if is_export(path) else describe_file(path)
    raise CheckpointError(f"{path} is {what}, not a labeler: `wsclip label` and `wsclip serve` take a CAM network or "
                          "a segmentation network (checkpoint .safetensors with its .json sidecar, .onnx or TensorRT "
                          "engine), or --method clip-es --clip FILE")
