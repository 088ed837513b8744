"""What a benchmark suite gets (`SuiteContext`) and fills in (`SuiteResult`).

A suite is a module in benchmarks/suites/ with NAME, DESCRIPTION and `run(ctx, res)`. It times a
wsclip path and a baseline in the same run, after checking that both compute the same outputs
(`res.check`), and records rows with `res.timed` / `res.skip` and speed-ups with `res.compare`.
`raise Skip("reason")` skips the whole suite (e.g. a component that is not there yet).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wsclip.bench.timing import Meter, Timing


class Skip(Exception):
    """Raised by a suite (or a case) that cannot run here; the message is the reason."""


@dataclass
class SuiteContext:
    """Device, mode and measuring tools shared by the suites of one run."""

    device: torch.device
    meter: Meter
    mode: str  # full | quick | tiny
    ceilings: dict
    tmp: Path
    root: Path  # the repository (test data, benchmarks/)
    budget_s: float = 60.0  # soft cap on the seconds one measurement spends repeating
    quiet: bool = False

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def tiny(self) -> bool:
        return self.mode == "tiny"

    @property
    def quick(self) -> bool:
        return self.mode != "full"

    def pick(self, **by_mode: Any) -> Any:
        """The setting for this run from keywords gpu, gpu_quick, cpu, cpu_quick, tiny (quick falls back to full)."""
        if self.tiny:
            key = "tiny"
        else:
            base = "gpu" if self.gpu else "cpu"
            key = f"{base}_quick" if self.quick and f"{base}_quick" in by_mode else base
        if key not in by_mode:
            raise KeyError(f"no setting for mode '{key}' (have {sorted(by_mode)})")
        return by_mode[key]

    @property
    def reps(self) -> int:
        return self.pick(gpu=20, gpu_quick=10, cpu=5, cpu_quick=3, tiny=1)

    @property
    def warmup(self) -> int:
        return self.pick(gpu=3, gpu_quick=2, cpu=1, cpu_quick=1, tiny=1)

    @property
    def input_sets(self) -> int:
        """Input sets to rotate through: several on a GPU (L2), one on a CPU."""
        return 3 if self.gpu else 1

    def ceiling(self, dtype: str = "fp32") -> float | None:
        """Measured matmul GFLOP/s for a dtype (fp32, bf16, fp16)."""
        return self.ceilings.get(f"matmul_{dtype}_GFLOPs")

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(f"  {msg}", file=sys.stderr, flush=True)


@dataclass
class SuiteResult:
    """Rows, comparisons and checks of one suite, in the schema of `wsclip.bench.schema`."""

    name: str
    description: str = ""
    setup: dict = field(default_factory=dict)
    results: list[dict] = field(default_factory=list)
    comparisons: list[dict] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)

    def timed(self, case: str, variant: str, role: str, timing: Timing, items: float, unit: str = "images/s",
              batch: int | None = None, gflop_per_item: float | None = None, ceiling: float | None = None,
              ceiling_name: str | None = None, peak_mem_MB: float | None = None, **extra) -> dict:
        """Record one measured variant: throughput = items / median seconds per call."""
        t = timing.median_s
        row = {"case": case, "variant": variant, "role": role, "status": "ok", "batch": batch, "items": items,
               "unit": unit, "throughput": items / t, "latency_ms": t * 1e3, "timing": timing.to_dict(),
               "peak_mem_MB": peak_mem_MB}
        if gflop_per_item:
            row["gflop_per_item"] = gflop_per_item
            row["achieved_GFLOPs"] = gflop_per_item * items / t
            if ceiling:
                row["mfu"] = row["achieved_GFLOPs"] / ceiling
                row["ceiling"] = ceiling_name
        if extra:
            row["extra"] = extra
        self.results.append(row)
        return row

    def skip(self, case: str, variant: str, role: str, reason: str, status: str = "skipped", **extra) -> dict:
        row = {"case": case, "variant": variant, "role": role, "status": status, "reason": reason}
        if extra:
            row["extra"] = extra
        self.results.append(row)
        return row

    def find(self, case: str, variant: str) -> dict | None:
        return next((r for r in self.results if r["case"] == case and r["variant"] == variant
                     and r["status"] == "ok"), None)

    def compare(self, case: str, fast: str, baseline: str, metric: str = "throughput",
                target: float | None = None) -> dict | None:
        """Speed-up of `fast` over `baseline` (per item); None when either row is missing."""
        a, b = self.find(case, fast), self.find(case, baseline)
        if a is None or b is None:
            return None
        if metric == "throughput":
            ratio = a["throughput"] / b["throughput"]
        elif metric == "peak memory":
            if not a.get("peak_mem_MB") or not b.get("peak_mem_MB"):
                return None
            ratio = b["peak_mem_MB"] / a["peak_mem_MB"]
        else:
            raise ValueError(f"unknown comparison metric {metric!r}")
        cmp = {"case": case, "metric": metric, "fast": fast, "baseline": baseline, "ratio": ratio}
        if target is not None:
            cmp.update(target=target, met=ratio >= target)
        self.comparisons.append(cmp)
        return cmp

    def check(self, case: str, name: str, rel_err: float | None = None, max_abs_err: float | None = None,
              tolerance: float | None = None, passed: bool | None = None, detail: str = "") -> bool:
        """Record an equivalence check; passes when the error is within tolerance (NaN never passes)."""
        if passed is None:
            err = rel_err if rel_err is not None else max_abs_err
            passed = err is not None and tolerance is not None and err <= tolerance
        chk = {"case": case, "name": name, "passed": bool(passed)}
        for k, v in (("rel_err", rel_err), ("max_abs_err", max_abs_err), ("tolerance", tolerance)):
            if v is not None:
                chk[k] = float(v)
        if detail:
            chk["detail"] = detail
        self.checks.append(chk)
        return bool(passed)

    def to_dict(self) -> dict:
        return {"description": self.description, "setup": self.setup, "results": self.results,
                "comparisons": self.comparisons, "checks": self.checks}
