#!/usr/bin/env bash
# The one prepared device check (docs: BENCHMARKS.md "The device check"; GPU.md).
#
#   benchmarks/gpu_check.sh [--dry-run] [--out DIR]
#
# On a machine with one H100/H200 and the device image (python 3.12, torch, triton, no open_clip /
# TensorRT): installs the wheels carried in .whl/ into .site/, then runs benchmarks/gpu_check.py:
# every kernel parity test on CUDA, CUDA-graph and torch.compile paths against eager, `wsclip
# profile` (when present), every `wsclip bench` suite at full size, TensorRT (when importable);
# one PASS/FAIL/SKIP line per check and an OVERALL line, all results under benchmarks/results/
# (and $OUT when set), in under 8 minutes. --dry-run: the same on the CPU at toy sizes (CI runs it).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    echo "installing carried wheels: $(ls .whl | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps --target .site .whl/*.whl || { echo "FAIL wheels: pip install from .whl failed"; exit 1; }
    export PYTHONPATH="$PWD/.site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" benchmarks/gpu_check.py "$@"
