"""Fixtures of the serving tests: a tiny random CAM network and small real images of mixed sizes."""

import json
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def cam_ckpt(voc_camnet) -> Path:
    """A tiny random CAM network over the 20 VOC classes (the session's `voc_camnet`)."""
    return voc_camnet


@pytest.fixture(scope="session")
def small_folder(tmp_path_factory, voc14) -> Path:
    """8 real VOC images downscaled to three sizes (JPEG and PNG); labels (VOC indices) in <folder>_labels.json beside it."""
    from PIL import Image

    root = tmp_path_factory.mktemp("small_images")
    labels = json.loads((voc14 / "labels.json").read_text())
    ids = sorted(labels)[:8]
    sizes = [(72, 96), (72, 96), (64, 64), (72, 96), (50, 70), (64, 64), (72, 96), (64, 64)]
    out = {}
    for n, (i, (h, w)) in enumerate(zip(ids, sizes)):
        im = Image.open(voc14 / "JPEGImages" / f"{i}.jpg").convert("RGB").resize((w, h), Image.BILINEAR)
        name = f"img{n}.png" if n % 3 == 2 else f"img{n}.jpg"
        im.save(root / name, quality=90) if name.endswith(".jpg") else im.save(root / name)
        out[Path(name).stem] = labels[i]
    (root.parent / f"{root.name}_labels.json").write_text(json.dumps(out))  # outside: not a folder-dataset file
    return root


def read_rgb(path) -> np.ndarray:
    from wsclip.io import read_image

    return read_image(path)


@pytest.fixture(scope="session")
def labelled_synth(tmp_path_factory) -> dict:
    """A real `wsclip label` folder: 8 synthetic-world val scenes, a tiny random CAM net, CRF, --cams, --gt."""
    import torch
    from review_helpers import label_args

    from wsclip.cli import main
    from wsclip.data.synth import SYNTH_CLASSES, write_voc_layout
    from wsclip.models.camnet import build_camnet, save_camnet

    root = tmp_path_factory.mktemp("review")
    world = write_voc_layout(root / "world", n_train=1, n_val=8, seed=3)
    torch.manual_seed(0)
    ckpt = root / "camnet.safetensors"
    save_camnet(ckpt, build_camnet("tiny", len(SYNTH_CLASSES)), SYNTH_CLASSES)
    out = root / "labelled"
    assert main(label_args(world, ckpt, out)) == 0
    return {"world": world, "ckpt": ckpt, "out": out}
