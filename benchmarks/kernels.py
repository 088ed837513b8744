"""Kernel benchmarks: each wsclip kernel against its PyTorch reference (and the random walk
against IRN's dense formulation), at the sizes of the real jobs.

    .venv/bin/python benchmarks/kernels.py [--quick | --tiny] [--threads N] [--out FILE]

For every variant: median time, achieved bandwidth or FLOP rate next to the ceilings measured
in the same run (a large copy; a large matmul), peak memory, error against the reference,
and the speed-up ratios. On a CUDA device everything runs (Triton kernels, PyTorch paths,
dense baselines); on the CPU only the PyTorch paths run (the Triton kernels need a GPU; the
interpreter the tests use is orders of magnitude slower) and the report says so. Writes
JSON (device, versions, command, all numbers) to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wsclip.bench.timing import Meter  # noqa: E402 - medians, CUDA events, peak memory
from wsclip.io import atomic_write_json  # noqa: E402
from wsclip.kernels import (  # noqa: E402
    caa_propagate,
    caa_refine,
    caa_transition,
    dense_random_walk,
    masked_batch,
    neighbor_offsets,
    random_walk,
)
from wsclip.kernels.caa import caa_propagate_reference, caa_transition_reference  # noqa: E402
from wsclip.kernels.masked_batch import masked_batch_reference  # noqa: E402

MB = 1e6

# Problem sizes per mode. mb: (images B, classes K, output size S, image side H, CAM side h);
# rw: (grid side, also run the dense baseline) per device type; caa: patch-grid sides.
SIZES = {
    "full": {"mb": (16, 20, 224, 512, 32), "rw_cpu": [(64, True), (128, False)], "rw_gpu": [(128, True)],
             "caa_cpu": [32, 64], "caa_gpu": [32, 64], "copy_mb": 512, "mm": 2048, "mm_gpu": 8192},
    "quick": {"mb": (16, 20, 224, 512, 32), "rw_cpu": [(32, True), (128, False)], "rw_gpu": [(128, True)],
              "caa_cpu": [32], "caa_gpu": [32, 64], "copy_mb": 64, "mm": 1024, "mm_gpu": 8192},
    "tiny": {"mb": (2, 4, 32, 64, 8), "rw_cpu": [(12, True)], "rw_gpu": [(12, True)],
             "caa_cpu": [6], "caa_gpu": [6], "copy_mb": 8, "mm": 256, "mm_gpu": 1024},
}


# ----------------------------------------------------------------------------- measuring
def ceilings(meter: Meter, quick: bool, size: dict) -> dict:
    """Measured copy bandwidth (bytes read + written) and matmul rates on this device."""
    dev = meter.device
    n = max(size["copy_mb"], 512 if meter.cuda and size["copy_mb"] >= 64 else 0) * 2**20 // 4
    src = torch.rand(n, device=dev)
    dst = torch.empty_like(src)
    t = meter.time(lambda: dst.copy_(src), reps=5 if quick else 20)
    out = {"copy_GBps": 2 * n * 4 / t / 1e9}
    del src, dst
    m = size["mm_gpu"] if meter.cuda else size["mm"]
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)) if meter.cuda else (("fp32", torch.float32),):
        a = torch.rand(m, m, device=dev, dtype=dt)
        t = meter.time(lambda: a @ a, reps=3 if quick else 10)
        out[f"matmul_{name}_GFLOPs"] = 2 * m**3 / t / 1e9
    if meter.cuda:
        out["tf32_matmul_allowed"] = torch.backends.cuda.matmul.allow_tf32
    return out


def _cpu(meter) -> float | None:
    """The last measurement's process CPU time, when the meter keeps one (other meters may not)."""
    return getattr(meter, "last_cpu", None)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _row(kernel, variant, shape, t, meter, ceil, *, fn=None, nbytes=None, flops=None, err=None, peak=None, note=None,
         cpu=None):
    row = {"kernel": kernel, "variant": variant, "shape": shape, "time_ms": t * 1e3}
    if cpu is not None:
        row["cpu_ms"] = cpu * 1e3
    if nbytes is not None:
        row["GBps"] = nbytes / t / 1e9
        row["pct_copy_ceiling"] = 100 * row["GBps"] / ceil["copy_GBps"]
    if flops is not None:
        row["GFLOPs"] = flops / t / 1e9
        row["pct_matmul_fp32_ceiling"] = 100 * row["GFLOPs"] / ceil["matmul_fp32_GFLOPs"]
    if peak is None and fn is not None:
        peak = meter.peak(fn)
    row["peak_mem_MB"] = peak
    if err is not None:
        row["rel_err"] = err
    if note:
        row["note"] = note
    return row


# ----------------------------------------------------------------------------- masked batch
def bench_masked_batch(meter, ceil, quick, gpu, size):
    dev = meter.device
    B, K, S, H, h = size["mb"]
    sets = []
    for _ in range(3 if gpu else 1):  # rotate input sets on the GPU so L2 does not hold them
        images = torch.rand(B, 3, H, H, device=dev)
        cams = torch.rand(B, K, h, h, device=dev)
        cls = torch.stack([torch.randperm(K)[:2] for _ in range(B)]).to(dev)
        pairs = torch.stack([torch.arange(B, device=dev).repeat_interleave(2), cls.reshape(-1)], 1)
        sets.append((images, cams, pairs))
    M = pairs.shape[0]
    shape = {"images": [B, 3, H, H], "cams": [B, K, h, h], "pairs": M, "size": S}
    out_dtype = torch.float16 if gpu else torch.float32
    turn = [0]

    def nxt() -> int:
        turn[0] = (turn[0] + 1) % len(sets)
        return turn[0]

    def ref():
        i, c, p = sets[nxt()]
        return masked_batch_reference(i, c, p, S, out_dtype=out_dtype)

    def fast():
        i, c, p = sets[nxt()]
        return masked_batch(i, c, p, S, out_dtype=out_dtype, backend="triton")

    # fewest bytes: each image and CAM read once, both outputs written once
    nbytes = images.numel() * 4 + cams.numel() * 4 + 2 * M * 3 * S * S * torch.finfo(out_dtype).bits // 8
    reps = 5 if quick else 20
    rows = []
    t_ref = meter.time(ref, reps)
    rows.append(_row("masked_batch", "torch reference (interpolate, normalise, multiply)", shape, t_ref, meter, ceil,
                     fn=ref, nbytes=nbytes, note=f"out {str(out_dtype)[6:]}", cpu=_cpu(meter)))
    speed = []
    if gpu:
        i, c, p = sets[0]
        err = max(_rel(a, b) for a, b in zip(masked_batch(i, c, p, S, out_dtype=torch.float32, backend="triton"),
                                                masked_batch_reference(i, c, p, S)))
        t_fast = meter.time(fast, reps)
        rows.append(_row("masked_batch", "triton fused", shape, t_fast, meter, ceil, fn=fast, nbytes=nbytes, err=err,
                         note=f"out {str(out_dtype)[6:]}; rel_err measured with fp32 output"))
        speed.append({"kernel": "masked_batch", "fast": "triton fused", "baseline": "torch reference",
                      "ratio": t_ref / t_fast, "target": 3.0})
        speed.append({"kernel": "masked_batch", "metric": "percent of copy bandwidth", "fast": "triton fused",
                      "baseline": "measured copy", "ratio": rows[-1]["pct_copy_ceiling"], "target": 70.0})
        # forward + backward, as in a CLIMS training step
        cams_g = [c.clone().requires_grad_(True) for _, c, _ in sets]

        def train_step(f):
            def run():
                k = nxt()
                fg, bg = f(sets[k][0], cams_g[k], sets[k][2])
                (fg.float().sum() + bg.float().sum()).backward()
            return run

        slow_step = train_step(lambda i, c, p: masked_batch_reference(i, c, p, S, out_dtype=out_dtype))
        fast_step = train_step(lambda i, c, p: masked_batch(i, c, p, S, out_dtype=out_dtype, backend="triton"))
        t_rb = meter.time(slow_step, reps)
        t_fb = meter.time(fast_step, reps)
        rows.append(_row("masked_batch", "torch reference fwd+bwd", shape, t_rb, meter, ceil, fn=slow_step))
        rows.append(_row("masked_batch", "triton fwd+bwd", shape, t_fb, meter, ceil, fn=fast_step))
        speed.append({"kernel": "masked_batch fwd+bwd", "fast": "triton", "baseline": "torch reference",
                      "ratio": t_rb / t_fb})
    return rows, speed


# ----------------------------------------------------------------------------- random walk
def _rw_inputs(dev, C, H, W, radius, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    K = len(neighbor_offsets(radius))
    x = torch.rand(1, C, H, W, generator=g).to(dev)
    aff = (1 - 0.3 * torch.rand(1, K, H, W, generator=g)).to(dev)  # IRN-like affinities near 1
    return x, aff


def _rw_cost(C, H, W, radius, exp_times):
    K = len(neighbor_offsets(radius))
    hw = H * W
    steps = 2**exp_times
    flops = steps * 2 * (2 * K + 1) * C * hw
    nbytes = steps * 4 * hw * (2 * C + K + 1)  # per step: read x, write x', read K weights and 1/D
    dense_flops = exp_times * 2 * hw**3 + 2 * C * hw**2
    return flops, nbytes, dense_flops


def bench_random_walk(meter, ceil, quick, gpu, size):
    dev = meter.device
    radius, beta, exp_times, C = 5, 10.0, 8, 21
    rows, speed = [], []
    # (grid for the stencil-vs-dense comparison, grid for the stencil alone)
    grids = size["rw_gpu"] if gpu else size["rw_cpu"]
    for side, with_dense in grids:
        H = W = side
        shape = {"C": C, "H": H, "W": W, "radius": radius, "beta": beta, "exp_times": exp_times}
        x, aff = _rw_inputs(dev, C, H, W, radius)
        flops, nbytes, dense_flops = _rw_cost(C, H, W, radius, exp_times)
        reps = 2 if quick else 5
        variants = [("torch", "torch stencil (sparse CSR)")]
        if gpu:
            variants += [("triton", "triton stencil"), ("triton+graph", "triton stencil, CUDA graph replay")]
        runs = []  # (backend, name, fn, seconds, output, cpu seconds)
        for backend, name in variants:
            fn = lambda b=backend: random_walk(x, aff, radius, beta, exp_times, backend=b.split("+")[0],  # noqa: E731
                                               cuda_graph=b.endswith("graph"))
            out = fn()
            runs.append((backend, name, fn, meter.time(fn, reps, warmup=1 if gpu else 0, budget_s=20), out,
                         _cpu(meter)))
        times = {r[0]: r[3] for r in runs}
        cpus = {r[0]: r[5] for r in runs}
        cpu_dense = None
        dense_out = None
        if with_dense:
            dfn = lambda: dense_random_walk(x, aff, radius, beta, exp_times, dtype=torch.float32)  # noqa: E731
            if gpu:
                dense_out = dfn()
                t_dense = meter.time(dfn, 1 if quick else 3, warmup=0)
                peak_dense = meter.peak(dfn)
            else:  # seconds to minutes on a CPU: one run gives the output, the time and the peak
                box = {}

                def timed():
                    t, c = time.perf_counter(), time.process_time()
                    box["out"] = dfn()
                    box["t"], box["cpu"] = time.perf_counter() - t, time.process_time() - c

                peak_dense = meter.peak(timed)
                dense_out, t_dense, cpu_dense = box["out"], box["t"], box["cpu"]
        for backend, name, fn, t, out, cpu in runs:
            err = _rel(out, dense_out) if dense_out is not None else None
            rows.append(_row("random_walk", name, shape, t, meter, ceil, fn=fn, nbytes=nbytes, flops=flops, err=err,
                             note="rel_err vs dense IRN fp32" if err is not None else None, cpu=cpu))
        if dense_out is not None:
            rows.append(_row("random_walk", "dense IRN (T as HW x HW, squared exp_times times, fp32)", shape,
                             t_dense, meter, ceil, flops=dense_flops, peak=peak_dense, cpu=cpu_dense))
            for (backend, name, *_), row in zip(runs, rows[-len(runs) - 1 : -1]):
                s = {"kernel": f"random_walk {H}x{W}", "fast": name, "baseline": "dense IRN fp32",
                     "ratio": t_dense / times[backend]}
                if cpu_dense and cpus[backend]:
                    s["ratio_cpu_time"] = cpu_dense / cpus[backend]
                if backend.startswith("triton"):
                    s["target"] = 1000.0
                elif not gpu and side == 64:
                    s["target"] = 50.0
                speed.append(s)
                if row.get("peak_mem_MB") and peak_dense:
                    speed.append({"kernel": f"random_walk {H}x{W}", "metric": "peak memory ratio", "fast": name,
                                  "baseline": "dense IRN fp32", "ratio": peak_dense / row["peak_mem_MB"],
                                  **({"target": 100.0} if backend == "triton" else {})})
        elif not gpu:
            est = dense_flops / (ceil["matmul_fp32_GFLOPs"] * 1e9)
            rows.append({"kernel": "random_walk", "variant": "dense IRN (not run)", "shape": shape,
                         "note": f"{dense_flops / 1e12:.1f} TFLOP and {3 * (H * W) ** 2 * 4 / 1e9:.1f} GB: "
                                 f"about {est / 60:.0f} min at the measured matmul rate"})
        if gpu and "triton" in times:
            speed.append({"kernel": f"random_walk {H}x{W}", "fast": "triton stencil", "baseline": "torch stencil (sparse CSR)",
                          "ratio": times["torch"] / times["triton"]})
    return rows, speed


# ----------------------------------------------------------------------------- CAA
def bench_caa(meter, ceil, quick, gpu, size):
    dev = meter.device
    rows, speed = [], []
    C = 3
    sides = size["caa_gpu"] if gpu else size["caa_cpu"]
    for side in sides:
        N = side * side
        shape = {"B": 1, "N": N, "classes": C}
        attn = (torch.randn(1, N, N, device=dev) * 3).softmax(-1)
        cams = torch.rand(1, C, side, side, device=dev)
        masks = torch.rand(1, C, side, side, device=dev) > 0.5
        slow = not gpu and N >= 4096  # an N^3 product on a CPU: seconds per call, time it once
        reps, warm = (1, 0) if slow else ((2, 1) if quick else (10, 1))
        trans_flops = 2 * N**3
        prop_bytes = 4 * N * N
        # the truth in fp64: the literal algorithm, or (too slow on a CPU at N = 4096) the (V S) S form
        if slow:
            truth = caa_refine(attn.double(), cams.double(), masks)
        else:
            truth = caa_propagate_reference(caa_transition_reference(attn.double()), cams.double(), masks)
        box = {}

        def ref_transition():
            box["A"] = caa_transition_reference(attn)
            return box["A"]

        t_ref_t = meter.time(ref_transition, reps, warmup=warm)
        c_ref_t = _cpu(meter)
        A = box["A"]
        rows.append(_row("caa_transition", "torch reference (6 normalisation passes, matmul)", shape, t_ref_t,
                         meter, ceil, fn=ref_transition, flops=trans_flops, cpu=c_ref_t))
        t_ref_p = meter.time(lambda: caa_propagate_reference(A, cams, masks), reps, warmup=warm)
        c_ref_p = _cpu(meter)
        rows.append(_row("caa_propagate", "torch reference (matmul, min-max)", shape, t_ref_p, meter, ceil,
                         fn=lambda: caa_propagate_reference(A, cams, masks), nbytes=prop_bytes, cpu=c_ref_p))
        t_ref = t_ref_t + t_ref_p
        c_ref = c_ref_t + c_ref_p if c_ref_t is not None else None
        rows.append(_row("caa", "torch reference transition + propagate", shape, t_ref, meter, ceil,
                         flops=trans_flops, peak=rows[-2]["peak_mem_MB"], cpu=c_ref,
                         err=_rel(caa_propagate_reference(A, cams, masks), truth),
                         note="time: the sum of the two rows above"))
        variants = [("torch", "torch")] + ([("triton", "triton")] if gpu else [])
        for backend, name in variants:
            fn = lambda b=backend: caa_refine(attn, cams, masks, backend=b)  # noqa: E731
            t = meter.time(fn, max(reps, 3), warmup=1)
            c = _cpu(meter)
            rows.append(_row("caa", f"caa_refine {name} (F = (V S) S, no N^3 square)", shape, t, meter, ceil, fn=fn,
                             flops=8 * C * N * N + 12 * N * N, err=_rel(fn(), truth), cpu=c))
            speed.append({"kernel": f"caa N={N}", "fast": f"caa_refine {name}", "baseline": "torch reference transition + propagate",
                          "ratio": t_ref / t, **({"ratio_cpu_time": c_ref / c} if c and c_ref else {})})
        if gpu:
            ft = lambda: caa_transition(attn, backend="triton")  # noqa: E731
            t_t = meter.time(ft, reps)
            rows.append(_row("caa_transition", "triton (scale vectors, fused symmetrise, upper-triangle tl.dot)",
                             shape, t_t, meter, ceil, fn=ft, flops=trans_flops,
                             err=_rel(ft(), caa_transition_reference(attn.double())), note="tf32 tensor cores"))
            speed.append({"kernel": f"caa_transition N={N}", "fast": "triton", "baseline": "torch reference (cuBLAS)",
                          "ratio": t_ref_t / t_t})
            fp = lambda: caa_propagate(A, cams, masks, backend="triton")  # noqa: E731
            t_p = meter.time(fp, reps)
            rows.append(_row("caa_propagate", "triton", shape, t_p, meter, ceil, fn=fp, nbytes=prop_bytes,
                             err=_rel(fp(), caa_propagate_reference(A, cams, masks))))
            speed.append({"kernel": f"caa_propagate N={N}", "fast": "triton", "baseline": "torch reference (cuBLAS)",
                          "ratio": t_ref_p / t_p})
    return rows, speed


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and smaller CPU baselines (under a minute on a CPU)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes: checks that the harness runs (tests use it)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default on the CPU: 1, steady numbers on a shared machine)")
    ap.add_argument("--only", choices=["masked_batch", "random_walk", "caa"], action="append", help="run only these")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/kernels_<device>.json)")
    args = ap.parse_args(argv)

    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = dev.type == "cuda"
    if args.threads or not gpu:
        torch.set_num_threads(args.threads or 1)
    torch.manual_seed(0)
    meter = Meter(dev)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(dev) if gpu else (platform.processor() or platform.machine())
    t0 = time.perf_counter()
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    quick = mode != "full"
    ceil = ceilings(meter, quick, SIZES[mode])
    rows, speed = [], []
    for kernel, bench in (("masked_batch", bench_masked_batch), ("random_walk", bench_random_walk), ("caa", bench_caa)):
        if args.only and kernel not in args.only:
            continue
        r, s = bench(meter, ceil, quick, gpu, SIZES[mode])
        rows += r
        speed += s
    for s in speed:
        if "target" in s:
            s["met"] = s["ratio"] >= s["target"]
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": name,
        "device_type": dev.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "mode": mode,
        "paths": "all (Triton, PyTorch, dense baselines)" if gpu else
                 "CPU: PyTorch paths only (Triton kernels need a CUDA GPU)",
        "ceilings": ceil,
        "results": rows,
        "speedups": speed,
        "seconds": time.perf_counter() - t0,
    }
    tag = "cuda_" + name.replace(" ", "_").lower() if gpu else "cpu"
    suffix = ("" if mode == "full" else "_" + mode) + ("_only-" + "-".join(args.only) if args.only else "")
    out = args.out or ROOT / "benchmarks" / "results" / f"kernels_{tag}{suffix}.json"
    atomic_write_json(out, result)

    print(f"device: {name} ({result['paths']}); torch {torch.__version__}, triton {triton_version}, "
          f"threads {result['threads']}")
    print("ceilings: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in ceil.items()))
    print(f"{'kernel':<16} {'variant':<58} {'ms':>10} {'cpu ms':>10} {'GB/s':>8} {'GFLOP/s':>9} {'peak MB':>8} {'rel err':>8}")
    for r in rows:
        if "time_ms" not in r:
            print(f"{r['kernel']:<16} {r['variant']:<58} {r.get('note', '')}")
            continue
        f = lambda k, fmt: format(r[k], fmt) if r.get(k) is not None else "-"  # noqa: E731
        print(f"{r['kernel']:<16} {r['variant'][:58]:<58} {r['time_ms']:>10.3f} {f('cpu_ms', '10.3f'):>10} {f('GBps', '8.1f'):>8} "
              f"{f('GFLOPs', '9.1f'):>9} {f('peak_mem_MB', '8.1f'):>8} {f('rel_err', '8.1e'):>8}")
    for s in speed:
        unit = "" if s.get("metric", "").startswith("percent") else "x"
        tgt = f" (target {s['target']:g}{unit}: {'met' if s['met'] else 'NOT met'})" if "target" in s else ""
        cpu = f" (process CPU time: {s['ratio_cpu_time']:.1f}x)" if "ratio_cpu_time" in s else ""
        print(f"{s.get('metric', 'speed-up')} {s['kernel']}: {s['fast']} vs {s['baseline']}: {s['ratio']:.1f}{unit}{tgt}{cpu}")
    print(f"wrote {out} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
