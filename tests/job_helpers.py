"""Shared by the job-runner tests: tiny models on disk, and SIGKILL-then-resume with redone items counted."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path


def tiny_vit_clip(path):
    """A tiny random open_clip ViT saved as a wsclip CLIP checkpoint (safetensors + sidecar)."""
    import torch
    from open_clip.model import CLIP

    from wsclip.models.clip import ClipModel, save_clip

    text = {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    cfg = {"embed_dim": 16, "quick_gelu": True, "text_cfg": text,
           "vision_cfg": {"image_size": 32, "layers": 3, "width": 48, "patch_size": 8, "head_width": 16}}
    torch.manual_seed(0)
    model = CLIP(**cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(torch.randn_like(p) * 0.2)
    save_clip(path, ClipModel(model, "tiny-vit", cfg), cfg, "tiny-vit")
    return path


def synth_world_and_clip(root: Path, n_train: int, clip_cfg: dict, name: str) -> Path:
    """`root`/synth: n_train 64 px synthetic images in VOC layout (seed 0); `root`/clip.safetensors: a random
    open_clip CLIP of `clip_cfg` saved like a real checkpoint. Returns root."""
    import open_clip
    import torch

    from wsclip.data.synth import write_voc_layout
    from wsclip.models.clip import save_clip

    write_voc_layout(root / "synth", n_train=n_train, n_val=0, seed=0, size=64)
    torch.manual_seed(0)
    save_clip(root / "clip.safetensors", open_clip.CLIP(**clip_cfg), clip_cfg, name=name)
    return root


class Crash(Exception):
    """Raised by `crash_at` to kill a training run mid-way."""


def crash_at(step):
    """A Trainer callback that raises Crash at `step`."""
    def cb(trainer, s, terms):
        if s == step:
            raise Crash()
    return cb


def manifest_ok(out: Path) -> set[str]:
    """Ids whose last manifest record is ok."""
    recs = {}
    path = out / "manifest.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            recs[r["id"]] = r
    return {i for i, r in recs.items() if r.get("status") == "ok"}


def outputs(out: Path, suffix: str) -> dict[str, tuple]:
    """{id: (inode, mtime_ns)} of the finished output files directly in `out` (an atomic rewrite changes both)."""
    found = {}
    for p in out.glob(f"*{suffix}"):
        if not p.name.startswith("."):
            st = p.stat()
            found[p.name[: -len(suffix)]] = (st.st_ino, st.st_mtime_ns)
    return found


def kill_and_resume(argv: list[str], out: Path, suffix: str, rounds: int = 2, seed=None) -> dict:
    """Run `argv` (a wsclip CLI command line) in subprocesses SIGKILLed at random moments, then to the end.

    After each kill, the items with an output file but no ok manifest record were in flight (their
    record was not written yet); the next run may redo those and nothing else. Returns {"kills":
    [...], "in_flight": the largest such count, "redone": files present after a kill that the next
    run rewrote, "recorded_redone": of those, how many the manifest had recorded}.
    """
    env = {**os.environ, "WSCLIP_NO_PROGRESS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "wsclip.cli", *argv]
    rng = random.Random(seed)
    kills, in_flight, redone, recorded_redone = [], 0, 0, 0
    prev = None  # (files, ok) after the previous kill
    for n in range(rounds + 1):
        final = n == rounds
        if final:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr
        else:
            target = (len(outputs(out, suffix)) if out.exists() else 0) + rng.randint(1, 4)
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 180
            while proc.poll() is None and time.monotonic() < deadline:
                if out.exists() and len(outputs(out, suffix)) >= target:
                    time.sleep(rng.random() * 0.05)  # land anywhere: mid-write, mid-manifest, mid-batch
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.005)
            kills.append(proc.wait())
        files, ok = outputs(out, suffix), manifest_ok(out)
        if prev is not None:
            rewritten = {i for i, t in prev[0].items() if files.get(i) != t}
            redone += len(rewritten)
            recorded_redone += len(rewritten & prev[1])
        if not final:
            in_flight = max(in_flight, len(set(files) - ok))
            prev = (files, ok)
    return {"kills": kills, "in_flight": in_flight, "redone": redone, "recorded_redone": recorded_redone}


def stop_after(n: int, seen: list):
    """An on_image callback that records ids and raises KeyboardInterrupt (a Ctrl-C) at the n-th."""
    def callback(image_id):
        seen.append(image_id)
        if len(seen) == n:
            raise KeyboardInterrupt

    return callback
