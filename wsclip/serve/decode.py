"""Server side, decode: request bytes and options into an image, labels and settings (ApiError on bad input)."""

from __future__ import annotations

import io
import json
from typing import Sequence

import numpy as np

FORMATS = ("png", "rle")
ACCEPTED_TYPES = ("image/", "application/octet-stream")


class ApiError(Exception):
    """An HTTP error with a JSON body {"error": message}."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def decode_upload(data: bytes, max_pixels: int) -> np.ndarray:
    """RGB uint8 (H, W, 3) of uploaded bytes: ApiError 400 (not an image, truncated, empty) or 413 (too many pixels)."""
    from PIL import Image, UnidentifiedImageError

    from wsclip.errors import BadFileError
    from wsclip.io import decode_image_bytes

    if not data:
        raise ApiError(400, "empty request body: send the image bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Image.DecompressionBombError as exc:
        raise ApiError(413, f"image dimensions too large ({exc})") from None
    except UnidentifiedImageError:
        raise ApiError(400, "not an image format the server can decode (JPEG, PNG, WebP, BMP, TIFF, GIF)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ApiError(400, f"not a decodable image: {exc}") from None
    if w * h > max_pixels:
        raise ApiError(413, f"image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels}")
    try:
        return decode_image_bytes(data, max_pixels=max_pixels)
    except BadFileError as exc:
        raise ApiError(400, str(exc)) from None


def parse_labels(text, classes: Sequence[str]) -> np.ndarray | None:
    """(K,) 0/1 from 'cat,dog', '8,12' (1-based indices), a JSON list, or None/'' (unknown: predicted)."""
    if text is None:
        return None
    if isinstance(text, str):
        text = text.strip()
        if not text:
            return None
        if text.startswith("["):
            try:
                text = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ApiError(422, f"labels: invalid JSON list ({exc})") from None
        else:
            text = [t.strip() for t in text.split(",") if t.strip()]
    if not isinstance(text, list):
        raise ApiError(422, "labels must be class names or 1-based class indices, comma-separated or a JSON list")
    y = np.zeros(len(classes), np.float32)
    for v in text:
        if isinstance(v, str) and v.isdigit():
            v = int(v)
        if isinstance(v, int) and not isinstance(v, bool):
            if not 1 <= v <= len(classes):
                raise ApiError(422, f"class index {v} is out of range 1..{len(classes)}")
            y[v - 1] = 1
        elif isinstance(v, str) and v in classes:
            y[list(classes).index(v)] = 1
        else:
            raise ApiError(422, f"unknown class {v!r}; known classes: {', '.join(classes)}")
    return y


def check_type(ctype: str | None, what: str) -> None:
    """415 unless the content type is an image (or octet-stream)."""
    ctype = (ctype or "").split(";")[0].strip().lower()
    if not ctype.startswith(ACCEPTED_TYPES):
        raise ApiError(415, f"{what} has content type '{ctype or 'none'}'; send an image (image/jpeg, image/png, ...)")


def parse_options(get, lab, default_format: str) -> tuple[str, bool]:
    """(format, run the CRF) from request options (`get(name)`), checked against the loaded labeler `lab`."""
    fmt = (get("format") or default_format).lower()
    if fmt == "json":
        fmt = "rle"
    if fmt not in FORMATS:
        raise ApiError(422, f"format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    refine = (get("refine") or "default").lower()
    if refine not in ("default", "none", "crf"):
        raise ApiError(422, f"refine must be none or crf, got '{refine}'")
    if refine == "crf" and lab.refine != "crf":
        raise ApiError(422, "this server was started without --refine crf: CRF refinement is not available")
    method = (get("method") or "auto").lower()
    if method not in ("auto", lab.method):
        raise ApiError(422, f"this server runs the '{lab.method}' method, not '{method}'")
    return fmt, refine != "none" and lab.refine == "crf"
