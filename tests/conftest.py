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
