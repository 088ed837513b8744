"""`wsclip label --ray` on a local Ray instance labels a folder exactly as the local pipeline does."""

import json

import pytest

from wsclip.cli import main
from wsclip.serve.batch import Manifest

pytest.importorskip("ray.data")


def _approx(tree):
    """`tree` with every float wrapped in a tolerance: the quality statistics are float32 sums whose last
    printed digit depends on which images share a batch (Ray batches the unlabelled remainder differently)."""
    if isinstance(tree, dict):
        return {k: _approx(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_approx(v) for v in tree]
    return pytest.approx(tree, abs=1e-5) if isinstance(tree, float) else tree


def test_ray_path_matches_local_path(small_folder, cam_ckpt, tmp_path):
    labels = small_folder.parent / f"{small_folder.name}_labels.json"
    common = ["--images", str(small_folder), "--model", str(cam_ckpt), "--device", "cpu", "--batch-size", "2",
              "--window", "3", "--rle", "--cams"]
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    assert main(["label", *common, "--labels", str(labels), "--out", str(local), "--workers", "0"]) == 0
    # the first window is done already: the Ray run must skip it and label the rest
    first = sorted(p.name for p in small_folder.iterdir())[:3]
    assert main(["label", *common, "--labels", str(labels), "--out", str(ray_out), "--workers", "0",
                 "--limit", "3"]) == 0
    done = {p.name: p.stat().st_mtime_ns for p in ray_out.glob("*.png")}
    assert len(done) == len(first)
    assert main(["label", *common, "--labels", str(labels), "--out", str(ray_out), "--ray", "--concurrency", "2",
                 "--ray-cpus", "2"]) == 0
    masks = sorted(p.name for p in local.glob("*.png"))
    assert masks == sorted(p.name for p in ray_out.glob("*.png")) and len(masks) == 8
    for name in masks:
        assert (local / name).read_bytes() == (ray_out / name).read_bytes(), name
    assert {p.name: p.stat().st_mtime_ns for p in ray_out.glob("*.png") if p.name in done} == done
    assert (local / "annotations.json").read_bytes() == (ray_out / "annotations.json").read_bytes()
    a, b = Manifest(local / "manifest.jsonl").records, Manifest(ray_out / "manifest.jsonl").records
    assert a == _approx(b)
    summary = json.loads((ray_out / "summary.json").read_text())
    assert summary["labelled"] == 5 and summary["skipped_done"] == 3 and summary["labeler"]["ray_actors"] == 2
