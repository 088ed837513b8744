"""Tiny random models and their ONNX exports, shared by the export tests (built once per session)."""

from __future__ import annotations

import pytest
import torch

from export_helpers import VIT_CFG, randomize_bn, tiny_clip  # noqa: E402


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="session")
def cam_ckpt(export_dir):
    from wsclip.models.camnet import build_camnet, save_camnet
    from wsclip.vocab import VOC_CLASSES

    torch.manual_seed(0)
    path = export_dir / "cam.safetensors"
    save_camnet(path, randomize_bn(build_camnet("tiny", len(VOC_CLASSES))), VOC_CLASSES)
    return path


@pytest.fixture(scope="session")
def cam_onnx(cam_ckpt, export_dir):
    from wsclip.export.onnx import export_onnx

    path = export_dir / "cam.onnx"
    export_onnx("camnet", cam_ckpt, path, batch=2, hw=(64, 64))
    return path


@pytest.fixture(scope="session")
def clip_ckpt(export_dir):
    from wsclip.models.clip import save_clip

    path = export_dir / "clip_vit.safetensors"
    save_clip(path, tiny_clip(VIT_CFG), VIT_CFG, "tiny-vit")
    return path


@pytest.fixture(scope="session")
def clip_image_onnx(clip_ckpt, export_dir):
    from wsclip.export.onnx import export_onnx

    path = export_dir / "clip_image.onnx"
    export_onnx("clip-image", clip_ckpt, path, batch=2)
    return path


@pytest.fixture(scope="session")
def clip_text_onnx(clip_ckpt, export_dir):
    from wsclip.export.onnx import export_onnx

    path = export_dir / "clip_text.onnx"
    export_onnx("clip-text", clip_ckpt, path, batch=2)
    return path
