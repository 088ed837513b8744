"""`wsclip bench report`: BENCHMARKS.md tables and PNG plots from the run files in benchmarks/results/.

Only the section between START and END is rewritten; the rest of BENCHMARKS.md (other
engineers' sections) is kept as it is. Per machine and suite the latest full run is shown (else
the latest quick run); --tiny runs are ignored (their figures mean nothing). GPU columns say "not
measured" until a GPU run file exists.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

from wsclip.bench.schema import SCHEMA_ID, shown_mfu, validate_run
from wsclip.errors import MissingFileError

START = "<!-- bench:start -->"
END = "<!-- bench:end -->"
_GPU_COLUMN = "GPU (H100/H200)"


def load_runs(results_dir: Path, include_tiny: bool = False, invalid: list | None = None) -> list[dict]:
    """Valid run records (schema wsclip-bench/1) in a folder, oldest first; other JSON files are ignored.

    Files that claim the schema but break it are skipped and, when `invalid` is a list, named there.
    """
    runs = []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            run = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(run, dict) or run.get("schema") != SCHEMA_ID:
            continue
        problems = validate_run(run)
        if problems:
            if invalid is not None:
                invalid.append(f"{path.name}: {problems[0]}")
            continue
        if run["mode"] == "tiny" and not include_tiny:
            continue
        run["_file"] = path.name
        runs.append(run)
    return sorted(runs, key=lambda r: r["created"])


def machine_key(run: dict) -> str:
    return f"{run['environment']['device_type']}:{run['label']}"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "run"


def pick_suites(runs: list[dict]) -> dict[str, dict[str, dict]]:
    """{machine: {suite: (run, suite record)}}: the latest full run of each suite, else the latest quick one.

    A suite that ran (ok) beats one recorded as skipped or failed in a later run of the same mode.
    """
    rank = {"full": 2, "quick": 1, "tiny": 0}
    chosen: dict[str, dict[str, dict]] = {}
    for run in runs:  # oldest first: later runs replace earlier ones of equal standing
        per = chosen.setdefault(machine_key(run), {})
        for name, suite in run["suites"].items():
            score = (rank[run["mode"]], suite["status"] == "ok")
            old = per.get(name)
            if old is None or score >= old["score"]:
                per[name] = {"run": run, "suite": suite, "score": score}
    return chosen


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:,.0f}"
    return str(v)


def _machine_title(run: dict) -> str:
    return str(run["label"])


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    return out


# ============================================================================ plots
def _plot_batches(machine: str, suite_name: str, suite: dict, out_dir: Path, title: str) -> Path | None:
    """Throughput against batch size, one line per variant, one panel per case (when a sweep exists)."""
    rows = [r for r in suite["results"] if r["status"] == "ok" and r.get("batch")]
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in rows:
        series.setdefault(r["case"], {}).setdefault(r["variant"], []).append((r["batch"], r["throughput"]))
    cases = [c for c, vs in series.items() if any(len({b for b, _ in pts}) > 1 for pts in vs.values())]
    if not cases:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cases), figsize=(5.5 * len(cases), 4.2), squeeze=False)
    for ax, case in zip(axes[0], cases):
        for variant, pts in sorted(series[case].items()):
            pts = sorted(pts)
            ax.plot([b for b, _ in pts], [t for _, t in pts], marker="o", label=variant)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(rows[0]["unit"])
        ax.set_title(case)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{suite_name}: throughput vs batch size per backend, {title}")
    fig.tight_layout()
    path = out_dir / f"{slug(suite_name)}_{slug(machine)}.png"
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)
    return path


def _plot_speedups(machine: str, picked: dict[str, dict], out_dir: Path, title: str) -> Path | None:
    """Horizontal bars: every speed-up ratio measured on one machine (log scale)."""
    bars = []
    for name, entry in picked.items():
        for c in entry["suite"].get("comparisons", []):
            bars.append((f"{name}: {c['case']}\n{c['fast']} vs {c['baseline']}"
                         + ("" if c["metric"] == "throughput" else f" [{c['metric']}]"), c["ratio"]))
    if not bars:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.55 * len(bars) + 1.4))
    labels = [b[0] for b in bars][::-1]
    values = [b[1] for b in bars][::-1]
    ax.barh(range(len(bars)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.set_yticks(range(len(bars)), labels, fontsize=6)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, NullFormatter

    lo, hi = min(values + [1.0]) / 1.5, max(values + [1.0]) * 1.5
    ax.set_xlim(lo, hi)
    ax.set_xticks([t * 10.0**e for e in range(-3, 5) for t in (1, 2, 5) if lo <= t * 10.0**e <= hi])
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.axvline(1.0, color="black", lw=0.8)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2g}x", va="center", fontsize=7)
    ax.set_xlabel("speed-up over the baseline measured in the same run (x)")
    ax.set_title(f"wsclip vs baselines, {title}")
    fig.tight_layout()
    path = out_dir / f"speedups_{slug(machine)}.png"
    fig.savefig(path, dpi=90, metadata={"Software": None}, bbox_inches="tight")
    plt.close(fig)
    return path


# ============================================================================ markdown
def render_section(runs: list[dict], plots: dict[str, list[Path]] | None = None, md_dir: Path | None = None,
                   results_dir: Path | None = None) -> str:
    """The BENCHMARKS.md section (markers included) for these runs; `plots` {machine: [png]} are linked."""
    chosen = pick_suites(runs)
    machines = list(chosen)
    has_gpu = any(m.startswith("cuda:") for m in machines)
    plots = plots or {}

    def rel(p: Path) -> str:
        try:
            return p.resolve().relative_to(md_dir.resolve()).as_posix() if md_dir else p.as_posix()
        except ValueError:
            return p.as_posix()

    lines = [START, "## Throughput benchmarks (`wsclip bench`)", "",
             f"Generated by `wsclip bench report` from the run files in `{rel(results_dir) if results_dir else 'benchmarks/results'}/` "
             "(edits between the "
             "markers are overwritten). Reproduce with `wsclip bench` (all suites; `--quick` for a short run, "
             "`--suites a,b` for some). Every ratio compares wsclip's path with a baseline measured in the same "
             "run on the same machine, after checking that both compute the same outputs; baselines follow the "
             "public code's structure as described in METHODS.md (written here, nothing copied).", ""]
    if not machines:
        lines += ["No benchmark runs yet: run `wsclip bench --quick`, then `wsclip bench report`.", END, ""]
        return "\n".join(lines)

    # ---- machines
    lines += ["### Runs", ""]
    head = ["machine", "device", "mode", "date (UTC)", "torch", "triton", "onnxruntime", "threads", "load avg",
            "command"]
    seen = {}
    for m, per in chosen.items():
        for entry in per.values():
            seen[entry["run"]["run_id"]] = entry["run"]
    body = []
    for run in sorted(seen.values(), key=lambda r: r["created"]):
        env = run["environment"]
        load = env.get("load_average")
        body.append([run["label"], env["device"], run["mode"], run["created"][:16].replace("T", " "), env["torch"],
                     env["versions"].get("triton") or "-", env["versions"].get("onnxruntime") or "-",
                     env.get("torch_threads", "-"), f"{load[0]:.1f}" if load else "-", f"`{env['command']}`"])
    lines += _table(head, body)
    if not has_gpu:
        lines += ["", f"**{_GPU_COLUMN}: not measured.** No GPU was available to this work; every GPU cell below "
                      "says so rather than estimating a figure."]
    notes = sorted({n for run in seen.values() for n in run.get("notes", [])})
    for run in seen.values():
        env = run["environment"]
        load, cores = env.get("load_average"), env.get("cpu_cores")
        if load and cores and load[0] > cores:
            notes.append(f"{run['label']} was shared while it ran (load average {load[0]:.1f} on {cores} cores): "
                         "absolute figures are noisy; the ratios, measured in the same run, are the meaningful part.")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    lines.append("")
    for run in sorted(seen.values(), key=lambda r: r["created"]):
        c = run["ceilings"]
        parts = [f"{k.replace('_', ' ')} {_fmt(v)}" for k, v in c.items() if isinstance(v, float)]
        lines.append(f"Measured ceilings, {_machine_title(run)}: " + ", ".join(parts) + ".")
    lines.append("")

    titles = {m: _machine_title(next(iter(per.values()))["run"]) for m, per in chosen.items()}
    gpu_col = [] if has_gpu else [_GPU_COLUMN]

    # ---- speed-ups
    lines += ["### Speed-ups", ""]
    keys: dict[tuple, dict] = {}
    for m, per in chosen.items():
        for name, entry in per.items():
            for c in entry["suite"].get("comparisons", []):
                keys.setdefault((name, c["case"], c["fast"], c["baseline"], c["metric"]), {})[m] = c
    if keys:
        body = []
        for (name, case, fast, base, metric), per_m in keys.items():
            cells = []
            for m in machines:
                c = per_m.get(m)
                if c is None:
                    cells.append("-")
                else:
                    tgt = f" (target {c['target']:g}x {'met' if c.get('met') else 'not met'})" if "target" in c else ""
                    cells.append(f"**{c['ratio']:.2f}x**{tgt}")
            body.append([name, case, fast, base, metric] + cells + ["not measured"] * len(gpu_col))
        lines += _table(["suite", "case", "wsclip", "baseline", "metric"] + [titles[m] for m in machines] + gpu_col,
                        body)
    else:
        lines.append("No comparisons measured yet.")
    for m in machines:
        for p in plots.get(m, []):
            if p.name.startswith("speedups_"):
                lines += ["", f"![speed-ups, {titles[m]}]({rel(p)})"]
    lines.append("")

    # ---- per suite
    suite_names = []
    for per in chosen.values():
        suite_names += [n for n in per if n not in suite_names]
    for name in suite_names:
        lines += [f"### {name}", ""]
        desc = next((per[name]["suite"].get("description") for per in chosen.values() if name in per), "")
        if desc:
            lines += [desc, ""]
        for m in machines:
            entry = chosen[m].get(name)
            if entry is None:
                continue
            suite = entry["suite"]
            if suite["status"] != "ok":
                lines.append(f"- {titles[m]}: **{suite['status']}**: {suite.get('reason', '')}")
                continue
            run = entry["run"]
            setup = "; ".join(f"{k}: {v}" for k, v in suite.get("setup", {}).items())
            lines.append(f"- {titles[m]}, {run['mode']} run of {run['created'][:10]}"
                         + (f", setup: {setup}" if setup else ""))
            for chk in suite.get("checks", []):
                err = chk.get("rel_err", chk.get("max_abs_err"))
                lines.append(f"- check ({titles[m]}) {chk['case']}, {chk['name']}: "
                             f"{'passed' if chk['passed'] else '**FAILED**'}"
                             + (f" (error {_fmt(err)} <= {_fmt(chk.get('tolerance'))})" if err is not None else "")
                             + (f"; {chk['detail']}" if chk.get("detail") else ""))
        lines.append("")
        rows: dict[tuple, dict] = {}
        for m in machines:
            entry = chosen[m].get(name)
            if entry is None or entry["suite"]["status"] != "ok":
                continue
            for r in entry["suite"]["results"]:
                rows.setdefault((r["case"], r["variant"], r["role"], r.get("batch")), {})[m] = r
        if rows:
            body = []
            for (case, variant, role, batch), per_m in rows.items():
                cells = []
                for m in machines:
                    r = per_m.get(m)
                    if r is None:
                        cells.append("-")
                    elif r["status"] != "ok":
                        cells.append(f"{r['status']}: {r.get('reason', '')}")
                    else:
                        extra = [f"{r['latency_ms']:.4g} ms/call"]
                        if (mfu := shown_mfu(r, m)) is not None:
                            extra.append(f"MFU {100 * mfu:.2g}%")
                        if r.get("peak_mem_MB") is not None:
                            extra.append(f"peak {r['peak_mem_MB']:.0f} MB")
                        cells.append(f"{_fmt(r['throughput'])} {r['unit']} ({', '.join(extra)})")
                body.append([case, variant, role, batch if batch is not None else "-"] + cells
                            + ["not measured"] * len(gpu_col))
            lines += _table(["case", "variant", "role", "batch"] + [titles[m] for m in machines] + gpu_col, body)
        for m in machines:
            for p in plots.get(m, []):
                if p.name.startswith(slug(name) + "_"):
                    lines += ["", f"![{name}, {titles[m]}]({rel(p)})"]
        lines.append("")
    lines += [END, ""]
    return "\n".join(lines)


def update_markdown(path: Path, section: str) -> None:
    """Put `section` between the markers of `path` (appended when absent); the rest stays byte for byte."""
    from wsclip.io import atomic_write_text

    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n\n"
    start, end = text.find(START), text.find(END)
    if start != -1 and end != -1 and end > start:
        after = text[end + len(END):]
        new = text[:start] + section.rstrip("\n") + after
    else:
        new = text.rstrip("\n") + "\n\n" + section
    if not new.endswith("\n"):
        new += "\n"
    atomic_write_text(path, new)


def write_report(results_dir: Path, markdown: Path, plots: bool = True, include_tiny: bool = False) -> dict:
    """Render the section and its plots from every run file in `results_dir`; returns what was done."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise MissingFileError(f"results folder not found: {results_dir} (run `wsclip bench` first)")
    invalid: list[str] = []
    runs = load_runs(results_dir, include_tiny=include_tiny, invalid=invalid)
    chosen = pick_suites(runs)
    made: dict[str, list[Path]] = {}
    if plots:
        for m, per in chosen.items():
            title = _machine_title(next(iter(per.values()))["run"])
            files = [p for p in [_plot_speedups(m, per, results_dir, title)] if p]
            for name, entry in per.items():
                if entry["suite"]["status"] == "ok":
                    p = _plot_batches(m, name, entry["suite"], results_dir, title)
                    if p:
                        files.append(p)
            made[m] = files
    section = render_section(runs, made, Path(markdown).parent, results_dir)
    update_markdown(Path(markdown), section)
    return {"runs": len(runs), "machines": list(chosen), "plots": [str(p) for ps in made.values() for p in ps],
            "markdown": str(markdown), "invalid": invalid}
