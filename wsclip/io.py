"""Files: atomic writes, images, masks, and checkpoints (safetensors + JSON sidecar)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from wsclip.errors import BadFileError, CheckpointError, MissingFileError

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write bytes so that readers see either the old file or the whole new one."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def cache_dir() -> Path:
    """wsclip's cache folder: $WSCLIP_CACHE, else $XDG_CACHE_HOME/wsclip, else ~/.cache/wsclip."""
    if os.environ.get("WSCLIP_CACHE"):
        return Path(os.environ["WSCLIP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wsclip"


# ----------------------------------------------------------------------------- images and masks
def read_image(path: PathLike) -> np.ndarray:
    """Read an image file as RGB uint8 (H, W, 3); a missing or corrupt file is a clear error."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadFileError(f"cannot decode image {path}: {exc}. Re-export or remove the file.") from exc


def decode_image_bytes(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """Decode image bytes as RGB uint8; refuses truncated data and images above max_pixels."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadFileError("empty image data")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise BadFileError(
                    f"image is {im.width}x{im.height} = {im.width * im.height} pixels, above the limit of {max_pixels}"
                )
            im.load()
            return np.asarray(im.convert("RGB"))
    except BadFileError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadFileError(f"cannot decode image: {exc}") from exc


def read_mask(path: PathLike) -> np.ndarray:
    """Read a label mask PNG (palette or grey) as uint8 (H, W) class indices."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"mask not found: {path}")
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise BadFileError(f"{path} is a {im.mode} image, expected a palette or greyscale label mask")
            return np.asarray(im).astype(np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise BadFileError(f"cannot decode mask {path}: {exc}") from exc


def voc_palette() -> list[int]:
    """The standard PASCAL VOC colour map as a flat list of 768 ints (255 = white-ish ignore)."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def encode_mask_png(mask: np.ndarray) -> bytes:
    """Encode a uint8 (H, W) label mask as a palette PNG (deterministic bytes)."""
    from PIL import Image

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette(voc_palette())
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def write_mask(path: PathLike, mask: np.ndarray) -> None:
    """Write a palette PNG mask atomically."""
    atomic_write_bytes(path, encode_mask_png(mask))


# ----------------------------------------------------------------------------- checkpoints
def file_sha256(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sidecar_path(path: PathLike) -> Path:
    path = Path(path)
    return path.with_suffix(".json")


def save_checkpoint(path: PathLike, tensors: dict, meta: dict) -> None:
    """Save tensors as safetensors and `meta` (architecture, classes, version...) as a JSON sidecar."""
    import torch
    from safetensors.torch import save_file

    from wsclip import __version__

    path = Path(path)
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    meta = {"wsclip_version": __version__, **meta}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata={"format": "pt"})
    atomic_write_json(sidecar_path(path), meta)


def load_checkpoint(path: PathLike, expect_kind: str | None = None) -> tuple[dict, dict]:
    """Load (tensors, meta) saved by save_checkpoint; checks the sidecar's `kind` when given."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}")
    side = sidecar_path(path)
    if not side.is_file():
        raise CheckpointError(f"{path}: its JSON sidecar {side.name} is missing; it holds the architecture and classes")
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{side} is not valid JSON: {exc}") from exc
    if expect_kind is not None and meta.get("kind") != expect_kind:
        raise CheckpointError(
            f"{path} is a '{meta.get('kind')}' checkpoint, expected '{expect_kind}'"
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    return tensors, meta
