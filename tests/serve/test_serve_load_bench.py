"""benchmarks/serve_load.py runs end to end on tiny sizes and writes its JSON (no timing is checked)."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_serve_load_benchmark_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("serve_load_bench", ROOT / "benchmarks" / "serve_load.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "load.json"
    bench.main(["--tiny", "--server", "inprocess", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["mode"] == "tiny" and res["images"] == 3 and res["machine"]["device"] == "cpu"
    assert res["offline"]["images"] == 3 and res["offline"]["images_per_s"] > 0
    online = res["online"]
    assert online["ok"] == online["requests"] == 6 and online["status_counts"] == {"200": 6}
    lat = online["latency_s"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
    assert online["batching"]["batches"] >= 1 and res["online_vs_offline"] > 0
