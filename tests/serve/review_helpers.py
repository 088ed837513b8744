"""Helpers of the review page tests: the label run of the fixture folder, a `wsclip review` process."""

from pathlib import Path

REVIEW_TOKEN = "review-secret"


def label_args(world: Path, ckpt: Path, out: Path) -> list[str]:
    """`wsclip label` arguments of the labelled synth folder (the fixture runs the same settings)."""
    return ["label", "--images", f"voc:{world}", "--split", "val", "--model", str(ckpt), "--refine", "crf",
            "--cams", "--gt", str(world / "SegmentationClass"), "--out", str(out), "--workers", "0",
            "--post-workers", "0"]


def start_review(folder: Path, *extra: str, token: str | None = REVIEW_TOKEN):
    """`wsclip review FOLDER --port 0` as a real process; returns (process, base URL)."""
    import os
    import re
    import subprocess
    import sys
    import time

    args = [sys.executable, "-m", "wsclip.cli", "review", str(folder), "--port", "0", *extra]
    env = dict(os.environ)
    env.pop("WSCLIP_SERVE_TOKEN", None)
    if token is not None:
        env["WSCLIP_SERVE_TOKEN"] = token
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    t_end = time.monotonic() + 120
    line = ""
    while time.monotonic() < t_end:
        line = proc.stdout.readline()
        m = re.search(r"open (http://[^/]+)/review/", line)
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"wsclip review did not start: {line}{proc.stdout.read() if proc.stdout else ''}")
