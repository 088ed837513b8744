"""The one prepared device check: everything only a GPU can show, in one call of under 8 minutes.

    benchmarks/gpu_check.sh [--dry-run] [--out DIR]      (the shell wrapper installs carried wheels first)

Runs, each as its own process with its own time limit, and prints one PASS / FAIL / SKIP line each:
  environment   device name, driver, torch / triton versions, `wsclip doctor`
  kernels       every Triton kernel parity test (tests/kernels: forward and backward, odd sizes,
                poisoned outputs) on CUDA (TRITON_INTERPRET=0), tolerances from the decided precision
  cuda-paths    CUDA-graph and torch.compile paths against eager (benchmarks/gpu_paths.py)
  bench <suite> every `wsclip bench` suite at full size (one process per suite)
  profile       `wsclip profile` of each predictor, when this checkout has that command
  tensorrt      ONNX export -> TensorRT engine -> `wsclip export check`, when TensorRT is importable
then an overall line. A step the 7.5-minute budget leaves no time for is a FAIL ("not run"). Everything (logs, JSON, junit XML, summary) goes to benchmarks/results/
gpu_check_<time>/ (or --out), and is copied to $OUT when that is set (the device tool returns it).

--dry-run runs the same steps on the CPU at toy sizes (Triton interpreter, a few kernel tests,
`bench --tiny`, torch.compile with aot_eager); CI runs it (tests/bench/test_gpu_check.py).
Standard library only: it must report even when torch cannot be imported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOTAL_S = 7.5 * 60  # the whole check on the GPU machine, leaving margin under 8 minutes
#: the dry run runs on shared CI CPUs: its steps get this many times their GPU budget
DRY_SLACK = 4
SKIP_RC = 77  # a step that cannot run here exits with this

SUITES = ("clip-encode", "clims-step", "clip-es-label", "label-e2e", "random-walk", "masked-batch", "caa")
#: a few kernel tests for the dry run: forward and backward of each kernel (CI runs them all anyway)
DRY_KERNEL_TESTS = ("tests/kernels/test_masked_batch.py::test_gradcheck_of_the_triton_backward",
                    "tests/kernels/test_random_walk.py::test_many_classes_use_several_class_blocks",
                    "tests/kernels/test_caa.py::test_propagate_fp16_and_empty_mask")


class Check:
    def __init__(self, py: str, res: Path, dry: bool, env: dict):
        self.py, self.res, self.dry, self.env = py, res, dry, env
        self.t0 = time.monotonic()
        self.lines: list[dict] = []
        (res / "logs").mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return TOTAL_S * (DRY_SLACK if self.dry else 1) - (time.monotonic() - self.t0)

    def step(self, name: str, budget: float, cmd: list[str], env: dict | None = None, verdict=None) -> dict:
        """Run cmd with min(budget, time left) seconds; PASS on exit 0, SKIP on exit 77, FAIL otherwise
        (or what `verdict(rc, log)` says); the log goes to logs/<name>.log."""
        log = self.res / "logs" / (name.replace(" ", "_").replace("/", "_") + ".log")
        limit = min(budget * (DRY_SLACK if self.dry else 1), self.left())
        if limit < 10:
            return self._record(name, "FAIL", "not run: no time left in the budget", 0.0, log)
        t = time.monotonic()
        try:
            with open(log, "w") as f:
                proc = subprocess.run(cmd, cwd=ROOT, env={**self.env, **(env or {})}, stdout=f,
                                      stderr=subprocess.STDOUT, timeout=limit)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
        dt = time.monotonic() - t
        text = log.read_text(errors="replace")
        if rc is None:
            status, detail = "FAIL", f"timed out after {limit:.0f} s"
        elif verdict is not None:
            status, detail = verdict(rc, text)
        else:
            status = "PASS" if rc == 0 else "SKIP" if rc == SKIP_RC else "FAIL"
            detail = _last_line(text) if status != "PASS" else _summary_line(text)
        return self._record(name, status, detail, dt, log)

    def _record(self, name, status, detail, dt, log) -> dict:
        line = {"check": name, "status": status, "detail": detail, "seconds": round(dt, 1),
                "log": str(log.relative_to(self.res))}
        self.lines.append(line)
        print(f"{status:<4} {name} ({dt:.0f} s): {detail}", flush=True)
        return line


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _summary_line(text: str) -> str:
    for ln in reversed(text.strip().splitlines()):
        if " passed" in ln or " failed" in ln or ln.startswith(("PASS", "wrote")):
            return ln.strip().strip("=").strip()[:300]
    return _last_line(text)


def bench_verdict(out_dir: Path, suite: str):
    """PASS when the suite ran and every equivalence check in its JSON passed; SKIP when it skipped."""

    def verdict(rc: int, text: str):
        files = sorted(out_dir.glob("bench_*.json"), key=os.path.getmtime)
        if not files:
            return "FAIL", f"no result file (exit {rc}): {_last_line(text)}"
        run = json.loads(files[-1].read_text())
        entry = run["suites"].get(suite, {})
        if entry.get("status") == "skipped":
            return "SKIP", entry.get("reason", "")[:300]
        failed = [c["name"] for c in entry.get("checks", []) if not c.get("passed")]
        if entry.get("status") != "ok" or failed or rc != 0:
            return "FAIL", (entry.get("reason") or f"checks failed: {', '.join(failed)}")[:300]
        ratios = [f"{c.get('case')}: {c['ratio']:.2f}x vs {c.get('baseline')}" for c in entry.get("comparisons", [])
                  if isinstance(c.get("ratio"), (int, float))][:2]
        return "PASS", f"{len(entry.get('checks', []))} checks passed; " + "; ".join(ratios)

    return verdict


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at toy sizes (CI)")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/gpu_check_<time>)")
    args = p.parse_args(argv)
    dry = args.dry_run
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    res = (args.out or ROOT / "benchmarks" / "results" / f"gpu_check{'_dry' if dry else ''}_{stamp}").resolve()
    res.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    env = {**os.environ, "WSCLIP_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [q for q in env.get("PYTHONPATH", "").split(os.pathsep)
                                                       if q and q != str(ROOT)])
    c = Check(py, res, dry, env)
    print(f"wsclip gpu check{' (dry run: CPU, toy sizes)' if dry else ''} -> {res}", flush=True)

    # environment: what ran where (always first; a broken torch shows here)
    c.step("environment", 45, [py, "-c", _ENV_PY, str(res / "environment.json")])
    if not dry:
        shutil.which("nvidia-smi") and c.step("nvidia-smi", 20, ["nvidia-smi"])

    # kernels on CUDA (or the interpreter in the dry run)
    pytest = [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={res / 'kernels_junit.xml'}"]
    if dry:
        c.step("kernels", 30, pytest + list(DRY_KERNEL_TESTS), env={"TRITON_INTERPRET": "1"})
    else:
        c.step("kernels", 120, pytest + ["tests/kernels", "--ignore=tests/kernels/test_compile.py"],
               env={"TRITON_INTERPRET": "0", "WSCLIP_KERNEL_DEVICE": "cuda"})

    c.step("cuda-paths", 120, [py, "benchmarks/gpu_paths.py", "--out", str(res / "cuda_paths.json")]
           + (["--dry-run"] if dry else []))

    # every bench suite: full size on the GPU (short measurement budget), --tiny on the CPU
    suites = SUITES if not dry else ("random-walk", "caa")
    for s in suites:
        mode = ["--tiny", "--device", "cpu"] if dry else ["--device", "cuda", "--budget", "3"]
        out_dir = res / "bench" / s
        out_dir.mkdir(parents=True, exist_ok=True)
        c.step(f"bench {s}", 20 if dry else 50, [py, "-m", "wsclip.cli", "bench", "--suites", s, "--out",
                                                 str(out_dir), *mode], verdict=bench_verdict(out_dir, s))

    # wsclip profile on each predictor, when the command exists (issue 16)
    helptext = subprocess.run([py, "-m", "wsclip.cli", "profile", "--help"], cwd=ROOT, env=env, capture_output=True,
                              text=True)
    if helptext.returncode != 0:
        c._record("profile", "SKIP", "`wsclip profile` is not in this checkout", 0.0, res / "logs" / "profile.log")
    elif "--all" not in helptext.stdout:
        c._record("profile", "SKIP", "`wsclip profile` has no --all (every predictor): wire its invocation into "
                  "benchmarks/gpu_check.py", 0.0, res / "logs" / "profile.log")
    else:
        c.step("profile", 90, [py, "-m", "wsclip.cli", "profile", "--all", "--device", "cpu" if dry else "cuda",
                                "--out", str(res / "profile")] + (["--tiny"] if dry else []))

    c.step("tensorrt", 120, [py, "benchmarks/gpu_trt.py", "--out", str(res / "tensorrt")] + (["--dry-run"] if dry else []))

    bad = [ln for ln in c.lines if ln["status"] == "FAIL"]
    overall = "FAIL" if bad else "PASS"
    total = time.monotonic() - c.t0
    summary = {"overall": overall, "dry_run": dry, "seconds": round(total, 1), "created": stamp,
               "command": " ".join(["benchmarks/gpu_check.sh"] + (argv if argv is not None else sys.argv[1:])),
               "checks": c.lines}
    (res / "summary.json").write_text(json.dumps(summary, indent=1))
    text = "\n".join(f"{ln['status']:<4} {ln['check']}: {ln['detail']}" for ln in c.lines)
    (res / "summary.txt").write_text(text + f"\nOVERALL {overall} ({len(bad)} failed, {total:.0f} s)\n")
    print(f"OVERALL {overall}: {sum(ln['status'] == 'PASS' for ln in c.lines)} passed, {len(bad)} failed, "
          f"{sum(ln['status'] == 'SKIP' for ln in c.lines)} skipped in {total:.0f} s; results in {res}", flush=True)
    out = os.environ.get("OUT")
    if out:
        shutil.copytree(res, Path(out) / res.name, dirs_exist_ok=True)
    return 1 if bad else 0


_ENV_PY = r"""
import json, platform, subprocess, sys
info = {"python": sys.version.split()[0], "platform": platform.platform()}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1))
except Exception as e:
    info["torch_error"] = repr(e)
for mod in ("triton", "onnx", "onnxruntime", "open_clip", "tensorrt"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as e:
        info[mod] = None
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info))
subprocess.run([sys.executable, "-m", "wsclip.cli", "doctor"])
if "torch_error" in info:
    sys.exit(1)
"""

if __name__ == "__main__":
    sys.exit(main())
