"""Benchmark suites run by `wsclip bench` / benchmarks/run.py: one module per suite (NAME, DESCRIPTION, run)."""
