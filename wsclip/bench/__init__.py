"""Benchmark harness core: timing (`timing`), environment capture (`env`), the result JSON schema
(`schema`), the suite interface (`suite`), the runner (`runner`) and BENCHMARKS.md rendering (`report`).

The suites themselves live in the source checkout's benchmarks/suites/ (one module per suite) with
their baselines in benchmarks/baselines/; `wsclip bench` finds them there.
"""

from wsclip.bench.schema import SCHEMA_ID, validate_run
from wsclip.bench.suite import Skip, SuiteContext, SuiteResult
from wsclip.bench.timing import Meter, Rotation, Timing, measure_ceilings, rel_err

__all__ = ["SCHEMA_ID", "Meter", "Rotation", "Skip", "SuiteContext", "SuiteResult", "Timing", "measure_ceilings",
           "rel_err", "validate_run"]
