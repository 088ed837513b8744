"""The CUDA-graph and torch.compile paths against eager, on fresh random inputs (part of gpu_check.sh).

    python benchmarks/gpu_paths.py --out paths.json [--dry-run]

Checks, each PASS / FAIL / SKIP with its error and tolerance:
- random-walk CUDA graph: `random_walk(..., cuda_graph=True)` (captured, then replayed on new
  inputs of the same shape) against the eager Triton launches and IRN's dense formulation;
- torch.compile of the CAM network (ResNet-50 at 448 px, batch 8, inference precision: fp32
  without TF32) against eager, default mode and "reduce-overhead" (inductor's CUDA graphs);
- torch.compile of the CAM network under bf16 autocast (`--amp`) against eager bf16.
`--dry-run` runs the same checks on the CPU at toy sizes (tiny backbone; torch.compile with the
"aot_eager" backend, which traces with dynamo and AOTAutograd but generates no code); the CUDA-graph
checks then SKIP. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wsclip.runtime import precision  # noqa: E402

U_BF16 = 2.0**-8


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_random_walk_graph(dev: torch.device, dry: bool) -> dict:
    if dev.type != "cuda":
        return {"status": "SKIP", "detail": "CUDA graphs need CUDA"}
    from wsclip.kernels import dense_random_walk, neighbor_offsets, random_walk

    radius = 5
    k = len(neighbor_offsets(radius))
    B, C, H, W = (2, 21, 32, 32) if not dry else (1, 3, 7, 9)
    errs = []
    for trial in range(3):  # call 1 captures; calls 2 and 3 replay on new inputs
        x = torch.rand(B, C, H, W, device=dev)
        aff = 0.2 + 0.8 * torch.rand(B, k, H, W, device=dev)
        eager = random_walk(x, aff, radius, exp_times=8, backend="triton")
        graph = random_walk(x, aff, radius, exp_times=8, backend="triton", cuda_graph=True)
        errs.append(_rel(graph, eager))
        if trial == 0:
            dense = dense_random_walk(x, aff, radius, exp_times=8)
            errs.append(_rel(eager, dense))
    tol = 1e-5
    return {"status": "PASS" if max(errs) <= tol else "FAIL", "rel_err": max(errs), "tolerance": tol,
            "detail": f"x {B}x{C}x{H}x{W}, radius {radius}, 256 steps; graph vs eager on 3 fresh inputs, eager vs dense"}


def _camnet(dev: torch.device, dry: bool):
    from wsclip.models.camnet import CAMNet

    torch.manual_seed(0)
    net = CAMNet("tiny" if dry else "resnet50", 20).to(dev).eval()
    x = torch.randn(2 if dry else 8, 3, 64 if dry else 448, 64 if dry else 448, device=dev)
    return net, x


def check_compile(dev: torch.device, dry: bool, mode: str | None, amp: bool) -> dict:
    net, x = _camnet(dev, dry)
    backend = "aot_eager" if dev.type != "cuda" else "inductor"
    if mode == "reduce-overhead" and dev.type != "cuda":
        return {"status": "SKIP", "detail": "reduce-overhead (CUDA graphs) needs CUDA"}
    kwargs = {"backend": backend} if backend != "inductor" else {"mode": mode} if mode else {}
    compiled = torch.compile(net, dynamic=False, **kwargs)
    errs, agree = [], []
    with torch.inference_mode(), precision(dev, amp=amp):
        compiled(x)  # compile (and capture, for reduce-overhead) outside the comparison
        for _ in range(2):
            xi = torch.randn_like(x)
            ref, out = net(xi), compiled(xi)
            errs.append(_rel(out.float(), ref.float()))
            agree.append(float((out.argmax(1) == ref.argmax(1)).float().mean()))
    # fp32 without TF32: fusion and reduction order only (1e-4 norm-wise); bf16: a few bf16 roundings (2^-8)
    # of a deep net, norm-wise
    tol = 1e-4 if not amp else 8 * U_BF16
    ok = max(errs) <= tol
    return {"status": "PASS" if ok else "FAIL", "rel_err": max(errs), "tolerance": tol,
            "argmax_agreement": min(agree), "detail": f"CAMNet {'tiny' if dry else 'resnet50'} {tuple(x.shape)}, "
            f"torch.compile(backend={backend}{', mode=' + mode if mode else ''}), "
            f"{'bf16 autocast' if amp else 'fp32, TF32 off'}; 2 fresh inputs"}


CHECKS = {
    "random-walk CUDA graph vs eager": lambda d, dry: check_random_walk_graph(d, dry),
    "torch.compile CAMNet vs eager (fp32)": lambda d, dry: check_compile(d, dry, None, False),
    "torch.compile reduce-overhead CAMNet vs eager (fp32)": lambda d, dry: check_compile(d, dry, "reduce-overhead", False),
    "torch.compile CAMNet vs eager (bf16 autocast)": lambda d, dry: check_compile(d, dry, None, True),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes (the CI run of this script)")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("FAIL no CUDA device: the CUDA paths need a GPU (use --dry-run on a CPU)")
        return 1
    dev = torch.device("cpu" if args.dry_run else "cuda")
    results = {}
    for name, fn in CHECKS.items():
        t0 = time.perf_counter()
        try:
            res = fn(dev, args.dry_run)
        except Exception as exc:  # noqa: BLE001 - a crashing check is a failed check; the others still run
            res = {"status": "FAIL", "detail": f"{type(exc).__name__}: {exc}"[:1000],
                   "traceback": traceback.format_exc()[-3000:]}
        res["seconds"] = round(time.perf_counter() - t0, 2)
        results[name] = res
        print(f"{res['status']} {name}: {res.get('detail', '')}"
              + (f" (rel err {res['rel_err']:.2e} <= {res['tolerance']:.0e}?)" if "rel_err" in res else ""), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                                    "torch": torch.__version__, "dry_run": args.dry_run, "checks": results}, indent=1))
    return 1 if any(r["status"] == "FAIL" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
