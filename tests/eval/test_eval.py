"""`wsclip eval`: folders of masks -> per-class IoU and mIoU (in-process and as the console script)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wsclip.cli import main
from wsclip.io import read_mask, write_mask
from wsclip.vocab import VOC_CLASSES


def test_eval_gt_against_itself(voc14, tmp_path, capsys):
    gt = voc14 / "SegmentationClass"
    out = tmp_path / "res.json"
    rc = main(["eval", "--pred", str(gt), "--gt", str(gt), "--split", str(voc14 / "val.txt"), "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert text.splitlines()[-2].split() == ["mIoU", "100.0"] and "images: 14" in text
    res = json.loads(out.read_text())
    assert res["miou"] == 1.0 and res["images"] == 14 and res["pixel_accuracy"] == 1.0
    assert res["iou"]["aeroplane"] == 1.0 and res["iou"]["tvmonitor"] is None  # absent class


def test_eval_console_script(voc14, tmp_path):
    exe = Path(sys.executable).parent / "wsclip"
    if not exe.exists():
        pytest.skip("wsclip console script not installed in this environment")
    gt = voc14 / "SegmentationClass"
    out = tmp_path / "res.json"
    p = subprocess.run([str(exe), "eval", "--pred", str(gt), "--gt", str(gt), "--json", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "mIoU" in p.stdout and "100.0" in p.stdout
    assert json.loads(out.read_text())["miou"] == 1.0


def test_eval_all_background_prediction(voc14, tmp_path):
    gt_dir = voc14 / "SegmentationClass"
    ids = (voc14 / "val.txt").read_text().split()
    pred = tmp_path / "pred"
    bg = valid = 0
    present = set()
    for i in ids:
        gt = read_mask(gt_dir / f"{i}.png")
        write_mask(pred / f"{i}.png", np.zeros_like(gt))
        bg += int((gt == 0).sum())
        valid += int((gt != 255).sum())
        present |= set(np.unique(gt).tolist()) - {0, 255}
    # split lines may name files DeepLab-style
    split = tmp_path / "list.txt"
    split.write_text("".join(f"/JPEGImages/{i}.jpg /SegmentationClass/{i}.png\n" for i in ids))
    out = tmp_path / "res.json"
    assert main(["eval", "--pred", str(pred), "--gt", str(gt_dir), "--split", str(split), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    expected_bg = bg / valid
    assert res["iou"]["background"] == pytest.approx(expected_bg, rel=1e-12)
    for k, name in enumerate(VOC_CLASSES, 1):
        assert res["iou"][name] == (0.0 if k in present else None)
    assert res["miou"] == pytest.approx(expected_bg / (1 + len(present)), rel=1e-12)
    assert res["pixel_accuracy"] == pytest.approx(expected_bg, rel=1e-12)


def test_eval_user_errors_exit_2_without_traceback(voc14, tmp_path, capsys):
    gt = voc14 / "SegmentationClass"
    pred = tmp_path / "pred"
    write_mask(pred / "2007_000033.png", np.zeros((513, 513), np.uint8))
    write_mask(pred / "2007_000332.png", np.zeros((5, 5), np.uint8))
    (tmp_path / "two.txt").write_text("2007_000033\n2007_000332\n")
    cases = [
        (["--pred", str(tmp_path / "nope"), "--gt", str(gt)], "prediction folder not found"),
        (["--pred", str(pred), "--gt", str(gt)], "12 of 14 predictions missing"),
        (["--pred", str(pred), "--gt", str(gt), "--split", str(tmp_path / "no.txt")], "split file not found"),
        (["--pred", str(pred), "--gt", str(gt), "--split", str(tmp_path / "two.txt")],
         "2007_000332: prediction is 5x5"),
        (["--pred", str(pred), "--gt", str(gt), "--dataset", "imagenet"], "neither 'voc', 'coco'"),
    ]
    for args, msg in cases:
        assert main(["eval", *args]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1 and err.startswith("wsclip eval: error:")
