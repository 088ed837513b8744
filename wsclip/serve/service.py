"""The predict side of the labeling server: the model behind one app, loaded and warmed up in the
background, requests queued through a `DynamicBatcher` into `Labeler.label_batch`, readiness (loading,
failed, draining, busy) and the Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from wsclip.errors import WsclipError
from wsclip.serve.guard import connection_cap
from wsclip.serve.http_codec import ApiError

if TYPE_CHECKING:
    from wsclip.serve.server import ServeConfig

log = logging.getLogger("wsclip.serve")


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
