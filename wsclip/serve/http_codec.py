"""Decode and encode for the labeling server: a request's bytes, form and query options become an image,
its labels and the output options (ApiError 4xx where they cannot), and a labelled result becomes the
response body (a PNG mask, or JSON with COCO-style RLE annotations). No FastAPI import at module level:
the request helpers take any Starlette request."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

if TYPE_CHECKING:
    from wsclip.serve.service import _Item

FORMATS = ("png", "rle")
ACCEPTED_TYPES = ("image/", "application/octet-stream")


class ApiError(Exception):
    """An HTTP error with a JSON body {"error": message}."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


# ============================================================================ request bodies
def _read_timeout(timeout: float) -> ApiError:
    return ApiError(408, f"request body not received within {timeout:g} s", {"Connection": "close"})


async def read_body(request, timeout: float) -> bytes:
    """The raw body (408 when it is not received within `timeout` seconds)."""
    try:
        return await asyncio.wait_for(request.body(), timeout)
    except asyncio.TimeoutError:
        raise _read_timeout(timeout) from None


async def read_form(request, max_files: int, timeout: float):
    """The multipart form (408 after `timeout` seconds, 413 for more than `max_files` files)."""
    from starlette.exceptions import HTTPException  # what Request.form raises (FastAPI's is a subclass)

    try:
        return await asyncio.wait_for(request.form(max_files=max_files, max_fields=16), timeout)
    except asyncio.TimeoutError:
        raise _read_timeout(timeout) from None
    except HTTPException as exc:  # Starlette's multipart parser stops at max_files with a 400
        if exc.status_code == 400 and "too many files" in str(exc.detail).lower():
            raise ApiError(413, f"more than {max_files} images in one request; send at most {max_files}") from None
        raise


def form_or_query(form, query) -> Callable[[str], str | None]:
    """An option getter: the form's text field of that name, else the query parameter."""
    def get(name):
        v = form.get(name)
        return v if isinstance(v, str) else query.get(name)
    return get


def check_type(ctype: str | None, what: str) -> None:
    """415 unless `ctype` is an image type (or application/octet-stream)."""
    ctype = (ctype or "").split(";")[0].strip().lower()
    if not ctype.startswith(ACCEPTED_TYPES):
        raise ApiError(415, f"{what} has content type '{ctype or 'none'}'; send an image (image/jpeg, image/png, ...)")


# ============================================================================ decoding
def decode_upload(data: bytes, max_pixels: int) -> np.ndarray:
    """RGB uint8 (H, W, 3) of uploaded bytes (wsclip.io.open_image): ApiError 413 when the header declares
    more than max_pixels (checked before decoding), 400 for anything else that is not a decodable image."""
    from wsclip.errors import BadFileError, ImageTooLargeError
    from wsclip.io import open_image

    if not data:
        raise ApiError(400, "empty request body: send the image bytes")
    try:
        return open_image(data, max_pixels=max_pixels)
    except ImageTooLargeError as exc:
        raise ApiError(413, str(exc)) from None
    except BadFileError as exc:
        raise ApiError(400, f"{exc} (JPEG, PNG, WebP, BMP, TIFF, GIF)") from None


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


def parse_batch_labels(text: str | None, n: int) -> list:
    """One labels entry per image from a JSON list of n entries; n Nones (all predicted) when absent."""
    if not text:
        return [None] * n
    try:
        per_image = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(422, f"labels must be a JSON list with one entry per image ({exc})") from None
    if not isinstance(per_image, list) or len(per_image) != n:
        raise ApiError(422, f"labels must be a JSON list with {n} entries (one per image)")
    return per_image


def parse_options(get: Callable[[str], str | None], default_format: str, labeler) -> tuple[str, bool]:
    """(format, run the CRF) from the options format / refine / method, checked against the loaded labeler."""
    fmt = (get("format") or default_format).lower()
    if fmt == "json":
        fmt = "rle"
    if fmt not in FORMATS:
        raise ApiError(422, f"format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    refine = (get("refine") or "default").lower()
    if refine not in ("default", "none", "crf"):
        raise ApiError(422, f"refine must be none or crf, got '{refine}'")
    if refine == "crf" and labeler.refine != "crf":
        raise ApiError(422, "this server was started without --refine crf: CRF refinement is not available")
    method = (get("method") or "auto").lower()
    if method not in ("auto", labeler.method):
        raise ApiError(422, f"this server runs the '{labeler.method}' method, not '{method}'")
    return fmt, refine != "none" and labeler.refine == "crf"


# ============================================================================ encoding
def render(item: _Item, result, fmt: str, classes: Sequence[str], method: str, for_json: bool = False):
    """(body bytes or dict, media type, headers) of one labelled image; runs the CRF when asked."""
    from wsclip.io import encode_mask_png
    from wsclip.serve.labelers import mask_annotations, refine_result

    if item.crf:
        result = refine_result(item.image, result)
    mask = result.mask
    names = [classes[int(k)] for k in result.keys]
    if fmt == "png":
        png = encode_mask_png(mask)
        if for_json:
            return {"mask_png_base64": base64.b64encode(png).decode("ascii"), "labels": names,
                    "predicted": bool(result.predicted)}, None, None
        headers = {"X-Wsclip-Labels": ",".join(names), "X-Wsclip-Predicted": str(bool(result.predicted)).lower()}
        return png, "image/png", headers
    body = {"height": int(mask.shape[0]), "width": int(mask.shape[1]), "method": method, "labels": names,
            "label_ids": [int(k) + 1 for k in result.keys], "predicted": bool(result.predicted),
            "annotations": mask_annotations(mask, classes)}
    return body, "application/json", {}
