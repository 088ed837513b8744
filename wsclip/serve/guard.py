"""The outermost layer of the labeling server, before any route runs: the bearer-token rule of every
wsclip server (`token_error`), the refusal to listen beyond loopback without a token (`check_exposure`),
the open-request cap (`connection_cap`), the body-size limit (a declared Content-Length at once, a
streamed body while it arrives) and the per-request metrics (`_Guard`)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import TYPE_CHECKING

from wsclip.errors import WsclipError
from wsclip.serve.http_codec import ApiError

if TYPE_CHECKING:
    from wsclip.serve.server import ServeConfig
    from wsclip.serve.service import Service

log = logging.getLogger("wsclip.serve")

PROTECTED_PREFIXES = ("/v1/", "/metrics", "/review/api/")  # with a token, /metrics needs it too; /health/* never does
DRAIN_TIMEOUT_S = 1.0  # longest wait for the rest of a body already refused with 413
LOOPBACK_NAMES = ("localhost",)


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


def connection_cap(cfg: ServeConfig) -> int:
    """Requests open at once before new ones get 503 (the label endpoints; health and metrics are exempt)."""
    return int(cfg.max_connections or (2 * cfg.max_queue + 32))
