"""`wsclip bench` writes schema-valid JSON (never a timing is checked) and `wsclip bench report` renders it."""

from __future__ import annotations

import copy
import json
import types
from pathlib import Path

import pytest

from wsclip.bench.report import END, START, write_report
from wsclip.bench.runner import run_benchmarks
from wsclip.bench.schema import SCHEMA_ID, validate_run
from wsclip.bench.suite import Skip
from wsclip.bench.timing import Timing
from wsclip.cli import main


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One real --quick --tiny run through the CLI: two kernel suites and the end-to-end labeler."""
    out = tmp_path_factory.mktemp("bench")
    rc = main(["bench", "--quick", "--tiny", "--device", "cpu", "--suites", "masked-batch,caa,label-e2e",
               "--out", str(out), "--label", "test box", "--threads", "1"])
    files = sorted(out.glob("bench_cpu_tiny_*.json"))
    assert rc == 0 and len(files) == 1
    return out, json.loads(files[0].read_text())


def test_tiny_run_follows_the_schema(tiny_run):
    _, run = tiny_run
    assert validate_run(run) == []
    assert run["schema"] == SCHEMA_ID and run["mode"] == "tiny" and run["cpu_mode"] is True
    assert run["label"] == "test box" and any("CPU mode" in n for n in run["notes"])
    assert run["environment"]["torch_threads"] == 1
    env = run["environment"]
    assert env["device_type"] == "cpu" and env["torch"] and "bench" in env["command"] and "--tiny" in env["command"]
    assert {"triton", "onnxruntime", "open_clip"} <= set(env["versions"])
    assert {"copy_GBps", "matmul_fp32_GFLOPs"} <= set(run["ceilings"])
    assert list(run["suites"]) == ["masked-batch", "caa", "label-e2e"]  # in the order asked for
    for name, suite in run["suites"].items():
        assert suite["status"] == "ok", (name, suite.get("reason"), suite.get("traceback"))
        ok = [r for r in suite["results"] if r["status"] == "ok"]
        assert ok and all(r["throughput"] > 0 and r["timing"]["reps"] >= 1 for r in ok)
        assert all(c["passed"] for c in suite["checks"])
    # the Triton rows say why they did not run here
    triton = [r for r in run["suites"]["caa"]["results"] if r["variant"] == "triton"]
    assert triton and triton[0]["status"] == "skipped" and "GPU" in triton[0]["reason"]
    # the serial baseline was checked against `wsclip label` (same masks) before it was timed
    e2e = run["suites"]["label-e2e"]
    assert {r["role"] for r in e2e["results"]} == {"wsclip", "baseline"}
    assert len(e2e["checks"]) == 2 and all(c["passed"] for c in e2e["checks"])  # eager and --backend auto
    assert [c["fast"] for c in e2e["comparisons"]] == ["wsclip label, eager fp32", "wsclip label, --backend auto"]
    assert all(c["baseline"] == "serial loop, batch 1, eager fp32" for c in e2e["comparisons"])


@pytest.mark.slow
def test_quick_run_of_every_suite_follows_the_schema(tmp_path):
    """The README's `wsclip bench --quick` on this CPU (about a minute): every suite runs and its checks pass."""
    rc = main(["bench", "--quick", "--device", "cpu", "--out", str(tmp_path), "--threads", "1"])
    files = sorted(tmp_path.glob("bench_cpu_quick_*.json"))
    assert rc == 0 and len(files) == 1
    run = json.loads(files[0].read_text())
    assert validate_run(run) == [] and run["mode"] == "quick"
    assert set(run["suites"]) == {"clip-encode", "clims-step", "clip-es-label", "label-e2e", "random-walk",
                                  "masked-batch", "caa"}
    for name, suite in run["suites"].items():
        assert suite["status"] == "ok", (name, suite.get("reason"), suite.get("traceback"))
        assert all(c["passed"] for c in suite["checks"]), (name, suite["checks"])


def _fake(name, run_fn):
    return types.SimpleNamespace(NAME=name, DESCRIPTION=f"fake {name}", run=run_fn)


def _sweep(ctx, res):
    for variant, speed in (("slow", 1.0), ("fast", 3.0)):
        for b in (1, 2, 4):
            t = b / (10.0 * speed)
            res.timed("toy model", variant, "baseline" if variant == "slow" else "wsclip", Timing(t, [t]), items=b,
                      batch=b, gflop_per_item=1.0, ceiling=100.0, ceiling_name="matmul_fp32_GFLOPs")
    res.skip("toy model", "gpu-only", "wsclip", "needs a GPU")
    assert res.compare("toy model", "fast", "slow")["ratio"] > 1
    res.check("toy model", "same outputs", rel_err=1e-7, tolerance=1e-5)


def _skipping(ctx, res):
    raise Skip("component not there yet")


def _failing(ctx, res):
    raise RuntimeError("boom")


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fake")
    mods = {"sweep": _fake("sweep", _sweep), "later": _fake("later", _skipping), "broken": _fake("broken", _failing)}
    path, run = run_benchmarks(mode="tiny", device="cpu", out_dir=out, quiet=True, modules=mods, label="fake box",
                               threads=1)
    return out, path, run


def test_skipped_and_failing_suites_are_recorded(fake_run):
    _, path, run = fake_run
    assert json.loads(path.read_text())["run_id"] == run["run_id"] and validate_run(run) == []
    s = run["suites"]
    assert s["later"]["status"] == "skipped" and s["later"]["reason"] == "component not there yet"
    assert s["broken"]["status"] == "error" and "boom" in s["broken"]["reason"] and "traceback" in s["broken"]
    rows = s["sweep"]["results"]
    fast4 = next(r for r in rows if r["variant"] == "fast" and r["batch"] == 4)
    assert fast4["throughput"] == pytest.approx(30.0) and fast4["mfu"] == pytest.approx(0.3)
    assert s["sweep"]["comparisons"][0]["ratio"] == pytest.approx(3.0)


def test_validate_run_names_the_problems(fake_run):
    _, _, run = fake_run
    bad = copy.deepcopy(run)
    bad["suites"]["later"].pop("reason")
    row = bad["suites"]["sweep"]["results"][0]
    row["role"] = "winner"
    row["throughput"] = -1.0
    bad["mode"] = "fast"
    errors = " | ".join(validate_run(bad))
    for part in ("needs a 'reason'", "role 'winner'", "throughput must be positive", "mode 'fast'"):
        assert part in errors


def test_report_rewrites_only_its_section(fake_run, tmp_path):
    out, path, run = fake_run
    results = tmp_path / "results"
    results.mkdir()
    quick = dict(run, mode="quick", run_id=run["run_id"] + "-q")  # the report ignores --tiny runs by default
    (results / "bench_cpu_quick_x.json").write_text(json.dumps(quick))
    (results / "kernels_cpu_quick.json").write_text(json.dumps({"not": "ours"}))  # other files are ignored
    md = tmp_path / "BENCHMARKS.md"
    before, after = "# Benchmarks\n\n## Segmentation\n\nother engineer's text\n", "\n## Ablation\n\nmore text\n"
    md.write_text(before + f"\n{START}\nold\n{END}\n" + after)
    done = write_report(results, md)
    text = md.read_text()
    assert text.startswith(before) and text.endswith(after) and "old" not in text
    assert text.count(START) == text.count(END) == 1
    assert "fake box" in text and "not measured" in text and "**3.00x**" in text
    assert "component not there yet" in text and "boom" in text
    pngs = {Path(p).name for p in done["plots"]}
    assert {"speedups_cpu_fake_box.png", "sweep_cpu_fake_box.png"} == pngs
    assert all((results / p).stat().st_size > 1000 for p in pngs)
    assert "](results/sweep_cpu_fake_box.png)" in text  # linked relative to the markdown file
    # idempotent, and the CLI does the same
    assert main(["bench", "report", "--results", str(results), "--markdown", str(md)]) == 0
    assert md.read_text() == text


def test_report_without_runs_says_so(tmp_path):
    md = tmp_path / "B.md"
    write_report(tmp_path, md, plots=False)
    text = md.read_text()
    assert START in text and "No benchmark runs yet" in text


def test_report_defaults_to_the_current_folder_and_shows_no_cpu_mfu(fake_run, tmp_path, monkeypatch, capsys):
    _, _, run = fake_run
    quick = copy.deepcopy(dict(run, mode="quick", run_id=run["run_id"] + "-cwd"))
    for r in quick["suites"]["sweep"]["results"]:
        if r.get("mfu") is not None:
            r["mfu"] = 1.63  # what a wrong CPU ceiling gave: never printed
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "bench_cpu_quick_y.json").write_text(json.dumps(quick))
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "report", "--no-plots"]) == 0
    text = (tmp_path / "BENCHMARKS.md").read_text()  # written here, not into the package's tree
    assert "fake box" in text and "MFU" not in text and "163" not in text
    out = capsys.readouterr().out
    assert str(results.resolve()) in out and str((tmp_path / "BENCHMARKS.md").resolve()) in out
