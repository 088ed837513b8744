"""Progress display for long jobs (tqdm); silenced by WSCLIP_NO_PROGRESS=1 or a non-TTY when asked."""

from __future__ import annotations

import os
from typing import Iterable, TypeVar

T = TypeVar("T")


def enabled() -> bool:
    return os.environ.get("WSCLIP_NO_PROGRESS", "") in ("", "0")


def progress(iterable: Iterable[T] | None = None, total: int | None = None, desc: str = "", unit: str = "it", **kw):
    """A tqdm bar (or a silent stand-in with the same methods when progress is disabled)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled(), dynamic_ncols=True, **kw)
