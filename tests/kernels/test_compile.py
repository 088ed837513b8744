"""Every Triton kernel compiles for sm_80, sm_90 and sm_100, for every autotune config and every
argument type in wsclip/kernels/tuning.py, within the target's shared memory and without spills.

No GPU: triton.compile runs the real pipeline down to a cubin with the ptxas in the triton wheel.
It runs in a subprocess with TRITON_INTERPRET=0 (this test process runs the interpreter, which
replaces triton.jit) and a fresh Triton cache (wsclip.kernels.aot), so nothing cached by an earlier
run can hide a failure.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wsclip.kernels import _dispatch
from wsclip.kernels.aot import jobs, parse_ptxas, verdict
from wsclip.kernels.tuning import SHARED_LIMIT, SPECS, TARGETS, dot_rel_bound

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("triton")


def _aot(*args, timeout=900):
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    return subprocess.run([sys.executable, "-m", "wsclip.kernels.aot", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    proc = _aot("--jobs", "2", "--json", str(out))
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_every_kernel_config_and_dtype_compiles_for_every_target(compiled):
    proc, res = compiled
    assert res is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    failed = [r for r in res["results"] if r["problems"]]
    assert not failed and proc.returncode == 0, "\n".join(
        f"{r['kernel']} sm_{r['target']} {r['meta']} {r['types']}: {r['problems']}" for r in failed[:20]) or proc.stderr[-3000:]
    # exactly the launch space of tuning.SPECS was compiled: every config x covering signature x target
    want = {(j.spec, j.index, tuple(sorted(dict(j.sig).items(), key=str)), j.target) for j in jobs()}
    got = {(r["kernel"], r["config"], tuple(sorted({**r["types"], **{k: v for k, v in r["meta"].items()
                                                                     if k in SPECS[r["kernel"]].launch}}.items(),
                                                   key=str)), r["target"]) for r in res["results"]}
    assert got == want
    for spec in SPECS.values():  # every type of every argument was compiled with every config on every target
        for names, types in spec.args.items():
            arg = names[0] if isinstance(names, tuple) else names
            for t in (types,) if isinstance(types, str) else types:
                for cc in TARGETS:
                    cfgs = {r["config"] for r in res["results"]
                            if r["kernel"] == spec.name and r["target"] == cc and r["types"][arg] == t}
                    assert cfgs == set(range(len(spec.configs))), (spec.name, arg, t, cc)
    for r in res["results"]:
        assert 0 < r["registers"] <= 255 and r["spill_stores"] == 0 and r["spill_loads"] == 0
        assert 0 <= r["shared"] <= SHARED_LIMIT[r["target"]]
    dots = {r["kernel"] for r in res["results"] if r["meta"].get("DOT")}
    assert dots == {n for n, s in SPECS.items() if s.dot}


def test_a_config_beyond_the_shared_memory_limit_fails():
    """The check can fail: a CAA square with 256 x 64 tiles and 4 stages does not fit an A100's block."""
    big = {"BLOCK": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4}
    proc = _aot("--only", "caa.sym_square", "--targets", "80", "--jobs", "1", "--extra-config", json.dumps(big),
                timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "FAIL caa.sym_square sm_80" in proc.stdout and "shared memory" in proc.stdout


def test_verdict_and_ptxas_log():
    log = ("ptxas info    : Function properties for fwd\n    0 bytes stack frame, 8 bytes spill stores, "
           "12 bytes spill loads\nptxas info    : Used 255 registers, used 0 barriers\n")
    figs = parse_ptxas(log)
    assert figs == {"registers": 255, "spill_stores": 8, "spill_loads": 12, "stack": 0}
    base = {"target": 80, "num_warps": 4, "error": None, "shared": 1000, **figs}
    assert any("spills" in w for w in verdict(base))
    assert verdict({**base, "spill_stores": 0, "spill_loads": 0}) == []
    assert any("shared memory" in w for w in verdict({**base, "spill_stores": 0, "spill_loads": 0,
                                                      "shared": SHARED_LIMIT[80] + 1}))
    assert verdict({**base, "shared": SHARED_LIMIT[90] - 1, "target": 90, "spill_stores": 0, "spill_loads": 0}) == []
    assert any("register file" in w for w in verdict({**base, "spill_stores": 0, "spill_loads": 0,
                                                      "registers": 200, "num_warps": 16}))
    assert "does not compile" in verdict({**base, "error": "PTXASError: boom"})[0]
    assert any("no register" in w for w in verdict({**base, **parse_ptxas("")}))


def test_launches_outside_the_compiled_domain_are_refused():
    spec = SPECS["caa.propagate"]
    ok = torch.zeros(2)
    _dispatch.check_launch(spec, a=ok.half(), v=ok, SYM=True, BLOCK_C=32)
    with pytest.raises(AssertionError, match="outside the compiled launch domain"):
        _dispatch.check_launch(spec, a=ok.double())
    with pytest.raises(AssertionError, match="BLOCK_C"):
        _dispatch.check_launch(spec, BLOCK_C=64)


def test_dot_error_bound():
    # tf32: two inputs rounded to 10 mantissa bits, about 2^-10 per product plus the fp32 sum
    assert 9.7e-4 < dot_rel_bound("tf32", 16) < 1e-3
    assert dot_rel_bound("ieee", 784) == pytest.approx(785 * 2.0**-24, rel=1e-6)
    with pytest.raises(ValueError):
        dot_rel_bound("fp16", 4)
