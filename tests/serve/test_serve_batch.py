"""`wsclip label`: outputs, inputs, errors, and byte-identical resume after SIGKILL at random points."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from wsclip.cli import main
from wsclip.io import read_image, read_mask
from wsclip.serve.batch import Manifest, open_source, windows
from wsclip.serve.labelers import LabelerConfig, load_labeler, rle_decode
from wsclip.vocab import VOC_CLASSES

VOC_ARGS = ["--split", "val", "--batch-size", "2", "--window", "4", "--device", "cpu", "--rle"]


def _label_argv(images, model, out, *extra):
    return ["label", "--images", str(images), "--model", str(model), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def voc_reference(tmp_path_factory, voc14, cam_ckpt):
    """One uninterrupted in-process run over the 14 VOC images (decoding in the main process)."""
    out = tmp_path_factory.mktemp("label_ref") / "out"
    assert main(_label_argv(f"voc:{voc14}", cam_ckpt, out, *VOC_ARGS, "--cams", "--overlays", "--workers", "0",
                            "--post-workers", "2")) == 0
    return out


def test_voc14_outputs_are_the_labelers_masks(voc_reference, voc14, cam_ckpt):
    from wsclip.label.clims_cam import read_cam_file

    out = voc_reference
    ids = (voc14 / "val.txt").read_text().split()
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(ids)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labelled"] == 14 and summary["errors"] == 0 and summary["total"] == 14
    labels = json.loads((voc14 / "labels.json").read_text())
    # reference: the labeler on the same fixed windows of 4 (first and last), labels from labels.json
    lab = load_labeler(LabelerConfig(model=str(cam_ckpt), device="cpu", batch_size=2))
    src = open_source(f"voc:{voc14}", "val", classes=lab.classes)
    ann = json.loads((out / "annotations.json").read_text())
    by_name = {im["file_name"]: im["id"] for im in ann["images"]}
    assert all(name.endswith(".jpg") for name in by_name)  # the image's file name, extension included
    by_name = {name[:-4]: n for name, n in by_name.items()}
    by_quality = {im["file_name"][:-4]: im["wsclip_quality"] for im in ann["images"]}
    records = {r["id"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    from wsclip.label.quality import assess

    wins = windows(len(src), 4)
    for w in (wins[0], wins[-1]):
        images = [src.load(i) for i in w]
        res = lab.label_batch(images, [src.label(i) for i in w], want_cams=True)
        for i, r in zip(w, res):
            image_id = src.ids[i]
            mask = read_mask(out / f"{image_id}.png")
            assert np.array_equal(mask, r.mask), image_id
            assert r.keys.tolist() == sorted(v - 1 for v in labels[image_id])
            cam = read_cam_file(out / "cams" / f"{image_id}.npz")
            assert cam["keys"].tolist() == r.keys.tolist() and cam["high_res"].shape == (len(r.keys), *mask.shape)
            np.testing.assert_allclose(cam["high_res"].astype(np.float32), r.cams, atol=2e-3)
            assert read_image(out / "overlays" / f"{image_id}.png").shape == (*mask.shape, 3)
            decoded = np.zeros_like(mask)
            for a in ann["annotations"]:
                if a["image_id"] == by_name[image_id]:
                    decoded[rle_decode(a["segmentation"])] = a["category_id"]
            assert np.array_equal(decoded, np.where(mask == 255, 0, mask))
            # the record's quality score is the one the labeler's own maps give (wsclip.label.quality)
            rec = records[image_id]
            q = assess(mask, r.keys, r.cams)
            assert rec["quality"]["score"] == pytest.approx(q["score"], abs=2e-3)
            assert rec["quality"]["coverage"] == q["coverage"] and rec["quality"]["area"] == q["area"]
            assert rec["image"] == str((voc14 / "JPEGImages" / f"{image_id}.jpg").resolve())
            assert by_quality[image_id] == rec["quality"]["score"]
    # a second run has nothing to do and rewrites nothing
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert main(_label_argv(f"voc:{voc14}", cam_ckpt, out, *VOC_ARGS, "--cams", "--overlays", "--workers", "0")) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.png")} == mtimes
    assert json.loads((out / "summary.json").read_text())["skipped_done"] == 14


def _no_process_mentions(text: str, wait: float = 10.0) -> bool:
    """True once no live process has `text` in its command line (zombies count as gone)."""
    deadline = time.monotonic() + wait
    while True:
        alive = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if text in cmd and state != "Z":
                alive.append(d.name)
        if not alive:
            return True
        if time.monotonic() > deadline:
            for pid in alive:  # do not leave them to the rest of the suite
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass
            return False
        time.sleep(0.1)


def _masks(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


def test_sigkill_at_random_points_then_resume_is_byte_identical(voc_reference, voc14, cam_ckpt, tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "wsclip.cli", *_label_argv(f"voc:{voc14}", cam_ckpt, out, *VOC_ARGS,
                                                             "--workers", "1", "--post-workers", "2")]
    env = {**os.environ, "WSCLIP_NO_PROGRESS": "1"}
    rng = random.Random()
    kills = []
    for _ in range(2):
        done_before = len(list(out.glob("*.png"))) if out.exists() else 0
        target = done_before + rng.randint(1, 4)
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t_end = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < t_end:
            if out.exists() and len(list(out.glob("*.png"))) >= target:
                time.sleep(rng.random() * 0.05)  # land anywhere: mid-write, mid-manifest, mid-batch
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        rc = proc.wait()
        kills.append((target, rc, len(list(out.glob("*.png")))))
    assert any(rc == -signal.SIGKILL and n < 14 for _, rc, n in kills), f"no kill landed mid-run: {kills}"
    assert _no_process_mentions(str(out)), "decode / CRF workers outlived the killed job"
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert _masks(out) == _masks(voc_reference), f"kill points {kills}"
    assert (out / "annotations.json").read_bytes() == (voc_reference / "annotations.json").read_bytes()
    assert not list(out.rglob(".*.tmp*")), "temporary files left behind"
    records = Manifest(out / "manifest.jsonl").records
    assert sorted(records) == sorted(p.stem for p in voc_reference.glob("*.png"))
    assert all(r["status"] == "ok" for r in records.values())


def test_inputs_labels_and_errors(small_folder, cam_ckpt, tmp_path):
    import shutil

    folder = tmp_path / "imgs"
    shutil.copytree(small_folder, folder)
    labels_file = small_folder.parent / f"{small_folder.name}_labels.json"
    good = sorted(p.stem for p in folder.iterdir())
    (folder / "broken.jpg").write_bytes((folder / "img0.jpg").read_bytes()[:300])  # truncated JPEG
    (folder / "notes.txt").write_text("not an image")
    # folder input, labels for the good images only: broken.jpg gets predicted labels but fails to decode
    out = tmp_path / "a"
    assert main(_label_argv(folder, cam_ckpt, out, "--labels", str(labels_file), "--workers", "0",
                            "--device", "cpu", "--on-error", "skip")) == 0
    assert sorted(p.stem for p in out.glob("*.png")) == good
    errors = json.loads((out / "errors.json").read_text())
    assert [e["id"] for e in errors] == ["broken"] and "truncated" in errors[0]["error"].lower()
    recs = Manifest(out / "manifest.jsonl").records
    given = json.loads(labels_file.read_text())
    for i in good:
        assert recs[i]["label_ids"] == sorted(given[i]) and not recs[i]["predicted"]
        assert recs[i]["labels"] == [VOC_CLASSES[v - 1] for v in sorted(given[i])]  # names in user-facing files
    # fail mode stops with exit code 2 and keeps what was finished
    out_fail = tmp_path / "b"
    assert main(_label_argv(folder, cam_ckpt, out_fail, "--workers", "0", "--device", "cpu",
                            "--on-error", "fail", "--window", "2", "--batch-size", "1")) == 2
    # glob and list-file inputs, labels predicted from the CAM network's scores
    out_glob = tmp_path / "c"
    assert main(_label_argv(f"{folder}/*.png", cam_ckpt, out_glob, "--workers", "0", "--device", "cpu")) == 0
    pngs = sorted(p.stem for p in folder.glob("*.png"))
    assert sorted(p.stem for p in out_glob.glob("*.png")) == pngs
    assert all(r["predicted"] for r in Manifest(out_glob / "manifest.jsonl").records.values())
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(f"imgs/{n}.jpg" for n in ("img0", "img1")) + "\n")
    out_list = tmp_path / "d"
    assert main(_label_argv(lst, cam_ckpt, out_list, "--workers", "0", "--device", "cpu", "--predict", "none",
                            "--labels", str(labels_file))) == 0
    assert sorted(p.stem for p in out_list.glob("*.png")) == ["img0", "img1"]
    # no labels and no predictor: a clear error
    assert main(_label_argv(lst, cam_ckpt, tmp_path / "e", "--predict", "none", "--device", "cpu")) == 2
    # GPU JPEG decoding asked for on a CPU: a clear error, nothing written
    assert main(_label_argv(lst, cam_ckpt, tmp_path / "f", "--device", "cpu", "--decode", "gpu",
                            "--labels", str(labels_file))) == 2
    assert not (tmp_path / "f").exists()  # refused before the output folder is touched
    assert json.loads((out_list / "label_config.json").read_text())["decoder"] == "pil"  # recorded for resumes
    # other settings into the same folder are refused, --restart relabels
    argv = _label_argv(lst, cam_ckpt, out_list, "--workers", "0", "--device", "cpu", "--predict", "none",
                       "--labels", str(labels_file), "--bg-threshold", "0.4")
    assert main(argv) == 2
    assert main([*argv, "--restart"]) == 0


def test_manifest_drops_and_truncates_a_partial_last_line(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"id": "a", "status": "ok"}\n{"id": "b", "status": "error", "error": "x"}\n{"id": "c", "sta')
    (tmp_path / "a.png").write_bytes(b"")
    m = Manifest(path)
    assert set(m.records) == {"a", "b"} and m.finished(tmp_path) == {"a"}
    m.append([{"id": "c", "status": "ok"}])
    lines = path.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["a", "b", "c"]
