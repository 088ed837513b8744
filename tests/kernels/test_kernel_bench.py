"""benchmarks/kernels.py runs end to end on toy sizes and writes its JSON (no timing is checked)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_kernel_benchmark_tiny(tmp_path):
    out = tmp_path / "k.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--tiny", "--device", "cpu",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["mode"] == "tiny" and res["device_type"] == "cpu" and "PyTorch paths only" in res["paths"]
    assert res["torch"] and "kernels.py" in res["command"] and "triton" in res
    assert {"copy_GBps", "matmul_fp32_GFLOPs"} <= set(res["ceilings"])
    kernels = {r["kernel"] for r in res["results"]}
    assert {"masked_batch", "random_walk", "caa"} <= kernels
    timed = [r for r in res["results"] if "time_ms" in r]
    assert all(r["time_ms"] > 0 for r in timed)
    walk = [r for r in timed if r["kernel"] == "random_walk" and "rel_err" in r]
    assert walk and all(r["rel_err"] < 1e-4 for r in walk)  # stencil agrees with the dense IRN baseline
    assert any(s["baseline"] == "dense IRN fp32" for s in res["speedups"])
