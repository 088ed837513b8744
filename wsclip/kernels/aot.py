"""Compile every Triton kernel ahead of time for real GPU targets, without a GPU.

    python -m wsclip.kernels.aot [--targets 80,90,100] [--jobs 2] [--json out.json]

For every kernel in `tuning.SPECS`, every autotune config, every argument type the dispatch may
pass (`KernelSpec.signatures`) and every target, runs Triton's full pipeline (TTIR -> TTGIR -> LLVM
-> PTX -> cubin, with the ptxas in the triton wheel) and reads the cubin's resources: shared memory
(Triton's metadata) and registers and spills (ptxas -v). A config fails when it does not compile,
needs more shared memory than the target gives one block (`tuning.SHARED_LIMIT`), spills registers,
or needs more registers than a block may have. Exit status 1 when any fails.

Pointer arguments are compiled 16-byte aligned (as fresh PyTorch tensors are: what the JIT
specialises on), integer arguments without divisibility hints (the general case). Compiles go to a
fresh temporary Triton cache that is deleted afterwards, so no earlier run can hide a failure.
Needs TRITON_INTERPRET unset or 0 (the interpreter replaces `triton.jit`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

from wsclip.kernels.tuning import REGS_PER_BLOCK, REGS_PER_THREAD, SHARED_LIMIT, SPECS, TARGETS, KernelSpec


@dataclass(frozen=True)
class Job:
    spec: str  # tuning.SPECS key
    index: int  # index into spec.configs
    config: tuple  # that config's (name, value) pairs
    sig: tuple  # sorted (arg, type or launch value) pairs
    target: int  # compute capability, 90 = sm_90


def jobs(specs: dict[str, KernelSpec] | None = None, targets=TARGETS) -> list[Job]:
    """Every (kernel, config, signature, target) to compile, the heaviest kernels (with tl.dot) first."""
    specs = SPECS if specs is None else specs
    out = [Job(name, i, tuple(cfg.items()), tuple(sig.items()), cc)
           for name, spec in specs.items() for i, cfg in enumerate(spec.configs) for sig in spec.signatures()
           for cc in targets]
    return sorted(out, key=lambda j: specs[j.spec].dot is None)


_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")


def parse_ptxas(log: str) -> dict:
    """registers, spill_stores, spill_loads, stack (bytes) from `ptxas -v` output; None where absent."""
    regs, spills, stack = _REGS.search(log), _SPILLS.search(log), _STACK.search(log)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spills.group(1)) if spills else None,
            "spill_loads": int(spills.group(2)) if spills else None,
            "stack": int(stack.group(1)) if stack else None}


def verdict(res: dict) -> list[str]:
    """The reasons a compiled config is unusable on its target (empty when it is fine)."""
    if res.get("error"):
        return [f"does not compile: {res['error']}"]
    why = []
    limit = SHARED_LIMIT[res["target"]]
    if res["shared"] > limit:
        why.append(f"shared memory {res['shared']} B > {limit} B per block on sm_{res['target']}")
    if res["registers"] is None or res["spill_stores"] is None:
        why.append("ptxas reported no register / spill figures")
    else:
        if res["spill_stores"] or res["spill_loads"]:
            why.append(f"spills registers ({res['spill_stores']} B stores, {res['spill_loads']} B loads)")
        threads = res["num_warps"] * 32
        if res["registers"] > REGS_PER_THREAD or res["registers"] * threads > REGS_PER_BLOCK:
            why.append(f"{res['registers']} registers x {threads} threads exceed the register file")
    return why


def _ptxas_log(kernel, target: int) -> str:
    """ptxas -v of the kernel's PTX, for Triton versions without knobs.nvidia.dump_ptxas_log."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        proc = subprocess.run([get_ptxas(target).path, "-v", f"--gpu-name={sm_arch_from_capability(target)}", ptx,
                               "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    return proc.stderr


def compile_job(job: Job) -> dict:
    """Compile one job; a dict with its figures (or its error) and the verdict."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = SPECS[job.spec]
    cfg = dict(job.config)
    sig = dict(job.sig)
    fn = importlib.import_module(f"wsclip.kernels.{spec.module}")._jit_kernels(False)[spec.kernel]
    consts = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
    consts.update({k: v for k, v in sig.items() if k in spec.launch})
    if spec.dot:
        consts["DOT"] = spec.dot
    if set(fn.arg_names) != set(sig) | set(consts):
        raise ValueError(f"{spec.name}: tuning.SPECS lists {sorted(set(sig) | set(consts))} but the kernel takes "
                         f"{fn.arg_names}")
    signature = {a: ("constexpr" if a in consts else sig[a]) for a in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if signature[a].startswith("*")}
    res = {"kernel": spec.name, "target": job.target, "config": job.index, "num_warps": cfg["num_warps"],
           "num_stages": cfg["num_stages"], "meta": consts, "types": {k: v for k, v in sig.items() if k not in spec.launch},
           "error": None}
    t0 = time.perf_counter()
    dump = hasattr(knobs.nvidia, "dump_ptxas_log")
    try:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            if dump:
                knobs.nvidia.dump_ptxas_log = True
            k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=aligned),
                               target=GPUTarget("cuda", job.target, 32),
                               options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
        log = out.getvalue() if dump else _ptxas_log(k, job.target)
        res.update(shared=int(k.metadata.shared or 0), **parse_ptxas(log))
    except Exception as exc:  # noqa: BLE001 - a failing config is a result, not a crash
        res["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
    res["seconds"] = round(time.perf_counter() - t0, 3)
    res["problems"] = verdict(res)
    return res


def run(targets=TARGETS, n_jobs: int = 2, specs: dict[str, KernelSpec] | None = None) -> dict:
    """Compile every job (in a pool of n_jobs processes); {"results": [...], "summary": [...], ...}."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("wsclip.kernels.aot: TRITON_INTERPRET=1 replaces triton.jit with the interpreter; "
                         "run with TRITON_INTERPRET=0")
    todo = jobs(specs, targets)
    cache = tempfile.mkdtemp(prefix="wsclip-aot-")
    old = {k: os.environ.get(k) for k in ("TRITON_CACHE_DIR", "TRITON_ALWAYS_COMPILE")}
    os.environ.update(TRITON_CACHE_DIR=cache, TRITON_ALWAYS_COMPILE="1")
    t0 = time.perf_counter()
    cpu0 = _cpu_seconds()
    try:
        if n_jobs > 1:
            with ProcessPoolExecutor(n_jobs, mp_context=get_context("fork")) as pool:
                results = list(pool.map(compile_job, todo, chunksize=4))
        else:
            results = [compile_job(j) for j in todo]
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    import triton

    return {"triton": triton.__version__, "targets": list(targets), "jobs": len(todo), "processes": n_jobs,
            "seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(_cpu_seconds() - cpu0, 1),
            "results": results, "summary": summarise(results)}


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool), user + system."""
    import resource

    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def summarise(results: list[dict]) -> list[dict]:
    """One row per (kernel, target): configs and signatures compiled, largest shared / registers / spills."""
    rows = {}
    for r in results:
        row = rows.setdefault((r["kernel"], r["target"]), {"kernel": r["kernel"], "target": f"sm_{r['target']}",
                                                           "configs": set(), "compiles": 0, "failed": 0,
                                                           "max_shared": 0, "max_registers": 0, "max_spill": 0})
        row["configs"].add(r["config"])
        row["compiles"] += 1
        row["failed"] += bool(r["problems"])
        if not r["error"]:
            row["max_shared"] = max(row["max_shared"], r["shared"])
            row["max_registers"] = max(row["max_registers"], r["registers"] or 0)
            row["max_spill"] = max(row["max_spill"], (r["spill_stores"] or 0) + (r["spill_loads"] or 0))
    return [{**row, "configs": len(row["configs"])} for row in rows.values()]


def format_table(summary: list[dict]) -> str:
    lines = ["| kernel | target | configs | compiles | max shared (B) | limit (B) | max registers | spill (B) | failed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        cc = int(r["target"][3:])
        lines.append(f"| {r['kernel']} | {r['target']} | {r['configs']} | {r['compiles']} | {r['max_shared']} | "
                     f"{SHARED_LIMIT[cc]} | {r['max_registers']} | {r['max_spill']} | {r['failed']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m wsclip.kernels.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default=",".join(map(str, TARGETS)), help="compute capabilities (default 80,90,100)")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compile processes")
    p.add_argument("--only", help="comma-separated kernels (tuning.SPECS names, e.g. caa.sym_square)")
    p.add_argument("--extra-config", help="JSON config to compile in place of --only's configs (probing a limit)")
    p.add_argument("--json", help="write every result here")
    args = p.parse_args(argv)
    specs = {n: s for n, s in SPECS.items() if not args.only or n in args.only.split(",")}
    if args.extra_config:
        from dataclasses import replace

        specs = {n: replace(s, configs=(json.loads(args.extra_config),)) for n, s in specs.items()}
    out = run([int(t) for t in args.targets.split(",")], args.jobs, specs)
    print(format_table(out["summary"]))
    bad = [r for r in out["results"] if r["problems"]]
    for r in bad:
        print(f"FAIL {r['kernel']} sm_{r['target']} config {r['config']} {r['meta']} {r['types']}: "
              f"{'; '.join(r['problems'])}")
    print(f"{out['jobs']} compiles, {len(bad)} failed, {out['seconds']} s wall ({out['cpu_seconds']} CPU s) with "
          f"{out['processes']} processes (triton {out['triton']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
