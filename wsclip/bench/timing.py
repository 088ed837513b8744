"""Timing and memory: medians of repeated runs (CUDA events on a GPU, wall clock on the CPU), peak memory,
and the two ceilings every figure is read against (a large matmul, a large copy), measured in the same run.
"""

from __future__ import annotations

import ctypes
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

MB = 1e6


@dataclass
class Timing:
    """Seconds per call of one measured function: the median and every sample behind it."""

    median_s: float
    times_s: list[float] = field(default_factory=list)
    warmup: int = 0
    method: str = "wall-clock"
    stopped_early: bool = False  # the time budget ended the repetitions before `reps`
    peak_mem_MB: float | None = None  # with track_memory: peak above the memory held before the timed calls
    cpu_s: float | None = None  # CPU runs: median process CPU seconds per call (all threads; not child processes)

    def to_dict(self) -> dict:
        out = {"median_s": self.median_s, "times_s": self.times_s, "reps": len(self.times_s), "warmup": self.warmup,
               "method": self.method, "stopped_early": self.stopped_early}
        if self.cpu_s is not None:
            out["cpu_s"] = self.cpu_s
        return out


class Rotation:
    """Cycle through several input sets, so repeated GPU runs do not time data that stays in L2."""

    def __init__(self, sets: Sequence):
        if not sets:
            raise ValueError("Rotation needs at least one input set")
        self.sets = list(sets)
        self._i = -1

    def next(self):
        self._i = (self._i + 1) % len(self.sets)
        return self.sets[self._i]


class Meter:
    """Times callables on one device and reads their peak memory.

    GPU: CUDA events around each call after a synchronised warm-up; CPU: perf_counter around each
    whole call (the median of repeated whole runs). `budget_s` caps the seconds one measurement may
    spend on repetitions (at least one timed call always runs).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.history: list[Timing] = []  # every measurement, in order
        self.last_cpu: float | None = None  # process CPU seconds per call of the last CPU measurement
        self._libc = None
        if not self.cuda and Path("/proc/self/clear_refs").exists():
            try:
                self._libc = ctypes.CDLL("libc.so.6")
            except OSError:
                self._libc = None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def measure(self, fn: Callable[[], object], reps: int = 5, warmup: int = 1,
                budget_s: float | None = None, track_memory: bool = False) -> Timing:
        """Run fn `warmup` times, then up to `reps` timed times (at least two once `budget_s` is spent, unless
        reps is 1); the median and the samples.

        track_memory: also record the peak memory of the timed calls (saves a separate `peak` call).
        """
        for _ in range(max(0, warmup)):
            fn()
        self.sync()
        base = self._reset_peak() if track_memory else None
        times: list[float] = []
        cpu: list[float] = []
        start = time.perf_counter()
        stopped = False
        for i in range(max(1, reps)):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t, c = time.perf_counter(), time.process_time()
                fn()
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
            # the budget may cut repetitions short, but a median needs at least two samples
            if budget_s is not None and time.perf_counter() - start > budget_s and i + 1 < reps and i >= 1:
                stopped = True
                break
        timing = Timing(statistics.median(times), times, max(0, warmup), "cuda-events" if self.cuda else "wall-clock",
                        stopped, self._read_peak(base) if base is not None else None,
                        statistics.median(cpu) if cpu else None)
        self.last_cpu = timing.cpu_s
        self.history.append(timing)
        return timing

    def time(self, fn: Callable[[], object], reps: int = 5, warmup: int = 1, budget_s: float | None = None) -> float:
        """Median seconds of fn() (the interface `benchmarks/kernels.py` expects of a meter)."""
        return self.measure(fn, reps, warmup, budget_s).median_s

    def peak(self, fn: Callable[[], object]) -> float | None:
        """Peak memory in MB that fn() allocates above what was held before it (None where unknown).

        GPU: the caching allocator's peak. CPU (Linux): the process's peak resident set (VmHWM) after
        resetting it, so it counts every allocator, NumPy and ONNX Runtime included.
        """
        base = self._reset_peak()
        if base is None:
            return None
        fn()
        return self._read_peak(base)

    def _reset_peak(self) -> int | None:
        """Reset the peak counter; returns the memory held now (None where the peak cannot be read)."""
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        if self._libc is None:
            return None
        try:
            self._libc.malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return None
        return _proc_status("VmRSS:")

    def _read_peak(self, base: int) -> float:
        if self.cuda:
            self.sync()
            return (torch.cuda.max_memory_allocated(self.device) - base) / MB
        return max(0, _proc_status("VmHWM:") - base) / MB


def _proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def measure_ceilings(meter: Meter, matmul_n: int, copy_mb: int, reps: int = 3,
                     dtypes: Sequence[str] = ("fp32",)) -> dict:
    """Measured ceilings on this device: copy bandwidth (bytes read + written) and matmul rate per dtype.

    Returns {"copy_GBps", "matmul_<dtype>_GFLOPs", "matmul_n", "copy_MB"}; MFU figures divide by these.
    """
    dev = meter.device
    n = copy_mb * 2**20 // 4
    src = torch.rand(n, device=dev)
    dst = torch.empty_like(src)
    t = meter.measure(lambda: dst.copy_(src), reps=reps).median_s
    out: dict = {"copy_GBps": 2 * n * 4 / t / 1e9, "copy_MB": copy_mb, "matmul_n": matmul_n}
    del src, dst
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    for name in dtypes:
        # CPUs without bf16/fp16 units emulate them hundreds of times slower: a smaller product suffices there
        m = matmul_n if meter.cuda or name == "fp32" else min(matmul_n, 256)
        a = torch.rand(m, m, device=dev).to(dt[name])
        b = torch.rand(m, m, device=dev).to(dt[name])
        t = meter.measure(lambda: a @ b, reps=reps).median_s
        out[f"matmul_{name}_GFLOPs"] = 2 * m**3 / t / 1e9
    if meter.cuda:
        out["tf32_matmul_allowed"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (inf when shapes differ, NaN never passes a `<` check)."""
    if tuple(out.shape) != tuple(ref.shape):
        return float("inf")
    a, b = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
