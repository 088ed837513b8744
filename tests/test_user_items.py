"""Issue 18's smaller items, each as a user meets it: random-init `train cam` trains, folder labels
accept class numbers, checkpoint errors say what the file is, outputs honour the umask."""

import json
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from wsclip.cli import main


@pytest.fixture()
def photos(tmp_path, voc14):
    """A plain folder of 6 small VOC photos with labels.csv (class names), no split file."""
    d = tmp_path / "photos"
    d.mkdir()
    labels = json.loads((voc14 / "labels.json").read_text())
    from wsclip.vocab import VOC_CLASSES

    rows = ["image,labels"]
    for i in sorted(labels)[:6]:
        Image.open(voc14 / "JPEGImages" / f"{i}.jpg").convert("RGB").resize((64, 48)).save(d / f"{i}.jpg")
        rows.append(f"{i}.jpg,{';'.join(VOC_CLASSES[k - 1] for k in labels[i])}")
    (d / "labels.csv").write_text("\n".join(rows) + "\n")
    return d


def test_random_init_resnet_train_cam_trains_with_the_defaults(photos, tmp_path, capsys):
    # the papers' lr 0.1 with frozen BatchNorm diverges from random weights within a few steps
    out = tmp_path / "cam"
    assert main(["train", "cam", "--data", f"folder:{photos}", "--backbone", "resnet18", "--max-steps", "6",
                 "--batch-size", "2", "--crop", "64", "--resize-long", "48", "64", "--num-workers", "0",
                 "--device", "cpu", "--log-every", "1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "BatchNorm trains and lr is 0.01" in err and "--pretrained" in err
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert "from_scratch: auto" in (out / "config.yaml").read_text()


def test_folder_labels_accept_class_numbers_with_a_class_list(tmp_path, voc14):
    from wsclip.data import open_dataset

    d = tmp_path / "nums"
    d.mkdir()
    for i in ("a", "b"):
        Image.new("RGB", (8, 8)).save(d / f"{i}.jpg")
    (d / "classes.txt").write_text("cat\ndog\ncow\n")
    (d / "labels.json").write_text(json.dumps({"a.jpg": [1, 3], "b.jpg": ["dog"]}))
    ds = open_dataset(f"folder:{d}")
    assert ds.classes == ("cat", "dog", "cow")
    assert ds.label_vector(0).tolist() == [1, 0, 1] and ds.label_vector(1).tolist() == [0, 1, 0]
    (d / "classes.txt").unlink()
    assert main(["cam", "--checkpoint", "x", "--data", f"folder:{d}", "--out", str(tmp_path / "o")]) == 2


def test_checkpoint_errors_say_what_the_file_is(tmp_path, capsys):
    import torchvision

    from wsclip.models.camnet import build_camnet, save_camnet

    (tmp_path / "notes.txt").write_text("not a model\n")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    torch.save({"step": 3, "optimizer": {}, "scheduler": {}}, tmp_path / "state.pt")
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.jpg")
    cases = {"notes.txt": "is a text file", "r18.pth": "torchvision ResNet state dict", "state.pt": "training state"}
    for name, words in cases.items():
        assert main(["label", "--model", str(tmp_path / name), "--images", str(images), "--out",
                     str(tmp_path / "o")]) == 2
        msg = capsys.readouterr().err.strip()
        assert words in msg and "'None'" not in msg and len(msg.splitlines()) == 1, msg
    other = tmp_path / "other.safetensors"
    save_camnet(other, build_camnet("tiny", 20), [f"c{k}" for k in range(20)])
    meta = json.loads(other.with_suffix(".json").read_text())
    other.with_suffix(".json").write_text(json.dumps({**meta, "num_classes": 11}))  # weights for 20, sidecar says 11
    assert main(["cam", "--checkpoint", str(other), "--data", str(images), "--out", str(tmp_path / "o")]) == 2
    msg = capsys.readouterr().err.strip()
    assert "(20, 128, 1, 1) in the file, (11, 128, 1, 1) expected" in msg and not msg.endswith(":"), msg


def test_atomic_outputs_honour_the_umask(tmp_path):
    import os

    from wsclip.io import atomic_write_bytes, save_checkpoint, write_mask

    umask = os.umask(0o022)
    os.umask(umask)
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    write_mask(tmp_path / "m.png", np.zeros((2, 2), np.uint8))
    save_checkpoint(tmp_path / "c.safetensors", {"w": torch.zeros(2)}, {"kind": "test"})
    for name in ("a.bin", "m.png", "c.safetensors", "c.json"):  # 0o644 under umask 022, not mkstemp's 0o600
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
