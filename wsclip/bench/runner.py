"""Run benchmark suites (modules in benchmarks/suites/) and write one JSON file per run.

    path, run = run_benchmarks(["clip-encode", "random-walk"], mode="quick")

Each suite runs in isolation: one that cannot run here is recorded as skipped with its reason,
one that fails as an error with its message; the others still run.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType

import torch

from wsclip.bench.schema import MODES, SCHEMA_ID, shown_mfu, validate_run
from wsclip.bench.suite import Skip, SuiteContext, SuiteResult
from wsclip.bench.timing import Meter, measure_ceilings
from wsclip.errors import MissingFileError, WsclipError

#: report and run order; suites found on disk but not listed here run after these
ORDER = ("clip-encode", "clims-step", "clip-es-label", "label-e2e", "random-walk", "masked-batch", "caa")

# per mode: matmul side and copy size for the ceilings, seconds one measurement may spend repeating
_CEILING_SIZES = {("cuda", "full"): (8192, 1024), ("cuda", "quick"): (8192, 512), ("cuda", "tiny"): (1024, 64),
                  ("cpu", "full"): (1024, 128), ("cpu", "quick"): (768, 64), ("cpu", "tiny"): (256, 8)}
_BUDGET_S = {"full": 60.0, "quick": 4.0, "tiny": 2.0}


#: where runs are written and `bench report` reads them by default: relative to the current folder
DEFAULT_RESULTS = Path("benchmarks") / "results"
DEFAULT_MARKDOWN = Path("BENCHMARKS.md")


def repo_root() -> Path:
    """The source checkout holding benchmarks/suites (WSCLIP_REPO, else the package's parent, else the cwd)."""
    cands = [os.environ.get("WSCLIP_REPO"), Path(__file__).resolve().parents[2], Path.cwd()]
    for c in cands:
        if c and (Path(c) / "benchmarks" / "suites").is_dir():
            return Path(c).resolve()
    raise MissingFileError("benchmark suites live in a source checkout (benchmarks/suites/): run from the wsclip "
                           "repository, or set WSCLIP_REPO to it")


def load_suites(root: Path | None = None) -> dict[str, ModuleType | Exception]:
    """{suite name: module} for every benchmarks/suites/*.py (an import failure maps to its exception)."""
    root = Path(root) if root is not None else repo_root()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    found: dict[str, ModuleType | Exception] = {}
    for path in sorted((root / "benchmarks" / "suites").glob("*.py")):
        if path.name.startswith("_"):
            continue
        name = path.stem.replace("_", "-")
        try:
            mod = importlib.import_module(f"benchmarks.suites.{path.stem}")
            name = getattr(mod, "NAME", name)
            if not callable(getattr(mod, "run", None)):
                raise WsclipError(f"{path} has no run(ctx, res) function")
            found[name] = mod
        except Exception as exc:  # noqa: BLE001 - a broken suite must not stop the others
            found[name] = exc
    ordered = {n: found[n] for n in ORDER if n in found}
    ordered.update({n: m for n, m in found.items() if n not in ordered})
    return ordered


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WsclipError(f"--device {device}: CUDA is not available here; use --device cpu")
    return dev


def default_label(device: torch.device) -> str:
    from wsclip.bench.env import usable_cores

    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"{usable_cores()}-core CPU"


def run_benchmarks(suites: list[str] | None = None, mode: str = "full", device: str | None = None,
                   out_dir: Path | None = None, threads: int | None = None, label: str | None = None,
                   argv: list[str] | None = None, root: Path | None = None, quiet: bool = False,
                   modules: dict | None = None, budget_s: float | None = None) -> tuple[Path, dict]:
    """Run the named suites (default: all) and write `<out_dir>/bench_<device>_<mode>_<time>.json`.

    mode: full | quick (fewer sizes and repetitions) | tiny (toy sizes: checks that everything runs).
    On the CPU every suite runs at reduced sizes, stated in its `setup`. `modules` {name: suite module}
    replaces the suites found on disk. budget_s caps the seconds one measurement may spend repeating
    (default per mode: 60 full, 4 quick, 2 tiny; benchmarks/gpu_check.sh lowers it to fit its 8 minutes).
    Returns (path, run record).
    """
    if mode not in MODES:
        raise WsclipError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    root = Path(root) if root is not None else repo_root()
    available = dict(modules) if modules is not None else load_suites(root)
    names = list(available) if not suites else list(suites)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise WsclipError(f"unknown suite(s) {', '.join(unknown)}: choose from {', '.join(available)}")
    dev = resolve_device(device)
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        budget = float(budget_s) if budget_s is not None else _BUDGET_S[mode]
        return _run(names, available, mode, dev, out_dir, label, argv, root, quiet, budget)
    finally:
        torch.set_num_threads(threads_before)


def _run(names, available, mode, dev, out_dir, label, argv, root, quiet, budget) -> tuple[Path, dict]:
    out_dir = Path(out_dir) if out_dir is not None else DEFAULT_RESULTS  # the current folder, never the package's
    from wsclip.bench.env import capture_environment

    t_run = time.perf_counter()
    created = datetime.now(timezone.utc)
    meter = Meter(dev)
    mm, copy_mb = _CEILING_SIZES[(dev.type, mode)]
    # CPUs: fp32 only (without bf16 units a bf16 matmul is emulated and says nothing about bf16 layers)
    dtypes = ("fp32", "bf16", "fp16") if dev.type == "cuda" else ("fp32",)
    say = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    say(f"wsclip bench: {mode} mode on {dev} ({torch.get_num_threads()} threads), suites: {', '.join(names)}")
    ceilings = measure_ceilings(meter, mm, copy_mb, reps=3 if mode != "full" else 5, dtypes=dtypes)
    env = capture_environment(dev, argv, root)
    load = env.get("load_average")
    if dev.type == "cpu" and load and load[0] > env["cpu_cores"] and torch.get_num_threads() > 1:
        say(f"note: this machine is shared (load average {load[0]:.1f} on {env['cpu_cores']} cores): several "
            "torch threads then wait on each other; --threads 1 gives steadier and faster figures")
    record: dict = {
        "schema": SCHEMA_ID,
        "run_id": f"{created:%Y%m%dT%H%M%SZ}-{dev.type}-{mode}",
        "created": created.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "mode": mode,
        "cpu_mode": dev.type == "cpu",
        "label": label or default_label(dev),
        "notes": _notes(dev, mode),
        "environment": env,
        "ceilings": ceilings,
        "suites": {},
        "seconds": 0.0,
    }
    with tempfile.TemporaryDirectory(prefix="wsclip-bench-") as tmp:
        for name in names:
            mod = available[name]
            say(f"[{name}]")
            res = SuiteResult(name, "" if isinstance(mod, Exception) else getattr(mod, "DESCRIPTION", ""))
            ctx = SuiteContext(device=dev, meter=meter, mode=mode, ceilings=ceilings, tmp=Path(tmp) / name,
                               root=root, budget_s=budget, quiet=quiet)
            ctx.tmp.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            entry: dict = {"status": "ok"}
            if isinstance(mod, Exception):
                entry = {"status": "error", "reason": f"suite module failed to import: {type(mod).__name__}: {mod}"}
            else:
                try:
                    mod.run(ctx, res)
                except Skip as exc:
                    entry = {"status": "skipped", "reason": str(exc) or "skipped"}
                except Exception as exc:  # noqa: BLE001 - record the failure, run the other suites
                    entry = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"[:2000],
                             "traceback": traceback.format_exc()[-4000:]}
            entry.update(res.to_dict())
            entry["seconds"] = round(time.perf_counter() - t0, 3)
            record["suites"][name] = entry
            say(f"  -> {entry['status']}{': ' + entry['reason'] if entry.get('reason') else ''} "
                f"({entry['seconds']:.1f} s)")
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    record["seconds"] = round(time.perf_counter() - t_run, 3)
    problems = validate_run(record)
    if problems:  # a bug in a suite or the harness: refuse to write a file the report cannot read
        raise RuntimeError("benchmark record does not follow the schema: " + "; ".join(problems[:10]))
    from wsclip.io import atomic_write_json

    tag = "cpu" if dev.type == "cpu" else "cuda_" + "".join(c if c.isalnum() else "_" for c in record["label"].lower())
    path = out_dir / f"bench_{tag}_{mode}_{created:%Y%m%dT%H%M%SZ}.json"
    atomic_write_json(path, record)
    return path, record


def _notes(dev: torch.device, mode: str) -> list[str]:
    notes = []
    if dev.type == "cpu":
        notes.append("CPU mode: every suite runs at reduced sizes (batch, image count, resolution or model width, "
                     "as each suite's setup states); Triton, CUDA graphs and TensorRT need a GPU. GPU figures: "
                     "not measured in this run.")
    if mode == "quick":
        notes.append("--quick: fewer cases and repetitions than a full run.")
    if mode == "tiny":
        notes.append("--tiny: toy sizes that check the harness runs; the figures mean nothing.")
    return notes


def format_run(run: dict) -> str:
    """A short terminal summary of a run record."""
    lines = [f"{run['label']} ({run['environment']['device']}), {run['mode']} mode, {run['seconds']:.0f} s"]
    for name, s in run["suites"].items():
        if s["status"] != "ok":
            lines.append(f"  {name}: {s['status']}: {s.get('reason', '')}")
            continue
        lines.append(f"  {name}:")
        for r in s["results"]:
            if r["status"] == "ok":
                shown = shown_mfu(r, run["environment"]["device"])
                mfu = f", MFU {100 * shown:.1f}%" if shown is not None else ""
                lines.append(f"    {r['case']:<28} {r['variant']:<44} {r['throughput']:>10.3g} {r['unit']}"
                             f" ({r['latency_ms']:.1f} ms/call{mfu})")
            else:
                lines.append(f"    {r['case']:<28} {r['variant']:<44} {r['status']}: {r.get('reason', '')}")
        for c in s["comparisons"]:
            tgt = f" (target {c['target']:g}x: {'met' if c.get('met') else 'NOT met'})" if "target" in c else ""
            lines.append(f"    speed-up {c['case']}: {c['fast']} vs {c['baseline']}: {c['ratio']:.2f}x "
                         f"[{c['metric']}]{tgt}")
        for c in s["checks"]:
            if not c["passed"]:
                lines.append(f"    CHECK FAILED {c['case']} {c['name']}: {c.get('detail', '')}")
    return "\n".join(lines)
