"""The JSON a benchmark run writes (one file per run under benchmarks/results/), and its validation.

    {"schema": "wsclip-bench/1", "run_id", "created" (UTC ISO), "mode": full|quick|tiny, "cpu_mode",
     "label" (the machine, in words), "notes": [...], "environment": {...}, "ceilings": {...},
     "suites": {name: {"status": ok|skipped|error, "reason", "description", "seconds", "setup": {...},
                       "results": [row], "comparisons": [comparison], "checks": [check]}},
     "seconds"}

row: {"case", "variant", "role": wsclip|baseline|reference, "status": ok|skipped|error, "reason"?, "batch"?,
      "items" (work items per call), "unit", "throughput" (items/s), "latency_ms" (median per call),
      "timing": {"median_s", "times_s", "reps", "warmup", "method", "stopped_early"}, "peak_mem_MB"?,
      "gflop_per_item"?, "achieved_GFLOPs"?, "mfu"? (fraction of the measured matmul ceiling), "extra"?}
comparison: {"case", "metric", "fast", "baseline", "ratio" (> 1: the fast variant wins), "target"?, "met"?}
check: {"case", "name", "passed", "rel_err"?, "max_abs_err"?, "tolerance"?, "detail"?}
"""

from __future__ import annotations

SCHEMA_ID = "wsclip-bench/1"
MODES = ("full", "quick", "tiny")
STATUSES = ("ok", "skipped", "error")
ROLES = ("wsclip", "baseline", "reference")

_RUN_KEYS = {"schema": str, "run_id": str, "created": str, "mode": str, "cpu_mode": bool, "label": str,
             "notes": list, "environment": dict, "ceilings": dict, "suites": dict, "seconds": (int, float)}
_SUITE_KEYS = {"status": str, "description": str, "seconds": (int, float), "setup": dict, "results": list,
               "comparisons": list, "checks": list}
_ROW_KEYS = {"case": str, "variant": str, "role": str, "status": str}
_ROW_OK_KEYS = {"items": (int, float), "unit": str, "throughput": (int, float), "latency_ms": (int, float),
                "timing": dict}
_CMP_KEYS = {"case": str, "metric": str, "fast": str, "baseline": str, "ratio": (int, float)}
_CHECK_KEYS = {"case": str, "name": str, "passed": bool}
_ENV_KEYS = ("device_type", "device", "torch", "versions", "command")


def _need(obj: dict, keys: dict, where: str, errors: list[str]) -> None:
    for k, tp in keys.items():
        if k not in obj:
            errors.append(f"{where}: missing '{k}'")
        elif not isinstance(obj[k], tp) or (tp in ((int, float), int) and isinstance(obj[k], bool)):
            errors.append(f"{where}: '{k}' should be {tp}, got {type(obj[k]).__name__}")


def validate_run(run) -> list[str]:
    """Problems with a run record (empty when it follows the schema)."""
    errors: list[str] = []
    if not isinstance(run, dict):
        return ["a run record must be a JSON object"]
    _need(run, _RUN_KEYS, "run", errors)
    if run.get("schema") != SCHEMA_ID:
        errors.append(f"run: schema is {run.get('schema')!r}, expected {SCHEMA_ID!r}")
    if run.get("mode") not in MODES:
        errors.append(f"run: mode {run.get('mode')!r} not one of {MODES}")
    for k in _ENV_KEYS:
        if k not in (run.get("environment") or {}):
            errors.append(f"environment: missing '{k}'")
    for name, suite in (run.get("suites") or {}).items():
        where = f"suite {name}"
        if not isinstance(suite, dict):
            errors.append(f"{where}: not an object")
            continue
        _need(suite, _SUITE_KEYS, where, errors)
        if suite.get("status") not in STATUSES:
            errors.append(f"{where}: status {suite.get('status')!r} not one of {STATUSES}")
        if suite.get("status") in ("skipped", "error") and not suite.get("reason"):
            errors.append(f"{where}: a {suite.get('status')} suite needs a 'reason'")
        for i, row in enumerate(suite.get("results") or []):
            w = f"{where} result {i}"
            _need(row, _ROW_KEYS, w, errors)
            if row.get("role") not in ROLES:
                errors.append(f"{w}: role {row.get('role')!r} not one of {ROLES}")
            if row.get("status") == "ok":
                _need(row, _ROW_OK_KEYS, w, errors)
                if isinstance(row.get("throughput"), (int, float)) and not row["throughput"] > 0:
                    errors.append(f"{w}: throughput must be positive")
            elif row.get("status") in ("skipped", "error"):
                if not row.get("reason"):
                    errors.append(f"{w}: a {row['status']} row needs a 'reason'")
            else:
                errors.append(f"{w}: status {row.get('status')!r} not one of {STATUSES}")
        for i, cmp in enumerate(suite.get("comparisons") or []):
            _need(cmp, _CMP_KEYS, f"{where} comparison {i}", errors)
        for i, chk in enumerate(suite.get("checks") or []):
            _need(chk, _CHECK_KEYS, f"{where} check {i}", errors)
    return errors


def shown_mfu(row: dict, device: str) -> float | None:
    """The MFU of a result row worth printing, else None: only on CUDA, where the ceiling is the GPU's
    measured matmul rate, and only at most 100% (above it the ceiling it divides by is wrong). On a CPU
    the ceiling (one short matmul, other processes competing) is no known peak, so no MFU is shown."""
    mfu = row.get("mfu")
    if mfu is None or not str(device).startswith("cuda") or not 0 < mfu <= 1.0:
        return None
    return float(mfu)
