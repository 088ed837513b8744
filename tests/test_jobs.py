"""The resumable job runner (wsclip.jobs) and every dataset job on it: manifest, lock, settings, errors, SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from job_helpers import kill_and_resume, manifest_ok, tiny_vit_clip
from wsclip.cli import main
from wsclip.errors import BadFileError, WsclipError
from wsclip.jobs import Job, Manifest

IDS = ["2007_000033", "2009_000573", "2008_006874"]


# ============================================================================ the runner itself
def test_records_are_durable_per_item_and_errors_isolated(tmp_path):
    out = tmp_path / "out"
    with Job("demo", out, {"a": 1}) as job:
        todo = job.start(["x", "y", "z"])
        for i in todo:
            with job.item(i):
                if i == "y":
                    raise BadFileError("cannot decode y")
                (out / f"{i}.png").write_bytes(b"png")
            # the record is on disk before the next item starts
            assert i in {json.loads(line)["id"] for line in (out / "manifest.jsonl").read_text().splitlines()}
        summary = job.finish()
    assert summary["done"] == 2 and summary["errors"] == 1 and summary["error_ids"] == ["y"]
    assert json.loads((out / "errors.json").read_text()) == [{"id": "y", "error": "cannot decode y"}]
    # a resume retries the failed item only; a finished item whose file vanished is redone
    (out / "z.png").unlink()
    with Job("demo", out, {"a": 1}) as job:
        assert job.start(["x", "y", "z"]) == ["y", "z"]
    # on_error="fail": the item's own error stops the run, after its record
    with pytest.raises(BadFileError):
        with Job("demo", out, {"a": 1}, on_error="fail") as job:
            for i in job.start(["y"]):
                with job.item(i):
                    raise BadFileError("still broken")
    assert Manifest(out / "manifest.jsonl").records["y"]["error"] == "still broken"


def test_settings_fingerprint_refuses_a_different_resume_and_restart_redoes(tmp_path):
    out = tmp_path / "out"
    with Job("demo", out, {"scales": [1.0, 0.5]}) as job:
        for i in job.start(["a"]):
            (out / "a.png").write_bytes(b"")
            job.done(i)
    with pytest.raises(WsclipError, match=r"other settings \(scales\).*--restart"):
        Job("demo", out, {"scales": [1.0]}).open()
    with Job("demo", out, {"scales": [1.0]}, restart=True) as job:
        assert job.start(["a"]) == ["a"]
    assert json.loads((out / "demo_config.json").read_text()) == {"scales": [1.0]}


def test_pool_items_are_recorded_as_they_finish(tmp_path):
    out = tmp_path / "out"

    def work(i):
        if i == "b":
            raise ValueError("boom")
        (out / f"{i}.png").write_bytes(b"")
        time.sleep(0.01)

    with Job("demo", out, {}) as job, ThreadPoolExecutor(2) as pool:
        for i in job.start(["a", "b", "c", "d"]):
            job.submit(pool, i, work, i)
        job.drain(keep=0)
        assert job.counts == {"done": 3, "errors": 1}
        assert job.first_failure == "b: ValueError: boom"
    assert manifest_ok(out) == {"a", "c", "d"}


def test_lock_refuses_a_second_run_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "out"
    with Job("demo", out, {}):
        with pytest.raises(WsclipError, match="another wsclip job"):
            Job("demo", out, {}).open()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from wsclip.jobs import Job; "
         f"j = Job('demo', {str(out)!r}, {{}}); j.open(); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WsclipError, match="another wsclip job"):
            Job("demo", out, {}).open()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with Job("demo", out, {}) as job:  # the kernel dropped the dead process's lock
        assert job.start(["a"]) == ["a"]


# ============================================================================ every job on it
@pytest.fixture(scope="module")
def small_voc(tmp_path_factory, voc14):
    """3 voc14 images resized to odd sizes in a VOC layout, CAM files for them, and tiny models."""
    from wsclip.formats import write_cam_file
    from wsclip.models.camnet import build_camnet, save_camnet
    from wsclip.models.seg import build_seg_model, save_seg_model
    from wsclip.vocab import VOC_CLASSES

    import torch

    base = tmp_path_factory.mktemp("jobs")
    root = base / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    labels = json.loads((voc14 / "labels.json").read_text())
    cams = base / "cams"
    rng = np.random.default_rng(0)
    for i in IDS:
        Image.open(voc14 / "JPEGImages" / f"{i}.jpg").resize((52, 41), Image.BICUBIC).save(root / "JPEGImages" / f"{i}.jpg")
        keys = np.array(sorted(k - 1 for k in labels[i]))
        high = rng.random((len(keys), 41, 52)).astype(np.float32)
        write_cam_file(cams / f"{i}.npz", keys, high[:, ::4, ::4], high)
    (root / "labels.json").write_text(json.dumps({i: labels[i] for i in IDS}))
    (root / "val.txt").write_text("\n".join(IDS) + "\n")
    torch.manual_seed(0)
    save_camnet(base / "cam.safetensors", build_camnet("tiny", 20), VOC_CLASSES)
    save_seg_model(base / "seg.safetensors", build_seg_model("deeplabv2", "tiny", 21), VOC_CLASSES)
    tiny_vit_clip(base / "clip.safetensors")
    return base


def _jobs(b):
    """(name, argv, the same argv with one setting changed) of every dataset job's CLI."""
    data = ["--data", str(b / "voc"), "--split", "val"]
    cam = ["cam", "--checkpoint", str(b / "cam.safetensors"), *data, "--workers", "0", "--device", "cpu"]
    es = ["cam", "--method", "clip-es", "--clip", str(b / "clip.safetensors"), *data, "--workers", "0",
          "--device", "cpu"]
    caa = ["refine", "caa", "--cams", str(b / "cams"), "--clip", str(b / "clip.safetensors"), *data, "--device", "cpu"]
    pseudo = ["pseudo", "--cams", str(b / "cams")]
    seg = ["segment", "--checkpoint", str(b / "seg.safetensors"), "--images", str(b / "voc"), "--split", "val",
           "--workers", "0", "--device", "cpu", "--scales", "1.0"]
    label = ["label", "--images", f"voc:{b / 'voc'}", "--split", "val", "--model", str(b / "cam.safetensors"),
             "--workers", "0", "--device", "cpu"]
    return [("cam", cam, ["--scales", "0.5"], ["--scales", "1.0"]),
            ("cam clip-es", es, [], ["--box-threshold", "0.6"]),
            ("refine caa", caa, [], ["--box-threshold", "0.6"]),
            ("pseudo", pseudo, [], ["--alpha", "2"]),
            ("refine crf-less pseudo (threshold)", pseudo, ["--bg", "threshold"], ["--bg", "threshold", "--bg-threshold", "0.3"]),
            ("segment", seg, [], ["--no-flip"]),
            ("label", label, [], ["--bg-threshold", "0.4"])]


@pytest.mark.parametrize("n", range(7))
def test_every_job_refuses_a_resume_with_other_settings(small_voc, tmp_path, capsys, n):
    name, argv, first, other = _jobs(small_voc)[n]
    out = ["--out", str(tmp_path / "out")]
    assert main([*argv, *out, *first]) == 0, name
    assert len(manifest_ok(tmp_path / "out")) == 3, name
    assert main([*argv, *out, *first]) == 0  # same settings: resumes (nothing to do)
    capsys.readouterr()
    assert main([*argv, *out, *other]) == 2, name
    assert "other settings" in capsys.readouterr().err
    assert main([*argv, *out, *other, "--restart"]) == 0, name


def test_irn_seeds_refuse_a_resume_with_other_settings(small_voc, tmp_path):
    from wsclip.data import open_images
    from wsclip.train.irn import make_seeds

    ds = open_images(str(small_voc / "voc"), "val")
    make_seeds(ds, small_voc / "cams", tmp_path / "seeds", crf="off")
    assert manifest_ok(tmp_path / "seeds") == set(IDS)
    with pytest.raises(WsclipError, match="seeds made with other settings"):
        make_seeds(ds, small_voc / "cams", tmp_path / "seeds", fg_threshold=0.5, crf="off")
    make_seeds(ds, small_voc / "cams", tmp_path / "seeds", fg_threshold=0.5, crf="off", restart=True)


# ============================================================================ SIGKILL at random moments
def test_cam_sigkill_at_random_moments_resumes_byte_identical(voc14, tmp_path):
    import torch

    from wsclip.models.camnet import build_camnet, save_camnet

    torch.manual_seed(0)
    ckpt = tmp_path / "cam.safetensors"
    save_camnet(ckpt, build_camnet("tiny", 20), [f"c{i}" for i in range(20)])
    argv = ["cam", "--checkpoint", str(ckpt), "--data", str(voc14), "--split", "val", "--scales", "0.5,0.25",
            "--workers", "1", "--device", "cpu"]
    ref = tmp_path / "ref"
    assert main([*argv, "--out", str(ref)]) == 0
    out = tmp_path / "out"
    res = kill_and_resume([*argv, "--out", str(out)], out, ".npz", rounds=3)
    assert any(rc == -signal.SIGKILL for rc in res["kills"]), res
    files = sorted(p.name for p in ref.glob("*.npz"))
    assert len(files) == 14 and sorted(p.name for p in out.glob("*.npz")) == files
    assert all((out / f).read_bytes() == (ref / f).read_bytes() for f in files)
    # one item at a time: at most the one in flight had its file but not its record, and only such are redone
    assert res["in_flight"] <= 1 and res["redone"] <= res["in_flight"] * 3 and res["recorded_redone"] == 0, res
    assert manifest_ok(out) == {f[:-4] for f in files}
