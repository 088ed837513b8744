"""Worker-process helpers shared by the CRF pools and the labeler's DataLoader."""

from __future__ import annotations

import sys


def die_with_parent(*_args) -> None:
    """Worker initializer: on Linux, ask the kernel for SIGKILL when the parent dies.

    A `kill -9` of a job then takes its DataLoader and CRF workers with it instead of leaving
    them blocked on a queue nobody reads. Extra arguments (DataLoader's worker id) are ignored.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except OSError:  # pragma: no cover - exotic libc
        pass
