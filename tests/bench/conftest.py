"""Benchmark tests: one torch thread (tiny models gain nothing from more, and a shared CI box loses a lot)."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every benchmark test on one thread (the `one_thread` fixture of tests/conftest.py)."""
