"""Shared by the kernel suites: run a kernel benchmark of benchmarks/kernels.py and record its rows."""

from __future__ import annotations

from wsclip.bench.suite import Skip, SuiteContext, SuiteResult


def _kernels_module():
    try:
        from benchmarks import kernels
    except ImportError as exc:
        raise Skip(f"benchmarks/kernels.py (the kernels issue) cannot be imported: {exc}") from None
    return kernels


def _role(variant: str) -> str:
    v = variant.lower()
    if "dense irn" in v:
        return "baseline"  # IRN's public formulation
    if "reference" in v:
        return "reference"
    return "wsclip"


def _case(kernel: str, shape: dict) -> str:
    if kernel == "random_walk":
        return f"random_walk {shape['H']}x{shape['W']} C={shape['C']} r={shape['radius']}"
    if kernel == "masked_batch":
        b, _, h, _ = shape["images"]
        return f"masked_batch B={b} {h}px -> {shape['size']} ({shape['pairs']} pairs)"
    if kernel.startswith("caa"):
        return f"{kernel} N={shape['N']} classes={shape['classes']}"
    return kernel


def run_kernel(ctx: SuiteContext, res: SuiteResult, kernel: str, unit: str, items_of) -> None:
    """Call kernels.bench_<kernel> with this run's meter and ceilings and translate its rows.

    items_of(shape) -> work items per call (pairs for masked_batch, maps for the others).
    """
    kb = _kernels_module()
    sizes = kb.SIZES[ctx.mode]
    start = len(ctx.meter.history)
    rows, speed = getattr(kb, f"bench_{kernel}")(ctx.meter, ctx.ceilings, ctx.quick, ctx.gpu, sizes)
    timings = {t.median_s: t for t in ctx.meter.history[start:]}
    res.setup.update({"sizes": f"benchmarks/kernels.py {ctx.mode} sizes",
                      "paths": "Triton and PyTorch" if ctx.gpu else "PyTorch only (Triton kernels need a CUDA GPU)"})
    for r in rows:
        case = _case(r["kernel"], r["shape"])
        extra = {k: v for k, v in r.items() if k not in ("kernel", "variant", "time_ms", "peak_mem_MB")}
        if "time_ms" not in r:
            res.skip(case, r["variant"], _role(r["variant"]), r.get("note") or "not run", **extra)
            continue
        t = r["time_ms"] / 1e3
        timing = timings.get(t)
        if timing is None:
            from wsclip.bench.timing import Timing

            timing = Timing(t, [t], method="cuda-events" if ctx.gpu else "wall-clock")
        ceiling = ctx.ceiling("fp32") if r.get("GFLOPs") else None
        row = res.timed(case, r["variant"], _role(r["variant"]), timing, items=items_of(r["shape"]), unit=unit,
                        peak_mem_MB=r.get("peak_mem_MB"), **extra)
        if ceiling and r.get("GFLOPs"):
            row["achieved_GFLOPs"] = r["GFLOPs"]
            row["mfu"] = r["GFLOPs"] / ceiling
            row["ceiling"] = "matmul_fp32_GFLOPs"
        if r.get("rel_err") is not None:
            res.check(case, f"{r['variant']}: relative error against the reference", rel_err=r["rel_err"],
                      tolerance=1e-4 if "triton" not in r["variant"] else 2e-3, detail=r.get("note") or "")
    for s in speed:
        cmp = {"case": s["kernel"], "metric": "peak memory" if "memory" in s.get("metric", "") else "throughput",
               "fast": s["fast"], "baseline": s["baseline"], "ratio": float(s["ratio"])}
        if "target" in s:
            cmp.update(target=float(s["target"]), met=bool(s["ratio"] >= s["target"]))
        res.comparisons.append(cmp)
    if not ctx.gpu:
        res.skip(kernel, "triton", "wsclip", "Triton kernels need a CUDA GPU; on the CPU wsclip runs the PyTorch path")
