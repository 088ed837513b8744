"""Named stages of a labeling step, timed only while a profiler records them (`wsclip profile`).

The labelers mark their stage boundaries:

    with stage("forward", x.device):
        cams = net(x)

Outside a recording this is a shared no-op context (one ContextVar read). Inside
`StageRecorder.active()` every span is timed: CUDA spans with CUDA events on the current
stream (read after one synchronize in `collect`, never with the wall clock around async
work), host spans with perf_counter. Spans nest; a span's time excludes the spans opened
inside it, so the stages of one step add up to the step. With `annotate=True` each span is
also a torch.profiler `record_function` range and, on CUDA, an NVTX range (Nsight Systems
shows the same names). Recording follows the context: worker threads and processes that
did not enter `active()` record nothing.
"""

from __future__ import annotations

import contextlib
import time
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

#: the stage names the labelers use, in pipeline order
STAGES = ("read", "preprocess", "h2d", "forward", "backward", "caa", "crf", "postprocess", "d2h", "encode")
DESCRIPTIONS = {"read": "read/decode", "preprocess": "preprocess", "h2d": "host-to-device", "forward": "forward",
                "backward": "GradCAM backward", "caa": "CAA", "crf": "CRF", "postprocess": "argmax/postprocess",
                "d2h": "device-to-host", "encode": "encode/write"}

_ACTIVE: ContextVar["StageRecorder | None"] = ContextVar("wsclip_stage_recorder", default=None)
_NULL = contextlib.nullcontext()


def stage(name: str, device=None):
    """Context manager marking one stage (`device`: where its work runs; CUDA spans use CUDA events)."""
    rec = _ACTIVE.get()
    return _NULL if rec is None else rec.span(name, device)


def recording() -> bool:
    """True inside an active StageRecorder (callers may then skip work that only overlaps stages)."""
    return _ACTIVE.get() is not None


@dataclass
class _Span:
    name: str
    start: object
    end: object = None
    cuda: bool = False
    children: list = field(default_factory=list)

    def seconds(self) -> float:
        if self.cuda:
            return self.start.elapsed_time(self.end) / 1e3
        return self.end - self.start

    def exclusive(self) -> float:
        return self.seconds() - sum(c.seconds() for c in self.children)


class StageRecorder:
    """Collects stage spans; `collect()` turns the spans since the last call into {stage: seconds}."""

    def __init__(self, annotate: bool = False):
        self.annotate = annotate
        self._done: list[_Span] = []
        self._stack: list[_Span] = []

    @contextlib.contextmanager
    def active(self):
        """Record the stages opened in this context (thread / task) until the block ends."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    @contextlib.contextmanager
    def span(self, name: str, device=None):
        cuda = device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            start = time.perf_counter()  # before the annotations: their cost is the stage's, not "other"
        sp = _Span(name, start, cuda=cuda)
        parent = self._stack[-1] if self._stack else None
        self._stack.append(sp)
        try:
            with contextlib.ExitStack() as ranges:
                if self.annotate:
                    ranges.enter_context(torch.profiler.record_function(f"wsclip.{name}"))
                    if cuda:
                        ranges.enter_context(torch.cuda.nvtx.range(f"wsclip.{name}"))
                yield sp
        finally:
            self._stack.pop()
            if cuda:
                sp.end = torch.cuda.Event(enable_timing=True)
                sp.end.record()
            else:
                sp.end = time.perf_counter()
            if parent is not None and parent.cuda == sp.cuda:
                parent.children.append(sp)
            self._done.append(sp)

    def collect(self) -> dict[str, float]:
        """{stage: exclusive seconds} of the spans finished since the last call (synchronises CUDA once)."""
        spans, self._done = self._done, []
        if any(s.cuda for s in spans):
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for s in spans:
            out[s.name] = out.get(s.name, 0.0) + max(0.0, s.exclusive())
        return out
