"""Dynamic batching for the server: a bounded queue in front of one worker thread that owns the model.

    batcher = DynamicBatcher(run_batch, max_batch_size=8, max_queue_delay_ms=5, max_queue=64)
    batcher.start()
    future = batcher.submit(item)        # raises QueueFull at once when max_queue items are waiting
    result = future.result()

The worker takes the oldest waiting item, then waits until `max_batch_size` items are there or
`max_queue_delay_ms` has passed since that item arrived, and calls `run_batch(items)` once.
`run_batch` returns one result per item (an exception instance fails just that item); if it
raises, the items of a multi-item batch are retried one by one so a single bad item cannot fail
the others. Futures cancelled while queued (a request that timed out) are dropped unrun.
`stop(drain=True)` refuses new items and finishes the queued ones.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from wsclip.errors import WsclipError


class QueueFull(RuntimeError):
    """The queue holds max_queue items: the caller should back off (HTTP 429)."""


class ShuttingDown(RuntimeError):
    """The batcher is stopping and takes no new items (HTTP 503)."""


@dataclass
class _Job:
    item: Any
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    """Groups submitted items into batches for `run_batch` (see the module docstring)."""

    def __init__(self, run_batch: Callable[[list], Sequence], max_batch_size: int = 8, max_queue_delay_ms: float = 5.0,
                 max_queue: int = 64, on_batch: Callable[[int, float], None] | None = None, name: str = "wsclip-batcher"):
        if max_batch_size < 1 or max_queue < 1 or max_queue_delay_ms < 0:
            raise WsclipError(f"batcher needs max_batch_size >= 1, max_queue >= 1, max_queue_delay_ms >= 0; got "
                              f"{max_batch_size}, {max_queue}, {max_queue_delay_ms}")
        self.run_batch = run_batch
        self.max_batch_size = int(max_batch_size)
        self.delay = float(max_queue_delay_ms) / 1000.0
        self.max_queue = int(max_queue)
        self.on_batch = on_batch
        self._queue: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._busy = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    # ------------------------------------------------------------------ public
    def start(self) -> "DynamicBatcher":
        self._thread.start()
        return self

    @property
    def depth(self) -> int:
        """Items waiting (not yet taken by the worker)."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Items waiting or being run."""
        return len(self._queue) + self._busy

    def submit(self, item) -> Future:
        """Queue one item; QueueFull when the queue is full, ShuttingDown after stop()."""
        job = _Job(item)
        with self._cv:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (limit {self.max_queue})")
            self._queue.append(job)
            self._cv.notify()
        return job.future

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new items; finish (drain=True) or cancel the queued ones; wait for the worker."""
        with self._cv:
            self._closing = True
            if not drain:
                while self._queue:
                    self._queue.popleft().future.cancel()
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ worker
    def _take(self) -> list[_Job] | None:
        with self._cv:
            while not self._queue:
                if self._closing:
                    return None
                self._cv.wait()
            deadline = self._queue[0].enqueued + self.delay
            while len(self._queue) < self.max_batch_size and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            n = min(self.max_batch_size, len(self._queue))
            jobs = [self._queue.popleft() for _ in range(n)]
            self._busy = n
            return jobs

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            try:
                jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
                if jobs:
                    t0 = time.perf_counter()
                    self._run(jobs)
                    if self.on_batch is not None:
                        self.on_batch(len(jobs), time.perf_counter() - t0)
            finally:
                self._busy = 0

    def _run(self, jobs: list[_Job]) -> None:
        try:
            results = list(self.run_batch([j.item for j in jobs]))
            if len(results) != len(jobs):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(jobs)} items")
        except BaseException as exc:  # noqa: BLE001 - delivered to the waiting requests
            if len(jobs) > 1:
                for j in jobs:  # isolate the failing item
                    self._run_one(j)
                return
            jobs[0].future.set_exception(exc)
            return
        for j, r in zip(jobs, results):
            if isinstance(r, BaseException):
                j.future.set_exception(r)
            else:
                j.future.set_result(r)

    def _run_one(self, job: _Job) -> None:
        try:
            (r,) = list(self.run_batch([job.item]))
        except BaseException as exc:  # noqa: BLE001
            job.future.set_exception(exc)
            return
        if isinstance(r, BaseException):
            job.future.set_exception(r)
        else:
            job.future.set_result(r)
