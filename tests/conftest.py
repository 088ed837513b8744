"""Shared fixtures. TRITON_INTERPRET must be set before any Triton kernel is imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WSCLIP_NO_PROGRESS", "1")
if "WSCLIP_CACHE" not in os.environ:  # `--backend auto` remembers its choices there: not in the user's cache
    import tempfile

    os.environ["WSCLIP_CACHE"] = tempfile.mkdtemp(prefix="wsclip-test-cache-")

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


@pytest.fixture()
def one_thread():
    """PyTorch on one CPU thread for the test (modules opt in with `pytestmark = pytest.mark.usefixtures`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


@pytest.fixture(scope="session")
def tiny_vit_clip(tmp_path_factory) -> Path:
    """A tiny random open_clip ViT CLIP (patch 8, 3 blocks) saved as safetensors + sidecar."""
    from job_helpers import tiny_vit_clip as make_tiny_vit_clip

    return make_tiny_vit_clip(tmp_path_factory.mktemp("tiny_vit_clip") / "clip.safetensors")
