"""Shared fixtures. TRITON_INTERPRET must be set before any Triton kernel is imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WSCLIP_NO_PROGRESS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

DATA = Path(__file__).parent / "data"
VOC14 = DATA / "voc12_val14"


@pytest.fixture(scope="session")
def voc14() -> Path:
    """The 14 real VOC val images (513x513) with ground truth, as shipped in tests/data."""
    return VOC14


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def bad_image_zoo(tmp_path_factory, voc14) -> Path:
    """The bad-input zoo (tests/zoo.py): awkward and broken images + labels.csv, as a folder dataset."""
    from zoo import make_zoo

    return make_zoo(tmp_path_factory.mktemp("zoo") / "photos", voc14)


@pytest.fixture(scope="session")
def voc_camnet(tmp_path_factory) -> Path:
    """A tiny random CAM network over the 20 VOC classes (safetensors + sidecar)."""
    import torch

    from wsclip.models.camnet import build_camnet, save_camnet
    from wsclip.vocab import VOC_CLASSES

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("voc_camnet") / "camnet.safetensors"
    save_camnet(path, build_camnet("tiny", len(VOC_CLASSES)), VOC_CLASSES)
    return path
