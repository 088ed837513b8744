"""CLIP-ES speed side by side: the public CLIP-ES code vs `wsclip cam --method clip-es`, same inputs, on the CPU.

Measures wall and process CPU seconds of the public code's `generate_cams_voc12.py` (linyq2117/CLIP-ES: its
`clip` package, `pytorch_grad_cam`, GradCAM + CAA) and of `wsclip cam --method clip-es` (`--compat official`
and the default) on the first N of the 14 VOC images in tests/data/voc12_val14, with one random ViT-B/16
(OpenAI layout, weights rounded to fp16 values as the public `build_model` does, LayerNorms perturbed so the
maps are not flat), then compares the CAA-refined full-resolution maps of the ground-truth classes.

The public code is not shipped with wsclip: at run time it is extracted with `git archive` from
--official-repo (a git dir or a checkout) into --official-dir and imported from there. Its only run-time
adaptation: `perform()` picks "cuda:{process_id % n_gpus}" (a ZeroDivisionError without a GPU) and here runs
on "cpu"; its labels come from VOC XML files written for the images. Each side runs in its own subprocess
(no shared warm caches), with CUDA hidden and --threads torch threads. Seconds include loading the model and
encoding the prompts (both sides), and the CAM loop alone is reported too. Random weights: this
times the real-size path and checks agreement, not CAM quality. The public code needs OpenCV, ttach, lxml
and pkg_resources; where the venv lacks them, give a folder holding them (pip install --target DIR
opencv-python-headless ttach lxml "setuptools<81") as --official-pythonpath.

    .venv/bin/python benchmarks/clip_es_official.py --official-repo PATH [--official-pythonpath DIR]
        [--images 14] [--threads 2] [--reps 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOC14 = ROOT / "tests" / "data" / "voc12_val14"
VOC_NAMES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
             "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
MARK = ".extracted_by_clip_es_official"
SIDES = {"official": "public code", "wsclip-official": "wsclip --compat official", "wsclip": "wsclip default"}


def _extract(repo: Path, rev: str, dest: Path) -> str:
    """`git archive` of the public repository into dest (a folder this script made, or an empty one)."""
    if dest.exists() and any(dest.iterdir()) and not (dest / MARK).exists():
        raise SystemExit(f"{dest} is not empty and was not made by this script: name another --official-dir")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    git = ["git", "-C", str(repo)]
    commit = subprocess.run(git + ["rev-parse", rev], check=True, capture_output=True, text=True).stdout.strip()
    tar = subprocess.run(git + ["archive", "--format=tar", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
    (dest / MARK).write_text(commit + "\n")
    return commit


def _make_data(work: Path, ids: list[str], labels: dict) -> Path:
    """VOC-like folder for the public script: JPEGImages (links to the test images) + Annotations XML."""
    from PIL import Image

    data = work / "voc"
    shutil.rmtree(data, ignore_errors=True)
    (data / "JPEGImages").mkdir(parents=True)
    (data / "Annotations").mkdir()
    for i in ids:
        src = VOC14 / "JPEGImages" / f"{i}.jpg"
        (data / "JPEGImages" / src.name).symlink_to(src)
        w, h = Image.open(src).size
        objs = "".join(f"<object><name>{VOC_NAMES[c - 1]}</name></object>" for c in sorted(labels[i]))
        (data / "Annotations" / f"{i}.xml").write_text(
            f"<annotation><size><width>{w}</width><height>{h}</height></size>{objs}</annotation>")
    (data / "ids.txt").write_text("\n".join(ids) + "\n")
    return data


def _make_weights(path: Path, seed: int) -> None:
    """Random ViT-B/16 state dict in OpenAI's layout and dtypes (fp16 weights, fp32 LayerNorms)."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    m = open_clip.create_model("ViT-B-16")
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "ln" in n:
                p.add_(torch.randn_like(p) * 0.2)
    sd = {k: (v.half().float() if "ln" in k or k == "logit_scale" else v.half()) if v.is_floating_point() else v
          for k, v in m.state_dict().items()}
    torch.save(sd, path)


# ----------------------------------------------------------------------------- child processes (one side each)
def _child_official(a) -> dict:
    import importlib.util
    import textwrap

    sys.path[:0] = [str(a.official_dir), *a.official_pythonpath]
    missing = [m for m in ("cv2", "ttach", "lxml", "pkg_resources", "ftfy", "regex", "tqdm")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"the public code needs {', '.join(missing)}, missing here: pip install --target DIR "
                         f"opencv-python-headless ttach lxml 'setuptools<81' and pass --official-pythonpath DIR")
    import torch

    torch.set_num_threads(a.threads)
    path = str(a.official_dir / "generate_cams_voc12.py")
    src = Path(path).read_text()
    cuda_line = 'device_id = "cuda:{}".format(process_id % n_gpus)'
    if src.count(cuda_line) != 1 or src.count('\nif __name__ == "__main__":\n') != 1:
        raise SystemExit(f"{path} is not the version this driver adapts (its device line or __main__ block moved)")
    head, _, main_block = src.replace(cuda_line, 'device_id = "cpu"').partition('\nif __name__ == "__main__":\n')
    g = {"__name__": "generate_cams_voc12", "__file__": path}
    t0, c0 = time.perf_counter(), time.process_time()
    exec(compile(head, path, "exec"), g)  # the public module: imports, functions
    perform, cams = g["perform"], {}

    def timed_perform(*args):  # the CAM loop alone
        t, c = time.perf_counter(), time.process_time()
        r = perform(*args)
        cams.update(cams_wall_s=time.perf_counter() - t, cams_cpu_s=time.process_time() - c)
        return r

    g["perform"] = timed_perform
    sys.argv = [path, "--img_root", str(a.data / "JPEGImages"), "--split_file", str(a.data / "ids.txt"),
                "--cam_out_dir", str(a.out), "--model", str(a.ckpt)]
    # its __main__ block as written: clip.load, prompt features, GradCAM on the last block's ln_1, perform()
    exec(compile("\n" * (head.count("\n") + 2) + textwrap.dedent(main_block), path, "exec"), g)
    return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, **cams}


def _child_wsclip(a, compat: str) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    t0, c0 = time.perf_counter(), time.process_time()
    from wsclip.cli import main

    rc = main(["cam", "--method", "clip-es", "--clip", str(a.ckpt), "--clip-act", "quick_gelu",
               "--data", f"voc:{VOC14}", "--split", str(a.data / "ids.txt"), "--out", str(a.out),
               "--device", "cpu", "--workers", "0", "--compat", compat])
    if rc:
        raise SystemExit(rc)
    loop = json.loads((a.out / "summary.json").read_text())["seconds"]  # its item loop (after load + prompts)
    return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "cams_wall_s": loop}


def _run_side(side: str, a, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, __file__, "--child", side, "--out", str(out), "--work", str(a.work),
           "--official-dir", str(a.official_dir), "--threads", str(a.threads)]
    for p in a.official_pythonpath:
        cmd += ["--official-pythonpath", p]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    log = a.work / f"{side}.log"
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        raise SystemExit(f"{SIDES[side]} failed (exit {rc}); its log {log}:\n" + log.read_text()[-3000:])
    inner = json.loads((out / "_timing.json").read_text())
    (out / "_timing.json").unlink()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"process_wall_s": round(wall, 2), "process_cpu_s": round(cpu, 2),
            **{k: round(v, 2) for k, v in inner.items()}}


def _compare(official: Path, ours: Path, ids: list[str]) -> dict:
    """Per image: same class keys, max |difference| of the CAA-refined full-resolution maps (both in [0, 1])."""
    import numpy as np

    per, within, total = [], 0, 0
    for i in ids:
        pub = np.load(official / f"{i}.npy", allow_pickle=True).item()
        with np.load(ours / f"{i}.npz") as z:
            keys, high = z["keys"], z["high_res"].astype(np.float32)
        ref = pub["attn_highres"].astype(np.float32)
        same = bool(np.array_equal(np.asarray(pub["keys"]), keys)) and ref.shape == high.shape
        diff = np.abs(ref - high) if same else np.array([np.inf])
        within += int((diff <= 1e-2).sum())
        total += diff.size
        per.append({"id": i, "keys_match": same, "max_abs_diff": round(float(diff.max()), 4)})
    return {"per_image": per, "max_abs_diff": max(p["max_abs_diff"] for p in per),
            "within_1e-2_pct": round(100 * within / total, 3), "all_keys_match": all(p["keys_match"] for p in per)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official-repo", type=Path, help="the public CLIP-ES repository: a git dir or a checkout")
    p.add_argument("--official-rev", default="HEAD", help="its revision to extract")
    p.add_argument("--official-dir", type=Path, default=ROOT / "runs" / "bench" / "clip_es_official" / "official",
                   help="where the public code is extracted (wiped and re-extracted each run)")
    p.add_argument("--official-pythonpath", action="append", default=[],
                   help="extra import folder for the public side (OpenCV, ttach, lxml, pkg_resources); repeatable")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench" / "clip_es_official", help="work folder")
    p.add_argument("--images", type=int, default=14, help="first N of the 14 images (2..14)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads, both sides")
    p.add_argument("--reps", type=int, default=1, help="timed runs per side (the best counts)")
    p.add_argument("--seed", type=int, default=0, help="random weights")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "clip_es_official.json")
    p.add_argument("--child", choices=sorted(SIDES), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.work, a.official_dir = a.work.resolve(), a.official_dir.resolve()
    a.data, a.ckpt = a.work / "voc", a.work / "vit-b-16-random-openai.pt"
    if a.child:
        rec = _child_official(a) if a.child == "official" else _child_wsclip(a, a.child.partition("-")[2] or "wsclip")
        (a.out / "_timing.json").write_text(json.dumps(rec))
        return 0
    if a.official_repo is None:
        p.error("--official-repo is required (a git dir or checkout of linyq2117/CLIP-ES)")
    ids_all = (VOC14 / "val.txt").read_text().split()
    if not 2 <= a.images <= len(ids_all):  # the public script's np.loadtxt of one id is not iterable
        p.error(f"--images must be 2..{len(ids_all)}")
    ids = ids_all[:a.images]

    import torch

    a.work.mkdir(parents=True, exist_ok=True)
    commit = _extract(a.official_repo.resolve(), a.official_rev, a.official_dir)
    _make_data(a.work, ids, json.loads((VOC14 / "labels.json").read_text()))
    if not a.ckpt.is_file():
        _make_weights(a.ckpt, a.seed)
    runs = {s: [] for s in SIDES}
    for rep in range(a.reps):
        for side in SIDES:
            runs[side].append(_run_side(side, a, a.work / f"cams_{side}"))
            print(f"rep {rep + 1}/{a.reps} {SIDES[side]}: {runs[side][-1]}", flush=True)
    best = {s: min(r, key=lambda x: x["process_wall_s"]) for s, r in runs.items()}
    record = {
        "benchmark": "clip_es_official", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": "python benchmarks/clip_es_official.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpu_count": os.cpu_count()},
        "torch": torch.__version__, "threads": a.threads, "device": "cpu", "images": len(ids), "reps": a.reps,
        "official": {"repo": "linyq2117/CLIP-ES", "commit": commit, "script": "generate_cams_voc12.py",
                     "adaptation": "perform() device 'cuda:N' -> 'cpu' (at run time); labels from generated VOC XML"},
        "model": "random ViT-B/16, OpenAI layout, fp16-valued weights (QuickGELU), one file for both sides; "
                 "public: 1 image per forward; wsclip: its default --batch-size",
        "isolation": "each side in its own subprocess, one after the other; CUDA hidden",
        "timing": "process_* = the whole subprocess (interpreter, imports); wall_s/cpu_s = load model, encode "
                  "prompts, all CAMs; cams_wall_s = the CAM loop alone (public perform(); wsclip's item loop, "
                  "which in the default mode includes its one-off bf16 probe on CPUs with bf16); best of reps "
                  "by process wall",
        "seconds": best, "runs": runs,
        "ratio_official_over": {s: {k: round(best["official"][k] / best[s][k], 3)
                                    for k in ("wall_s", "cams_wall_s", "process_wall_s")}
                                for s in ("wsclip-official", "wsclip")},
        "maps_vs_official": {s: _compare(a.work / "cams_official", a.work / f"cams_{s}", ids)
                             for s in ("wsclip-official", "wsclip")},
    }
    from wsclip.io import atomic_write_json

    atomic_write_json(a.results, record)
    print("\n".join(f"{SIDES[s]}: public/wsclip wall {record['ratio_official_over'][s]['wall_s']}x; maps max |diff| "
                    f"{m['max_abs_diff']}, {m['within_1e-2_pct']}% within 1e-2, keys match {m['all_keys_match']}"
                    for s, m in record["maps_vs_official"].items()) + f"\nwrote {a.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
