"""`--backend auto` for PyTorch labeler modules: the fastest variant whose outputs match eager fp32.

On CUDA auto is eager (bf16 with --amp): the GPU design is unchanged. On the CPU the first
batch a labeler runs is a probe: eager fp32 (the reference), channels-last, bf16 autocast
(where the CPU has bf16 instructions) and ONNX Runtime (the checkpoint exported once into
`<cache>/onnx/`, when onnxruntime is installed) run on its first image; a variant is kept only
when its outputs pass the export parity check against eager fp32 (`wsclip.export.parity.
compare_outputs`: score relative error within PARITY_TOLERANCE of its precision and every
decisive mask pixel equal), and the fastest kept one wins. The choice is remembered per
(model file, options, machine, threads, torch) in `<cache>/backends.json`, so the probe runs
once. torch.compile takes minutes to build on a small CPU and is rebuilt in every process:
`wsclip profile` measures it and `--backend compile` selects it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from wsclip.label.backends import Variant, cpu_has_bf16

#: relative score error a variant may have against eager fp32 (the parity tests' tolerances)
PARITY_TOLERANCE = {"eager": 1e-4, "channels-last": 1e-4, "compile": 1e-4, "onnxruntime": 1e-4, "bf16": 1e-2}
ORT = "onnxruntime"
CACHE_FILE = "backends.json"


def cpu_candidates() -> list[str]:
    return ["eager", "channels-last"] + (["bf16"] if cpu_has_bf16() else [])


def cache_key(model_path, options: dict, device: torch.device) -> str:
    p = Path(model_path).resolve()
    st = p.stat()
    return json.dumps({"model": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "options": options,
                       "device": str(device), "threads": torch.get_num_threads(),
                       "cpu": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}, sort_keys=True)


def _read_cache() -> dict:
    from wsclip.io import cache_dir

    try:
        return json.loads((cache_dir() / CACHE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def remembered(key: str) -> str | None:
    return _read_cache().get(key, {}).get("choice")


def remember(key: str, record: dict) -> None:
    from wsclip.io import atomic_write_json, cache_dir

    table = _read_cache()
    table[key] = record
    try:
        atomic_write_json(cache_dir() / CACHE_FILE, table)
    except OSError:  # a read-only home: the choice is only kept for this process
        pass


def _as_numpy(outs, names) -> dict[str, np.ndarray]:
    return {n: (o.float() if o.is_floating_point() else o).cpu().numpy() for n, o in zip(names, outs)}


def _passes(errs: dict, tol: float) -> bool:
    """Every score within `tol` (relative) and every decisive mask pixel equal."""
    for e in errs.values():
        if "max_rel" in e and not e["max_rel"] <= tol:  # NaN fails too
            return False
        if "agreement" in e and e.get("decisive_agreement", e["agreement"]) < 1.0:
            return False
    return True


def ort_runner(make_onnx, threads: int | None = None):
    """An OrtRunner (CPU) of the .onnx that `make_onnx()` exports (or finds already exported)."""
    from wsclip.export.ort import OrtRunner

    return OrtRunner(make_onnx(), device="cpu", threads=threads or torch.get_num_threads())


def probe(module: torch.nn.Module, x: torch.Tensor, names, scores_of, candidates=None, rounds: int = 3,
          make_onnx=None) -> dict:
    """Check each candidate variant on x against eager fp32, then time the ones that pass; returns
    {"choice", "variants": {name: {...}}}.

    The timing runs in `rounds` interleaved rounds (every passing variant once per round) and keeps each
    variant's fastest call, so a slow spell of the machine does not fall on one variant only: on the 2-core
    box one call varies by +-10%, as much as ONNX Runtime's lead over eager at some sizes (measured).
    `names`: the module's output names; `scores_of(ref_outputs)`: what its integer mask is the argmax of
    (for the near-tie rule), or None. `make_onnx()`: the module exported to ONNX (adds the onnxruntime
    candidate).
    """
    from wsclip.export.parity import compare_outputs

    device = x.device
    report: dict = {"variants": {}}
    ref = None
    names_ = list(candidates or cpu_candidates())
    if make_onnx is not None and ORT not in names_ and _has_ort():
        names_.append(ORT)
    runnable = {}
    for name in names_:
        try:
            if name == ORT:
                runner = ort_runner(make_onnx)
                var = lambda x, runner=runner: tuple(runner.run_torch(x.cpu()).values())  # noqa: E731
            else:
                var = Variant(module, name, device, copy_module=True)
            var(x)  # first call: kernel selection, compilation
            t = time.perf_counter()
            outs = var(x)
            seconds = time.perf_counter() - t
        except Exception as exc:  # noqa: BLE001 - a variant this build cannot run is simply not chosen
            report["variants"][name] = {"ok": False, "reason": f"{type(exc).__name__}: {exc}"[:200]}
            continue
        got = _as_numpy(outs, names)
        entry = {"seconds": seconds}
        if ref is None:  # eager fp32 comes first: the reference
            ref = got
            entry["ok"] = True
        else:
            tol = PARITY_TOLERANCE[name]
            errs = compare_outputs(ref, got, tolerance=tol, scores=scores_of(ref))
            entry.update(ok=_passes(errs, tol), errors=errs)
        report["variants"][name] = entry
        if entry["ok"]:
            runnable[name] = var
    if len(runnable) > 1:
        for _ in range(max(0, rounds - 1)):
            for name, var in runnable.items():
                t = time.perf_counter()
                var(x)
                entry = report["variants"][name]
                entry["seconds"] = min(entry["seconds"], time.perf_counter() - t)
    ok = {n: report["variants"][n]["seconds"] for n in runnable}
    report["choice"] = min(ok, key=ok.get) if ok else "eager"
    return report


def _has_ort() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def resolve(backend: str, module, device: torch.device, amp: bool, key: str | None, sample, names, scores_of,
            make_onnx=None):
    """(the Variant or ONNX Runtime runner for `backend`, the probe report or None).

    'auto' probes on `sample()` once per key (see the module docstring); an OrtRunner comes back
    when ONNX Runtime won. `make_onnx`: exports the module (the onnxruntime candidate).
    """
    if backend != "auto":
        return Variant(module, backend, device), None
    if device.type != "cpu":
        return Variant(module, "bf16" if amp else "eager", device), None
    choice = remembered(key) if key and not os.environ.get("WSCLIP_REPROBE") else None
    if choice == ORT and (make_onnx is None or not _has_ort()):
        choice = None
    report = None
    if choice is None:
        report = probe(module, sample(), names, scores_of, make_onnx=make_onnx)
        choice = report["choice"]
        if key:
            remember(key, {"choice": choice, "seconds": {n: v.get("seconds") for n, v in report["variants"].items()},
                           "passed": [n for n, v in report["variants"].items() if v.get("ok")]})
    if choice == ORT:
        return ort_runner(make_onnx), report
    return Variant(module, choice, device), report
