"""Errors a user can cause. The CLI prints them as one line and exits 2, without a traceback."""

from __future__ import annotations


class WsclipError(Exception):
    """Base class: a mistake in the user's input, files or setup, with what to do next."""


class MissingFileError(WsclipError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class BadFileError(WsclipError, ValueError):
    """A file exists but is corrupt, truncated or of the wrong kind."""


class ImageTooLargeError(BadFileError):
    """An image whose header declares more pixels than the limit (a decompression bomb or a huge scan)."""


class DatasetLayoutError(WsclipError, ValueError):
    """A dataset folder does not have the expected layout."""


class UnknownClassError(WsclipError, KeyError):
    """A class name that is not in the dataset's vocabulary."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class CheckpointError(WsclipError, ValueError):
    """A checkpoint is missing, corrupt, or was saved for another architecture."""


class MissingExtraError(WsclipError, ImportError):
    """An optional dependency is needed for the requested feature."""

    def __init__(self, package: str, extra: str, feature: str):
        super().__init__(
            f"{feature} needs the '{package}' package: install it with "
            f"`pip install 'wsclip[{extra}]'`"
        )
        self.package = package
        self.extra = extra


class ShapeError(WsclipError, ValueError):
    """Inputs whose shapes do not fit together."""


class BackendError(WsclipError, ValueError):
    """A compute backend that does not exist or cannot run these tensors here."""


def require(module: str, extra: str, feature: str):
    """Import an optional module or raise MissingExtraError naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtraError(module.split(".")[0], extra, feature) from exc
