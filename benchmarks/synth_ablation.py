"""The full CLIMS loss ablation on the synthetic world (the long version of `wsclip demo`).

World (2000 train / 200 val scenes) -> tiny CLIPs (ResNet for CLIMS, ViT for CLIP-ES; cached) -> baseline CAM -> CLIMS
with OTM; OTM+BTM; OTM+BTM+REG; OTM+BTM+REG+CBS -> val CAMs -> CLIP-ES with the tiny CLIP
(GradCAM, CAA) -> dense CRF / IRN random walk pseudo masks -> table of CAM and pseudo-mask mIoU
and the co-occurring-background false activation (definitions in wsclip/demo.py).
Every stage resumes: re-running the same command skips finished work under --out.

    .venv/bin/python benchmarks/synth_ablation.py [--out runs/synth_ablation] [--write-md]
    .venv/bin/python benchmarks/synth_ablation.py --train-seeds 0 1 2 --write-md   # mean, min-max over 3 trainings

Writes benchmarks/results/synth_ablation.json; --write-md puts the table into BENCHMARKS.md
between the synth-ablation markers (the rest of the file is kept).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- synth-ablation:start -->", "<!-- synth-ablation:end -->"
METRICS = ("cam_miou", "mask_miou", "co_bg_fa")


def summarise(runs: dict[int, dict]) -> dict[str, dict]:
    """Per row: mean and (for several seeds) min/max of each metric across seeds."""
    rows: dict[str, dict] = {}
    for result in runs.values():
        for name, r in result["rows"].items():
            d = rows.setdefault(name, {"refinement": r.get("refinement"), **{m: [] for m in METRICS}, "threshold": []})
            for m in METRICS:
                if r.get(m) is not None:
                    d[m].append(float(r[m]))
            d["threshold"].append(r.get("threshold"))
    return rows


def markdown(runs: dict[int, dict], command: str, machine: str) -> str:
    rows = summarise(runs)
    seeds = sorted(runs)
    first = runs[seeds[0]]
    s = first["settings"]

    def cell(vals):
        if not vals:
            return "-"
        if len(vals) == 1:
            return f"{100 * vals[0]:.1f}"
        return f"{100 * np.mean(vals):.1f} ({100 * min(vals):.1f}-{100 * max(vals):.1f})"

    lines = [START, "## Synthetic world: CLIMS loss ablation, CLIP-ES and refinement", "",
             f"Command: `{command}` ({machine}; total {sum(r['seconds']['total'] for r in runs.values()) / 60:.0f} min "
             f"for {len(seeds)} seed{'s' if len(seeds) > 1 else ''}).", "",
             f"World: {s['n_train']} train / {s['n_val']} val scenes, {s['size']} px, 6 classes on 5 backgrounds; "
             "CAM network: the synth preset's tiny ResNet at output stride 8 (`tiny-s8`); "
             f"tiny CLIPs: ResNet {s['clip_steps']} steps for CLIMS, ViT {s.get('clip_es_steps', '-')} steps for CLIP-ES "
             f"(batch {s['clip_batch']}); baseline CAM {s['cam_steps']} steps; "
             f"each CLIMS variant {s['clims_steps']} steps from the baseline (weights alpha, beta, gamma, delta = "
             f"{tuple(s['weights'])}, switched-off terms at 0). All figures on the **val** split, in %"
             + (f"; mean (min-max) over training seeds {seeds} (world and tiny CLIP shared)" if len(seeds) > 1 else "")
             + ".", "",
             "| method | CAM mIoU | pseudo-mask mIoU | pseudo mask | co-bg FA |", "|---|---:|---:|---|---:|"]
    for name, d in rows.items():
        lines.append(f"| {name} | {cell(d['cam_miou'])} | {cell(d['mask_miou'])} | {d['refinement']} | "
                     f"{cell(d['co_bg_fa'])} |")
    lines += ["", effects_markdown(runs)]
    irn = first.get("irn_thresholds_from_train")
    if irn:
        lines += ["", f"IRN thresholds chosen on train (first {s.get('threshold_images', '-')} / "
                  f"{s.get('rw_images', '-')} train images, never val): best train CAM threshold "
                  f"{irn['train_cam_threshold']:.2f} (train CAM mIoU {100 * irn['train_cam_miou']:.1f}) -> seeds fg "
                  f"{irn['fg_threshold']:.2f} / bg {irn['bg_threshold']:.2f}; random-walk background threshold "
                  f"{irn['rw_bg_threshold']:.2f}."]
    zs = first.get("tiny_clip_zero_shot") or {}
    lines += ["", "CAM mIoU: best constant background threshold of 0.05..0.95 on val. Pseudo masks: CLIMS/baseline "
              "CAMs with that threshold, CLIP-ES with (1 - max) background, then the listed refinement. co-bg FA: "
              f"share of ground-truth background pixels (at least {s['fa_margin']} px from any object) of a present "
              f"class's preferred background where that class's CAM exceeds {s['fa_threshold']}."]
    if zs:
        from wsclip.demo import zero_shot_text

        lines += ["", zero_shot_text(zs if "top1_in_labels" not in zs else {"": zs})]
    lines.append(END)
    return "\n".join(lines) + "\n"


def effects_markdown(runs: dict[int, dict]) -> str:
    """The papers' effects (wsclip.demo.EFFECTS) per training seed, and whether each one's sign holds on all."""
    seeds = sorted(runs)
    per = {seed: {e["effect"]: e for e in runs[seed].get("effects") or []} for seed in seeds}
    names = [e["effect"] for e in runs[seeds[0]].get("effects") or []]
    head = ("| effect (the papers' claim) | target | " + " | ".join(f"seed {s}" for s in seeds)
            + " | sign on every seed |")
    lines = [head, "|---|---:|" + "---:|" * len(seeds) + "---|"]
    for name in names:
        es = [per[s].get(name) for s in seeds]
        t = es[0]["target"]
        target = f">= +{100 * t:.0f}" if t > 0 else "> 0"
        vals = " | ".join("-" if e is None else f"{100 * e['value']:+.1f}" for e in es)
        stable = all(e is not None and e["value"] > 0 for e in es)
        lines.append(f"| {name} | {target} | {vals} | {'yes' if stable else 'no'} |")
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    from wsclip.io import atomic_write_text

    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(path, text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "synth_ablation", help="work folder (resumes)")
    p.add_argument("--cache", type=Path, help="tiny CLIP cache (default $WSCLIP_CACHE or ~/.cache/wsclip)")
    p.add_argument("--seed", type=int, default=0, help="seed of the world and the tiny CLIP")
    p.add_argument("--train-seeds", type=int, nargs="+", default=[0],
                   help="one run per training seed (baseline CAM, CLIMS, IRN); world and CLIP are shared")
    p.add_argument("--quick", action="store_true", help="the `wsclip demo` settings instead of the full ones")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--write-md", action="store_true", help="put the table into BENCHMARKS.md")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "synth_ablation.json")
    args = p.parse_args(argv)

    import torch

    from wsclip.demo import DemoConfig, format_table, run_demo
    from wsclip.io import atomic_write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    runs = {}
    for seed in args.train_seeds:
        kw = {"out": str(args.out / f"train-seed{seed}"), "seed": args.seed, "train_seed": seed}
        if args.cache:
            kw["cache_dir"] = str(args.cache)
        cfg = DemoConfig.demo(**kw) if args.quick else DemoConfig.full(**kw)
        print(f"== training seed {seed}: {cfg.out}", file=sys.stderr, flush=True)
        runs[seed] = run_demo(cfg)
        print(format_table(runs[seed]["rows"]), flush=True)
    command = "python benchmarks/synth_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, {platform.node() or 'host'}"
    record = {"benchmark": "synth_ablation", "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": command.strip(),
              "machine": machine, "python": platform.python_version(), "torch": torch.__version__,
              "runs": {str(k): {kk: vv for kk, vv in v.items()} for k, v in runs.items()}}
    atomic_write_json(args.results, json.loads(json.dumps(record, default=str)))
    section = markdown(runs, command.strip(), "2-core CPU dev box" if (torch.get_num_threads() <= 2) else machine)
    print(section)
    if args.write_md:
        write_section(ROOT / "BENCHMARKS.md", section)
        print(f"updated {ROOT / 'BENCHMARKS.md'}", file=sys.stderr)
    print(f"wrote {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
