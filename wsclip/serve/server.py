"""`wsclip serve`: an HTTP labeling server (FastAPI + uvicorn, extra `[serve]`).

    POST /v1/label          one image: multipart field `image` (+ form fields) or a raw image body
                            (Content-Type image/*) with query parameters. Options: labels (class names or
                            1-based indices, comma-separated; else predicted), format png|rle, refine
                            none|crf, method (must match the loaded model). png -> the palette mask;
                            rle -> JSON with COCO-style RLE annotations.
    POST /v1/label/batch    multipart: several `images` files, optional `labels` (a JSON list, one entry
                            per image), format png|rle -> JSON results (PNG as base64), one status each
    GET  /health/live       200 while the process runs
    GET  /health/ready      200 once the model is loaded and warmed up; 503 while loading, draining, or
                            busy (open requests at the connection cap, or the queue full)
    GET  /metrics           Prometheus text format
    GET  /openapi.json, /docs

Without a token the server listens on loopback only (a non-loopback --host without one is refused);
with a token, /v1/* and /metrics need `Authorization: Bearer <token>` (compared in constant time),
/health/* never does (orchestrators probe it).

Errors: 400 undecodable/truncated/empty image, 401 missing or wrong bearer token (when a token is
set), 408 body not received within read_timeout_s, 413 a declared Content-Length over the limit
(answered at once) or body or image pixels over the limits (decompression
bombs included: the pixel count is checked from the header before decoding), 415 a content type
that is not an image, 422 bad options, 429 queue full and 503 not ready / draining (both with
Retry-After), 504 no result within the request timeout. Requests go through a `DynamicBatcher`;
at most `max_connections` requests are open at once (more get 503 with Retry-After, counted in the
metrics; health and metrics requests are exempt), and uvicorn's `limit_concurrency` backs that
up, so the backlog is always bounded. SIGTERM
stops accepting, marks the server not ready, finishes in-flight requests, then exits.
"""


import asyncio
import base64
import hmac
import json
import logging
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from wsclip.errors import WsclipError, require

log = logging.getLogger("wsclip.serve")

FORMATS = ("png", "rle")
ACCEPTED_TYPES = ("image/", "application/octet-stream")
PROTECTED_PREFIXES = ("/v1/", "/metrics", "/review/api/")  # with a token, /metrics needs it too; /health/* never does
DRAIN_TIMEOUT_S = 1.0  # longest wait for the rest of a body already refused with 413
LOOPBACK_NAMES = ("localhost",)


@dataclass
class ServeConfig:
    """Server settings (the CLI maps its flags onto these)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 8
    max_queue_delay_ms: float = 5.0
    max_queue: int = 64
    max_body_bytes: int = 20 * 2**20
    max_pixels: int = 36_000_000
    max_batch_items: int = 32
    request_timeout_s: float = 30.0
    read_timeout_s: float = 30.0
    token: str | None = None
    retry_after_s: int = 1
    warmup_hw: tuple[int, int] = (64, 64)
    graceful_timeout_s: int = 30
    max_connections: int | None = None   # open requests at once (default: 2 * max_queue + 32)
    exit_on_load_failure: bool = True    # a server whose model cannot load exits (else: stays up, not ready)
    review: str | None = None            # a labelled folder whose review page is mounted under /review


class ApiError(Exception):
    """An HTTP error with a JSON body {"error": message}."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


# ============================================================================ image decoding
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


# ============================================================================ the service
@dataclass
class _Item:
    image: np.ndarray
    labels: np.ndarray | None
    crf: bool


class Metrics:
    """Prometheus metrics in a registry of their own (several apps may live in one process)."""

    def __init__(self, svc: "Service"):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("wsclip_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.latency = Histogram("wsclip_request_latency_seconds", "request latency", ["endpoint"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.batch_size = Histogram("wsclip_batch_size", "images per model batch", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.batch_latency = Histogram("wsclip_batch_latency_seconds", "model time per batch", registry=r)
        self.images = Counter("wsclip_images", "images labelled", registry=r)
        g = Gauge("wsclip_queue_depth", "requests waiting for the model", registry=r)
        g.set_function(lambda: svc.batcher.depth if svc.batcher is not None else 0)
        g = Gauge("wsclip_images_per_second", "images labelled per second over the last 10 s", registry=r)
        g.set_function(svc.images_per_second)
        g = Gauge("wsclip_ready", "1 when the model is loaded, warmed up, not draining and not busy", registry=r)
        g.set_function(lambda: float(svc.ready and svc.busy is None))
        self.gpu = Gauge("wsclip_gpu_memory_bytes", "GPU memory of this process (CUDA only)", ["kind"], registry=r)
        for kind in ("allocated", "reserved"):
            self.gpu.labels(kind).set_function(lambda kind=kind: svc.gpu_memory(kind))


class Service:
    """The model, its batcher, readiness and metrics behind one app."""

    def __init__(self, labeler_or_cfg, cfg: ServeConfig):
        self.cfg = cfg
        self._source = labeler_or_cfg
        self.labeler = None
        self.batcher = None
        self.loaded = False
        self.draining = False
        self.error: str | None = None
        self.on_fatal = None
        self.open_requests = 0  # label requests in progress (the guard counts them against connection_cap)
        self._done: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        self.metrics = Metrics(self)

    @property
    def ready(self) -> bool:
        return self.loaded and not self.draining and self.error is None

    @property
    def busy(self) -> str | None:
        """Why the server cannot take more work now (connections or queue full), else None."""
        if self.open_requests >= connection_cap(self.cfg):
            return f"{self.open_requests} requests open, the limit is {connection_cap(self.cfg)}"
        if self.batcher is not None and self.batcher.depth >= self.cfg.max_queue:
            return f"{self.batcher.depth} requests queued, the limit is {self.cfg.max_queue}"
        return None

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> None:
        """Load the labeler, warm it up, start the batcher (runs in a background thread)."""
        from wsclip.serve.batcher import DynamicBatcher
        from wsclip.serve.labelers import Labeler, load_labeler

        try:
            lab = self._source if isinstance(self._source, Labeler) else load_labeler(self._source)
            lab.warmup(tuple(self.cfg.warmup_hw))
            self.labeler = lab
            self.batcher = DynamicBatcher(self._run_batch, self.cfg.max_batch_size, self.cfg.max_queue_delay_ms,
                                          self.cfg.max_queue, on_batch=self._on_batch).start()
            self.loaded = True
            log.info("model ready: %s", lab.describe())
        except Exception as exc:  # noqa: BLE001 - reported by /health/ready and the CLI
            self.error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, WsclipError) else str(exc)
            log.error("cannot load the model: %s", self.error)
            if self.on_fatal is not None:
                self.on_fatal(self.error)

    def close(self) -> None:
        self.draining = True
        if self.batcher is not None:
            self.batcher.stop(drain=True, timeout=self.cfg.graceful_timeout_s)

    # ------------------------------------------------------------------ work
    def _run_batch(self, items: list[_Item]) -> list:
        return self.labeler.label_batch([it.image for it in items], [it.labels for it in items])

    def _on_batch(self, n: int, seconds: float) -> None:
        self.metrics.batch_size.observe(n)
        self.metrics.batch_latency.observe(seconds)
        self.metrics.images.inc(n)
        with self._lock:
            self._done.append((time.monotonic(), n))

    def images_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        with self._lock:
            while self._done and self._done[0][0] < now - window:
                self._done.popleft()
            n = sum(k for _, k in self._done)
        return n / window

    def gpu_memory(self, kind: str) -> float:
        lab = self.labeler
        if lab is None or lab.device.type != "cuda":
            return 0.0
        import torch

        return float(torch.cuda.memory_allocated(lab.device) if kind == "allocated" else torch.cuda.memory_reserved(lab.device))

    def check_ready(self) -> None:
        retry = {"Retry-After": str(self.cfg.retry_after_s)}
        if self.draining:
            raise ApiError(503, "the server is shutting down", {**retry, "Connection": "close"})
        if self.error is not None:
            raise ApiError(503, f"the model failed to load: {self.error}", retry)
        if not self.loaded:
            raise ApiError(503, "the model is loading", retry)

    def submit(self, item: _Item):
        from wsclip.serve.batcher import QueueFull, ShuttingDown

        try:
            return self.batcher.submit(item)
        except QueueFull as exc:
            raise ApiError(429, f"server busy: {exc}; retry later", {"Retry-After": str(self.cfg.retry_after_s)}) from None
        except ShuttingDown as exc:
            raise ApiError(503, str(exc), {"Retry-After": str(self.cfg.retry_after_s)}) from None

    async def label(self, item: _Item):
        """Queue one item and wait for its result (504 after the request timeout)."""
        fut = self.submit(item)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self.cfg.request_timeout_s)
        except asyncio.TimeoutError:
            fut.cancel()
            raise ApiError(504, f"no result within {self.cfg.request_timeout_s:g} s") from None
        except WsclipError as exc:
            raise ApiError(422, str(exc)) from None


# ============================================================================ rendering
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


# ============================================================================ ASGI guard (limits, auth, metrics)
class _Guard:
    """Outermost app layer: bearer token, body-size limit while streaming, request metrics."""

    def __init__(self, app, svc: Service):
        self.app, self.svc = app, svc
        self.routes = {"/v1/label": "label", "/v1/label/batch": "batch", "/metrics": "metrics",
                       "/health/live": "live", "/health/ready": "ready"}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        endpoint = self.routes.get(scope.get("path", ""), "other")
        status = {"code": 500}
        started = {"v": False}
        counted = endpoint not in ("metrics", "live", "ready")
        if counted:
            self.svc.open_requests += 1

        async def send_wrapped(msg):
            if msg["type"] == "http.response.start":
                started["v"] = True
                status["code"] = msg["status"]
            await send(msg)

        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            err = self._precheck(scope.get("path", ""), headers)
            if err is None and counted and self.svc.open_requests > connection_cap(self.svc.cfg):
                err = ApiError(503, "too many open requests; retry later",
                               {"Retry-After": str(self.svc.cfg.retry_after_s), "Connection": "close"})
            if err is not None:
                if err.status == 413:  # bounded in bytes and time: a client that declares 10^12 bytes and
                    try:               # stalls gets its 413 at once, not never
                        await asyncio.wait_for(_drain(receive, self.svc.cfg.max_body_bytes),
                                               min(DRAIN_TIMEOUT_S, self.svc.cfg.read_timeout_s))
                    except asyncio.TimeoutError:
                        pass
                return await _send_error(send_wrapped, err)
            limit, total = self.svc.cfg.max_body_bytes, 0

            async def receive_limited():
                nonlocal total
                msg = await receive()
                if msg["type"] == "http.request":
                    total += len(msg.get("body", b""))
                    if total > limit:
                        from fastapi import HTTPException

                        raise HTTPException(413, f"request body above the limit of {limit} bytes")
                return msg

            await self.app(scope, receive_limited, send_wrapped)
        except Exception as exc:  # noqa: BLE001
            from fastapi import HTTPException

            if started["v"]:
                raise
            if isinstance(exc, HTTPException):
                await _send_error(send_wrapped, ApiError(exc.status_code, str(exc.detail)))
            else:
                log.exception("unhandled error")
                await _send_error(send_wrapped, ApiError(500, f"internal error: {type(exc).__name__}"))
        finally:
            if counted:
                self.svc.open_requests -= 1
            m = self.svc.metrics
            m.requests.labels(endpoint, str(status["code"])).inc()
            m.latency.labels(endpoint).observe(time.perf_counter() - t0)

    def _precheck(self, path: str, headers: dict) -> ApiError | None:
        if (err := token_error(self.svc.cfg.token, path, headers)) is not None:
            return err
        cl = headers.get("content-length")
        if cl is not None:
            try:
                n = int(cl)
            except ValueError:
                return ApiError(400, "invalid Content-Length")
            if n > self.svc.cfg.max_body_bytes:
                return ApiError(413, f"request body of {n} bytes is above the limit of {self.svc.cfg.max_body_bytes}",
                                {"Connection": "close"})
        return None


def token_error(token: str | None, path: str, headers: dict) -> ApiError | None:
    """The 401 for a protected path without the bearer token (None when allowed); the rule of every wsclip server."""
    if token and path.startswith(PROTECTED_PREFIXES):
        auth = headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            return ApiError(401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                            {"WWW-Authenticate": "Bearer"})
    return None


async def _drain(receive, cap: int) -> None:
    """Read and drop up to `cap` bytes of a rejected body, so the client (still sending) gets the
    error response instead of a connection reset; a body above `cap` is cut off by the close."""
    seen = 0
    while seen <= cap:
        msg = await receive()
        if msg["type"] != "http.request":
            return
        seen += len(msg.get("body", b""))
        if not msg.get("more_body", False):
            return


async def _send_error(send, err: ApiError) -> None:
    body = json.dumps({"error": err.message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), str(v).encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ============================================================================ the app
_LABEL_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
                "image": {"type": "string", "format": "binary"},
                "labels": {"type": "string", "description": "class names or 1-based indices, comma-separated"},
                "format": {"type": "string", "enum": list(FORMATS), "default": "png"},
                "refine": {"type": "string", "enum": ["default", "none", "crf"], "default": "default"},
                "method": {"type": "string"}}}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "parameters": [{"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
                   for n in ("labels", "format", "refine", "method")],
    "responses": {"200": {"description": "the mask", "content": {"image/png": {}, "application/json": {}}}},
}
_BATCH_BODY = {
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["images"], "properties": {
            "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "labels": {"type": "string", "description": "JSON list, one entry per image (names, indices or null)"},
            "format": {"type": "string", "enum": list(FORMATS), "default": "rle"},
            "refine": {"type": "string", "enum": ["default", "none", "crf"]}}}}}},
}


def create_app(labeler, cfg: ServeConfig | None = None):
    """The ASGI app serving `labeler` (a Labeler, or a LabelerConfig loaded in the background at startup)."""
    require("fastapi", "serve", "wsclip serve")
    require("prometheus_client", "serve", "wsclip serve")
    require("python_multipart", "serve", "wsclip serve (python-multipart)")
    from contextlib import asynccontextmanager

    from anyio import to_thread
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from wsclip import __version__

    cfg = cfg or ServeConfig()
    svc = Service(labeler, cfg)

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=svc.load, name="wsclip-load", daemon=True).start()
        yield
        await to_thread.run_sync(svc.close)

    app = FastAPI(title="wsclip labeling server", version=__version__, lifespan=lifespan,
                  description="Weakly supervised segmentation masks from CLIP-trained models.")
    app.state.service = svc

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    async def read_body(request: Request) -> bytes:
        try:
            return await asyncio.wait_for(request.body(), cfg.read_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, f"request body not received within {cfg.read_timeout_s:g} s",
                           {"Connection": "close"}) from None

    async def read_form(request: Request, max_files: int):
        from starlette.exceptions import HTTPException  # what Request.form raises (FastAPI's is a subclass)

        try:
            return await asyncio.wait_for(request.form(max_files=max_files, max_fields=16), cfg.read_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, f"request body not received within {cfg.read_timeout_s:g} s",
                           {"Connection": "close"}) from None
        except HTTPException as exc:  # Starlette's multipart parser stops at max_files with a 400
            if exc.status_code == 400 and "too many files" in str(exc.detail).lower():
                raise ApiError(413, f"more than {max_files} images in one request; send at most {max_files}") from None
            raise

    def options(get, default_format: str) -> tuple[str, bool]:
        fmt = (get("format") or default_format).lower()
        if fmt == "json":
            fmt = "rle"
        if fmt not in FORMATS:
            raise ApiError(422, f"format must be one of {', '.join(FORMATS)}, got '{fmt}'")
        refine = (get("refine") or "default").lower()
        if refine not in ("default", "none", "crf"):
            raise ApiError(422, f"refine must be none or crf, got '{refine}'")
        lab = svc.labeler
        if refine == "crf" and lab.refine != "crf":
            raise ApiError(422, "this server was started without --refine crf: CRF refinement is not available")
        method = (get("method") or "auto").lower()
        if method not in ("auto", lab.method):
            raise ApiError(422, f"this server runs the '{lab.method}' method, not '{method}'")
        return fmt, refine != "none" and lab.refine == "crf"

    def check_type(ctype: str | None, what: str) -> None:
        ctype = (ctype or "").split(";")[0].strip().lower()
        if not ctype.startswith(ACCEPTED_TYPES):
            raise ApiError(415, f"{what} has content type '{ctype or 'none'}'; send an image (image/jpeg, image/png, ...)")

    @app.post("/v1/label", openapi_extra=_LABEL_BODY, summary="Label one image")
    async def label(request: Request):
        svc.check_ready()
        ctype = request.headers.get("content-type", "")
        if ctype.lower().startswith("multipart/form-data"):
            form = await read_form(request, 1)
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise ApiError(422, "multipart request without a file field 'image'")
            check_type(upload.content_type, "the 'image' part")
            data = await upload.read()

            def get(name):
                v = form.get(name)
                return v if isinstance(v, str) else request.query_params.get(name)
        else:
            check_type(ctype, "the request body")
            data = await read_body(request)
            get = request.query_params.get
        fmt, crf = options(get, "png")
        labels = parse_labels(get("labels"), svc.labeler.classes)
        image = await to_thread.run_sync(decode_upload, data, cfg.max_pixels)
        item = _Item(image, labels, crf)
        result = await svc.label(item)
        body, media, headers = await to_thread.run_sync(render, item, result, fmt, svc.labeler.classes,
                                                        svc.labeler.method)
        if media == "image/png":
            return Response(body, media_type=media, headers=headers)
        return JSONResponse(body, headers=headers)

    @app.post("/v1/label/batch", openapi_extra=_BATCH_BODY, summary="Label several images")
    async def label_batch(request: Request):
        svc.check_ready()
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            raise ApiError(415, "the batch endpoint takes multipart/form-data with one or more 'images' files")
        form = await read_form(request, cfg.max_batch_items)
        uploads = [u for u in form.getlist("images") if not isinstance(u, str)]
        if not uploads:
            raise ApiError(422, "no 'images' files in the request")
        if len(uploads) > cfg.max_batch_items:
            raise ApiError(413, f"{len(uploads)} images in one request; the limit is {cfg.max_batch_items}")
        get = lambda name: form.get(name) if isinstance(form.get(name), str) else request.query_params.get(name)  # noqa: E731
        fmt, crf = options(get, "rle")
        raw_labels = get("labels")
        per_image: list = [None] * len(uploads)
        if raw_labels:
            try:
                per_image = json.loads(raw_labels)
            except json.JSONDecodeError as exc:
                raise ApiError(422, f"labels must be a JSON list with one entry per image ({exc})") from None
            if not isinstance(per_image, list) or len(per_image) != len(uploads):
                raise ApiError(422, f"labels must be a JSON list with {len(uploads)} entries (one per image)")
        if svc.batcher.depth + len(uploads) > cfg.max_queue:
            raise ApiError(429, "server busy; retry later", {"Retry-After": str(cfg.retry_after_s)})

        async def one(upload, lab):
            name = upload.filename or ""
            try:
                check_type(upload.content_type, f"'{name}'")
                y = parse_labels(lab if not isinstance(lab, str) else lab, svc.labeler.classes) \
                    if lab is not None else None
                image = await to_thread.run_sync(decode_upload, await upload.read(), cfg.max_pixels)
                item = _Item(image, y, crf)
                result = await svc.label(item)
                body, _, _ = await to_thread.run_sync(render, item, result, fmt, svc.labeler.classes,
                                                      svc.labeler.method, True)
                return {"filename": name, "status": 200, **body}
            except ApiError as exc:
                return {"filename": name, "status": exc.status, "error": exc.message}

        results = await asyncio.gather(*(one(u, lab) for u, lab in zip(uploads, per_image)))
        return JSONResponse({"results": results})

    @app.get("/health/live", summary="Liveness")
    async def live():
        return {"status": "alive"}

    @app.get("/health/ready", summary="Readiness: model loaded and warmed up")
    async def ready():
        busy = svc.busy if svc.ready else None
        if svc.ready and busy is None:
            return {"status": "ready", **svc.labeler.describe(), "queue_depth": svc.batcher.depth}
        if busy is not None:  # cannot take work now: a load balancer should send it elsewhere
            return JSONResponse({"status": "busy", "reason": busy}, status_code=503,
                                headers={"Retry-After": str(cfg.retry_after_s)})
        state = "draining" if svc.draining else ("failed" if svc.error else "loading")
        body = {"status": state, **({"error": svc.error} if svc.error else {})}
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(cfg.retry_after_s)})

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if cfg.review is not None:
        from wsclip.serve.folder import LabeledFolder
        from wsclip.serve.review import review_app

        app.mount("/review", review_app(LabeledFolder(cfg.review)))
    guarded = _Guard(app, svc)
    guarded.state = app.state  # type: ignore[attr-defined] - tests and run helpers reach the service here
    return guarded


# ============================================================================ running
def check_exposure(cfg: ServeConfig) -> None:
    """Refuse to listen beyond loopback without a token: anyone who could reach the port could use it."""
    import ipaddress

    host = cfg.host.strip("[]")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host.lower() in LOOPBACK_NAMES
    if not loopback and not cfg.token:
        raise WsclipError(
            f"refusing to listen on {cfg.host} without a token: anyone who can reach it could use the server. "
            "Set one with --token-file FILE or WSCLIP_SERVE_TOKEN (e.g. python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'), or keep the default --host 127.0.0.1")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise WsclipError(f"cannot listen on {host}:{port}: {exc.strerror}; pick another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def connection_cap(cfg: ServeConfig) -> int:
    """Requests open at once before new ones get 503 (the label endpoints; health and metrics are exempt)."""
    return int(cfg.max_connections or (2 * cfg.max_queue + 32))


def _uvicorn_server(app, cfg: ServeConfig, log_level: str = "warning"):
    uvicorn = require("uvicorn", "serve", "wsclip serve")
    svc: Service = app.state.service

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / SIGINT: not ready at once, finish in-flight requests
            svc.draining = True
            super().handle_exit(sig, frame)

    conf = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=cfg.graceful_timeout_s,
                          limit_concurrency=2 * connection_cap(cfg) + 16, timeout_keep_alive=5,  # backstop
                          lifespan="on", access_log=False)
    server = _Server(conf)

    def fatal(msg):
        server.should_exit = True
        server.fatal = msg

    server.fatal = None
    if cfg.exit_on_load_failure:
        svc.on_fatal = fatal
    return server


class BackgroundServer:
    """A server on a thread of this process (tests, benchmarks): `.url`, `.service`, `.stop()`."""

    def __init__(self, app, cfg: ServeConfig | None = None, wait_ready: float | None = 60.0):
        self.cfg = cfg or ServeConfig(port=0)
        check_exposure(self.cfg)
        self.sock = bind_socket(self.cfg.host, self.cfg.port)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{self.cfg.host}:{self.port}"
        self.service: Service = app.state.service
        self.server = _uvicorn_server(app, self.cfg)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        if wait_ready:
            self.wait_ready(wait_ready)

    def wait_ready(self, timeout: float) -> None:
        t_end = time.monotonic() + timeout
        while not self.service.ready:
            if self.service.error:
                raise WsclipError(f"server failed to start: {self.service.error}")
            if time.monotonic() > t_end:
                raise WsclipError(f"server not ready after {timeout} s")
            time.sleep(0.02)
        while not self.server.started and time.monotonic() < t_end:
            time.sleep(0.02)

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful: stop accepting, finish in-flight requests, stop the batcher."""
        self.service.draining = True
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def serve(labeler_cfg, cfg: ServeConfig, log_level: str = "info") -> int:
    """Run the server in the foreground until SIGTERM/SIGINT; returns the exit code."""
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="%(asctime)s %(name)s %(message)s")
    check_exposure(cfg)
    app = create_app(labeler_cfg, cfg)
    sock = bind_socket(cfg.host, cfg.port)
    port = sock.getsockname()[1]
    server = _uvicorn_server(app, cfg, log_level="warning" if log_level != "debug" else "debug")
    print(f"wsclip serve: listening on http://{cfg.host}:{port} (ready at /health/ready once the model is loaded)",
          flush=True)
    import signal

    # uvicorn drains, then re-raises the SIGTERM it caught; this handler absorbs it so a drained server exits 0
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    if server.fatal:
        raise WsclipError(f"the model could not be loaded: {server.fatal}")
    return 0


__all__: Sequence[Any] = ("ServeConfig", "ApiError", "Service", "create_app", "serve", "BackgroundServer", "bind_socket",
                          "decode_upload", "parse_labels", "render")
