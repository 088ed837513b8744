"""`wsclip serve`: an HTTP labeling server (FastAPI + uvicorn, extra `[serve]`); this module is the transport
(config, app assembly, running), the rest lives in guard (limits, auth), http_codec (decode, encode),
service (predict) and routes (the endpoints).

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


import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

from wsclip.errors import WsclipError, require
from wsclip.serve.guard import (DRAIN_TIMEOUT_S, LOOPBACK_NAMES, PROTECTED_PREFIXES, _drain,  # noqa: F401
                                _Guard, _send_error, check_exposure, connection_cap, token_error)
from wsclip.serve.http_codec import ACCEPTED_TYPES, FORMATS, ApiError, decode_upload, parse_labels, render  # noqa: F401
from wsclip.serve.service import Metrics, Service, _Item  # noqa: F401


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


def create_app(labeler, cfg: ServeConfig | None = None):
    """The ASGI app serving `labeler` (a Labeler, or a LabelerConfig loaded in the background at startup)."""
    require("fastapi", "serve", "wsclip serve")
    require("prometheus_client", "serve", "wsclip serve")
    require("python_multipart", "serve", "wsclip serve (python-multipart)")
    from fastapi import FastAPI
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from wsclip import __version__
    from wsclip.serve import routes

    cfg = cfg or ServeConfig()
    svc = Service(labeler, cfg)
    app = FastAPI(title="wsclip labeling server", version=__version__, lifespan=routes.lifespan,
                  description="Weakly supervised segmentation masks from CLIP-trained models.")
    app.state.service = svc
    app.add_exception_handler(ApiError, routes.api_error)
    app.add_exception_handler(StarletteHTTPException, routes.http_error)
    app.post("/v1/label", openapi_extra=routes.LABEL_BODY, summary="Label one image")(routes.label)
    app.post("/v1/label/batch", openapi_extra=routes.BATCH_BODY, summary="Label several images")(routes.label_batch)
    app.get("/health/live", summary="Liveness")(routes.live)
    app.get("/health/ready", summary="Readiness: model loaded and warmed up")(routes.ready)
    app.get("/metrics", summary="Prometheus metrics")(routes.metrics)
    if cfg.review is not None:
        from wsclip.serve.folder import LabeledFolder
        from wsclip.serve.review import review_app

        app.mount("/review", review_app(LabeledFolder(cfg.review)))
    guarded = _Guard(app, svc)
    guarded.state = app.state  # type: ignore[attr-defined] - tests and run helpers reach the service here
    return guarded


# ============================================================================ running
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
