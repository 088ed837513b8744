"""Throughput benchmarks: wsclip's paths against public-structure baselines measured in the same run.

    .venv/bin/python benchmarks/run.py [--suites clip-encode,clims-step,...] [--quick | --tiny] [--out DIR]
    .venv/bin/python benchmarks/run.py report        # BENCHMARKS.md tables + PNG plots from benchmarks/results/

The same as `wsclip bench` / `wsclip bench report`. Suites: one module each in benchmarks/suites/,
baselines in benchmarks/baselines/, harness core in wsclip.bench. One JSON file per run is written
to benchmarks/results/.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from wsclip.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
