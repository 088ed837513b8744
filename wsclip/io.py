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
def _read_umask() -> int:
    """The process umask (read once at import: os.umask can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def file_mode() -> int:
    """Mode of every file wsclip writes: what open() would give (0o644 under umask 022), not mkstemp's 0o600."""
    return 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto `path` only on success.

    The file gets the umask's mode (file_mode()) before the rename, whatever wrote it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, file_mode())
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


def read_json(path: PathLike, error=BadFileError, hint: str = ""):
    """The JSON value in file `path`; text that is not JSON (or not UTF-8) raises `error` naming the
    file, with `hint` (what to do) appended."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc})" + (f"; {hint}" if hint else "")) from None


def cache_dir() -> Path:
    """wsclip's cache folder: $WSCLIP_CACHE, else $XDG_CACHE_HOME/wsclip, else ~/.cache/wsclip."""
    if os.environ.get("WSCLIP_CACHE"):
        return Path(os.environ["WSCLIP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wsclip"


# ----------------------------------------------------------------------------- per-item errors
ERRORS_FILE = "errors.json"


def write_errors(out_dir: PathLike, errors) -> Path:
    """<out_dir>/errors.json: [{"id", "error"}] of the images a job skipped ((id, message) pairs or a dict)."""
    items = errors.items() if isinstance(errors, dict) else errors
    path = Path(out_dir) / ERRORS_FILE
    atomic_write_json(path, [{"id": str(i), "error": str(m)} for i, m in items])
    return path


def read_errors(out_dir: PathLike) -> dict[str, str]:
    """{id: message} of an errors.json written by write_errors ({} when there is none or it is unreadable)."""
    path = Path(out_dir) / ERRORS_FILE
    try:
        return {str(e["id"]): str(e.get("error", "")) for e in json.loads(path.read_text())}
    except (OSError, ValueError, TypeError, KeyError):
        return {}


# ----------------------------------------------------------------------------- images and masks
#: largest image (width x height) any reader decodes; the header is checked before decoding
MAX_IMAGE_PIXELS = 100_000_000


def open_image(src, max_pixels: int | None = None) -> np.ndarray:
    """THE image decoder every reader uses: a path or bytes -> RGB uint8 (H, W, 3).

    Checks the pixel count of the header before decoding (ImageTooLargeError above `max_pixels`,
    default MAX_IMAGE_PIXELS); applies the EXIF orientation; converts every mode to RGB: alpha
    (RGBA, LA, palette transparency) is dropped, CMYK and greyscale converted, 16-bit scaled to 8
    bits. A missing file is a MissingFileError; a folder, an empty, truncated or unreadable file a
    BadFileError naming it. The format comes from the content, not the file name.
    """
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    from wsclip.errors import ImageTooLargeError

    if isinstance(src, (bytes, bytearray, memoryview)):
        name, fp = "image data", io.BytesIO(bytes(src))
        if not len(src):
            raise BadFileError("empty image data (0 bytes)")
    else:
        path = Path(src)
        name, fp = str(path), path
        if path.is_dir():
            raise BadFileError(f"{path} is a folder, not an image file")
        if not path.is_file():
            raise MissingFileError(f"image not found: {path}")
        if path.stat().st_size == 0:
            raise BadFileError(f"{path} is an empty file (0 bytes): re-export or remove it")
    limit = MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as im:
                w, h = im.size
                if w * h > limit:
                    raise ImageTooLargeError(f"{name} is {w}x{h} = {w * h} pixels, above the limit of {limit}")
                im.load()
                return _to_rgb(ImageOps.exif_transpose(im))
    except Image.DecompressionBombError as exc:  # PIL's own guard fired at open, far above `limit`
        import re

        n = re.search(r"\((\d+) pixels\)", str(exc))
        raise ImageTooLargeError(f"{name} declares {n.group(1) if n else 'too many'} pixels, above the limit "
                                 f"of {limit}") from None
    except BadFileError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadFileError(f"cannot decode {name}: {exc}. Re-export or remove the file.") from None


def _to_rgb(im) -> np.ndarray:
    """RGB uint8 of a decoded PIL image of any mode (alpha dropped, 16-bit scaled down)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im).astype(np.float64)
        a = np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8)  # 16-bit range onto 8 bits
        return np.ascontiguousarray(np.repeat(a[..., None], 3, axis=2))
    if im.mode == "F":
        a = np.asarray(im).astype(np.float64)
        a = a * 255.0 if a.size and np.nanmax(a) <= 1.0 else a
        a = np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(a[..., None], 3, axis=2))
    return np.ascontiguousarray(np.asarray(im.convert("RGB")))


def plain_jpeg(data: bytes, max_pixels: int | None = None) -> bool:
    """True when `data` is a JPEG a GPU decoder can take as is: RGB or greyscale, within the pixel
    limit, no EXIF rotation. Anything else goes through open_image (header read only here)."""
    from PIL import Image

    limit = MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
    try:
        with Image.open(io.BytesIO(data)) as im:
            orientation = im.getexif().get(0x0112, 1)
            return (im.format == "JPEG" and im.mode in ("RGB", "L") and im.width * im.height <= limit
                    and orientation in (0, 1))
    except Exception:  # noqa: BLE001 - anything odd: let open_image decide and explain
        return False


def read_image(path: PathLike) -> np.ndarray:
    """Read an image file as RGB uint8 (H, W, 3) with open_image's checks; a bad file is a clear error."""
    return open_image(Path(path))


def decode_image_bytes(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """Decode image bytes as RGB uint8 with open_image's checks (ImageTooLargeError above max_pixels)."""
    return open_image(data, max_pixels)


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


_KIND_NAMES = {"camnet": "a CAM network checkpoint", "seg": "a segmentation network checkpoint",
               "irn": "an IRN boundary network checkpoint", "clip": "a CLIP checkpoint",
               "wsclip-artefact": "an exported model (ONNX or TensorRT)"}


def describe_file(path: PathLike) -> str:
    """What a file given as a model is, in words ('a text file', 'a torchvision ResNet state dict', ...),
    from its wsclip sidecar or, without one, its first bytes; for error messages."""
    path = Path(path)
    if path.is_dir():
        return "a folder"
    if not path.is_file():
        return "missing"
    side = sidecar_path(path)
    if side.is_file() and side != path:
        try:
            kind = json.loads(side.read_text()).get("kind")
        except (ValueError, OSError, AttributeError):
            kind = None
        if kind is not None:
            return _KIND_NAMES.get(kind, f"a wsclip file of kind '{kind}'")
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        return "an empty file"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return _describe_torch_file(path)
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 27:
        return f"a safetensors file without its wsclip sidecar {side.name} (which says what network it holds)"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "a binary file of unknown format"


def _describe_torch_file(path: Path) -> str:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - anything torch.load cannot read safely
        return "a PyTorch file (torch.save) that cannot be read safely"
    if isinstance(obj, dict) and {"optimizer", "step"} <= set(obj):
        return "a training state (optimizer and step, no network weights: checkpoints/step-*/state.pt)"
    if isinstance(obj, dict) and "fc.weight" in obj and "layer4.0.conv1.weight" in obj:
        return "a torchvision ResNet state dict (ImageNet weights: `wsclip train cam --pretrained` takes it)"
    return "a PyTorch file (torch.save) without a wsclip sidecar"


def load_weights(module, tensors: dict, path: PathLike, what: str) -> None:
    """module.load_state_dict(tensors, strict=True), or a CheckpointError that says what differs."""
    own = module.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    shapes = [(k, tuple(tensors[k].shape), tuple(own[k].shape)) for k in own
              if k in tensors and tuple(tensors[k].shape) != tuple(own[k].shape)]
    parts = []
    if shapes:
        k, got, want = shapes[0]
        parts.append(f"{len(shapes)} weights of another shape (e.g. {k}: {got} in the file, {want} expected)")
    if missing:
        parts.append(f"{len(missing)} weights missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected weights (e.g. {unexpected[0]})")
    if parts:
        raise CheckpointError(f"{path} does not hold the weights of {what}: {'; '.join(parts)}. It was saved for "
                              "another architecture or class count: pass the checkpoint trained for this network")
    module.load_state_dict(tensors, strict=True)


def load_checkpoint(path: PathLike, expect_kind: str | None = None, hint: str = "") -> tuple[dict, dict]:
    """Load (tensors, meta) saved by save_checkpoint; checks the sidecar's `kind` when given (a wrong
    one is a CheckpointError that ends with `hint`: which file to pass instead)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}")
    side = sidecar_path(path)
    if not side.is_file():
        raise CheckpointError(f"{path} is {describe_file(path)}, not a wsclip checkpoint: a checkpoint is a .safetensors "
                              f"file with its JSON sidecar {side.name} (architecture and classes) beside it")
    meta = read_json(side, CheckpointError)
    if expect_kind is not None and meta.get("kind") != expect_kind:
        raise CheckpointError(f"{path} is {describe_file(path)}, not {_KIND_NAMES.get(expect_kind, expect_kind)}"
                              + (f"; {hint}" if hint else ""))
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    return tensors, meta
