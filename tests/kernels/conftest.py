"""Kernel tests: every kernel output buffer starts as NaN, so unwritten elements fail the comparison."""

import pytest


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    from wsclip.kernels import _dispatch

    monkeypatch.setattr(_dispatch, "POISON", True)
    yield
