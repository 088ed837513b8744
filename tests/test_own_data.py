"""A user's own data, end to end through the CLI: a plain folder of JPEGs (the VOC sample photos,
downscaled) with a labels.csv of class names, no VOC layout, no split file. Every command a newcomer
runs works: train cam (random init) -> train clims (tiny CLIP) -> cam -> pseudo --crf -> eval ->
label -> export onnx + export check -> serve + one request. Tiny sizes: the point is that each
command works, not the quality."""

import json
import os
import stat

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from wsclip.cli import main
from wsclip.vocab import VOC_CLASSES
from cli_server import start_cli_server

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
SIZE = (80, 60)  # W, H of the downscaled photos


@pytest.fixture(scope="module")
def user(tmp_path_factory, voc14):
    """photos/ (JPEGs + labels.csv with names), gt/ (masks in the folder's class order), classes.txt, clip file."""
    import open_clip

    from wsclip.models.clip import save_clip

    root = tmp_path_factory.mktemp("own_data")
    photos, gt = root / "photos", root / "gt"
    photos.mkdir()
    gt.mkdir()
    labels = json.loads((voc14 / "labels.json").read_text())
    names = sorted({VOC_CLASSES[k - 1] for ks in labels.values() for k in ks})  # the folder's classes
    lut = np.zeros(256, np.uint8)
    lut[255] = 255
    for k, name in enumerate(VOC_CLASSES, 1):
        lut[k] = names.index(name) + 1 if name in names else 0
    rows = ["image,labels"]
    for i, ks in sorted(labels.items()):
        Image.open(voc14 / "JPEGImages" / f"{i}.jpg").convert("RGB").resize(SIZE).save(photos / f"{i}.jpg", quality=90)
        mask = np.asarray(Image.open(voc14 / "SegmentationClass" / f"{i}.png").resize(SIZE, Image.NEAREST))
        Image.fromarray(lut[mask]).save(gt / f"{i}.png")
        rows.append(f"{i}.jpg,{';'.join(VOC_CLASSES[k - 1] for k in ks)}")
    (photos / "labels.csv").write_text("\n".join(rows) + "\n")
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    torch.manual_seed(0)
    save_clip(root / "clip.safetensors", open_clip.CLIP(**TINY_CLIP_CFG), TINY_CLIP_CFG, name="tiny-test")
    return root


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_whole_user_path_on_a_folder_with_a_labels_file(user, capsys, monkeypatch):
    monkeypatch.chdir(user)
    umask = os.umask(0o022)
    os.umask(umask)
    train = ["--data", "folder:photos", "--backbone", "tiny", "--batch-size", "4", "--crop", "64",
             "--resize-long", "48", "80", "--num-workers", "0", "--device", "cpu", "--log-every", "1"]
    assert main(["train", "cam", *train, "--max-steps", "4", "--out", "runs/cam"]) == 0
    err = capsys.readouterr().err
    assert "using all its 14 images" in err  # no split file: every image, and it says so
    assert main(["train", "clims", *train, "--max-steps", "2", "--init", "runs/cam/camnet.safetensors",
                 "--clip", "clip.safetensors", "--out", "runs/clims"]) == 0
    model = user / "runs" / "clims" / "camnet.safetensors"
    assert json.loads(model.with_suffix(".json").read_text())["classes"] == (user / "classes.txt").read_text().split()
    assert main(["cam", "--checkpoint", str(model), "--data", "folder:photos", "--out", "cams", "--scales", "1.0",
                 "--workers", "0", "--device", "cpu"]) == 0
    assert len(list((user / "cams").glob("*.npz"))) == 14
    assert main(["pseudo", "--cams", "cams", "--data", "folder:photos", "--crf", "--workers", "1",
                 "--out", "pseudo"]) == 0
    assert len(list((user / "pseudo").glob("*.png"))) == 14
    assert main(["eval", "--pred", "pseudo", "--gt", "gt", "--dataset", "classes.txt", "--json", "miou.json"]) == 0
    assert 0.0 <= json.loads((user / "miou.json").read_text())["miou"] <= 1.0
    assert main(["label", "--model", str(model), "--images", "folder:photos", "--out", "labelled", "--workers", "0",
                 "--post-workers", "0", "--device", "cpu", "--rle"]) == 0
    manifest = [json.loads(line) for line in (user / "labelled" / "manifest.jsonl").read_text().splitlines()]
    given = {r.split(",")[0][:-4]: r.split(",")[1].split(";")
             for r in (user / "photos" / "labels.csv").read_text().splitlines()[1:]}
    assert {m["id"]: m["labels"] for m in manifest} == {i: sorted(v, key=VOC_CLASSES.index) for i, v in given.items()}
    assert main(["export", "onnx", "--model", "camnet", "--checkpoint", str(model), "--out", "cam.onnx",
                 "--size", "64"]) == 0
    assert main(["export", "check", "--onnx", "cam.onnx", "--images", "photos", "--limit", "4", "--random", "1"]) == 0
    # every output is readable by the group and others under umask 022 (the umask's mode, not mkstemp's 0600)
    for path in [model, user / "runs" / "cam" / "camnet.safetensors", user / "cam.onnx", user / "miou.json",
                 next((user / "cams").glob("*.npz")), next((user / "pseudo").glob("*.png")),
                 next((user / "labelled").glob("*.png")), user / "labelled" / "annotations.json"]:
        assert _mode(path) == 0o666 & ~umask, (path, oct(_mode(path)))

    proc, url = start_cli_server("--model", str(model))
    try:
        photo = sorted((user / "photos").glob("*.jpg"))[0]
        r = httpx.post(f"{url}/v1/label?labels={given[photo.stem][0]}&format=rle", content=photo.read_bytes(),
                       headers={"Content-Type": "image/jpeg"}, timeout=60)
        assert r.status_code == 200 and r.json()["labels"] == [given[photo.stem][0]], r.text
        assert (r.json()["height"], r.json()["width"]) == (SIZE[1], SIZE[0])
    finally:
        proc.terminate()
        proc.wait(30)
