"""One predictor per method: the same checkpoint gives the same CAMs and masks through `wsclip cam` +
`wsclip pseudo`, `wsclip label`, the HTTP server and the ONNX Runtime backend (the 14 VOC images, downscaled)."""

import json

import httpx
import numpy as np
import pytest
import torch

from job_helpers import tiny_vit_clip
from wsclip.cli import main
from wsclip.formats import read_cam_file
from wsclip.io import read_image, read_mask
from wsclip.vocab import VOC_CLASSES

SCALES = "1.0,0.5"


@pytest.fixture(scope="module")
def voc_small(tmp_path_factory, voc14):
    """The 14 VOC images at a quarter of their size (odd sizes kept), VOC layout: CPU-sized for a ResNet-18."""
    from PIL import Image

    root = tmp_path_factory.mktemp("voc14_small")
    (root / "JPEGImages").mkdir()
    for p in sorted((voc14 / "JPEGImages").glob("*.jpg")):
        with Image.open(p) as im:
            im.convert("RGB").resize((im.width // 4 + 1, im.height // 4), Image.BILINEAR).save(
                root / "JPEGImages" / p.name, quality=95)
    for name in ("labels.json", "val.txt"):
        (root / name).write_bytes((voc14 / name).read_bytes())
    return root


def _near_tie(cams: np.ndarray, bg, tol: float = 2e-3) -> np.ndarray:
    """Pixels whose label a float16 rounding of the maps could change: top map near the background
    score, or the two top maps near each other."""
    if not len(cams):
        return np.zeros(np.shape(bg), bool)
    s = np.sort(cams, axis=0)
    near = np.abs(s[-1] - bg) <= tol
    return near | (np.abs(s[-1] - s[-2]) <= tol) if len(cams) > 1 else near


def _same_masks(a: np.ndarray, b: np.ndarray, cams: np.ndarray, bg) -> None:
    """Equal masks, except at pixels where float16 CAM files may decide a near tie the other way."""
    diff = a != b
    assert not (diff & ~_near_tie(cams, bg)).any(), f"{int(diff.sum())} pixels differ away from ties"
    assert diff.mean() < 1e-3


def _server_masks(cfg, voc14, ids, labels):
    from wsclip.serve.labelers import load_labeler
    from wsclip.serve.server import BackgroundServer, ServeConfig, create_app

    scfg = ServeConfig(port=0, max_pixels=600 * 600, warmup_hw=(32, 32), max_batch_size=1)
    srv = BackgroundServer(create_app(load_labeler(cfg), scfg), scfg)
    out = {}
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            for i in ids:
                r = c.post("/v1/label", files={"image": ("x.jpg", (voc14 / "JPEGImages" / f"{i}.jpg").read_bytes(),
                                                         "image/jpeg")},
                           data={"labels": ",".join(VOC_CLASSES[k - 1] for k in labels[i])})
                assert r.status_code == 200, r.text
                out[i] = read_mask_bytes(r.content)
    finally:
        srv.stop()
    return out


def read_mask_bytes(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def test_cam_net_same_cams_and_masks_everywhere(voc_small, tmp_path):
    voc14 = voc_small
    from wsclip.models.camnet import build_camnet, save_camnet
    from wsclip.serve.labelers import LabelerConfig, load_labeler

    torch.manual_seed(0)
    ckpt = tmp_path / "resnet18.safetensors"
    save_camnet(ckpt, build_camnet("resnet18", 20), VOC_CLASSES)
    ids = (voc14 / "val.txt").read_text().split()
    labels = json.loads((voc14 / "labels.json").read_text())
    common = ["--split", "val", "--device", "cpu"]
    # 1. wsclip cam + wsclip pseudo (the constant background threshold of the CAM labelers)
    assert main(["cam", "--checkpoint", str(ckpt), "--data", str(voc14), "--out", str(tmp_path / "cams"),
                 "--scales", SCALES, "--workers", "0", *common]) == 0
    assert main(["pseudo", "--cams", str(tmp_path / "cams"), "--out", str(tmp_path / "pseudo"),
                 "--bg", "threshold", "--bg-threshold", "0.15"]) == 0
    # 2. wsclip label with the same scales and flips, writing its CAM files too (eager: `--backend auto` may
    # pick a faster variant, channels-last or bf16, that matches eager only to the autobackend's tolerance)
    assert main(["label", "--images", f"voc:{voc14}", "--model", str(ckpt), "--out", str(tmp_path / "label"),
                 "--scales", SCALES, "--flip", "--batch-size", "1", "--workers", "0", "--cams", "--backend", "eager",
                 *common]) == 0
    # 3. the ONNX Runtime backend of the same labeler
    onnx = tmp_path / "cam.onnx"
    assert main(["export", "onnx", "--model", "camnet", "--checkpoint", str(ckpt), "--out", str(onnx),
                 "--scales", SCALES, "--flip", "--batch", "1", "--size", "64"]) == 0
    ort = load_labeler(LabelerConfig(model=str(onnx), device="cpu", batch_size=1))
    # 4. the HTTP server
    cfg = LabelerConfig(model=str(ckpt), device="cpu", batch_size=1, scales=(1.0, 0.5), flip=True, backend="eager")
    served = _server_masks(cfg, voc14, ids, labels)
    for i in ids:
        cam = read_cam_file(tmp_path / "cams" / f"{i}.npz")
        lab = read_cam_file(tmp_path / "label" / "cams" / f"{i}.npz")
        for key in ("keys", "cam", "high_res"):  # the same predictor: the same numbers
            np.testing.assert_array_equal(cam[key], lab[key], err_msg=f"{i} {key}")
        label_mask = read_mask(tmp_path / "label" / f"{i}.png")
        high = cam["high_res"].astype(np.float32)
        _same_masks(read_mask(tmp_path / "pseudo" / f"{i}.png"), label_mask, high, 0.15)
        assert np.array_equal(served[i], label_mask), i
        y = np.zeros(20, np.float32)
        y[[k - 1 for k in labels[i]]] = 1
        (r,) = ort.label_batch([read_image(voc14 / "JPEGImages" / f"{i}.jpg")], [y], want_cams=True)
        np.testing.assert_allclose(r.cams, high, atol=2e-3)
        _same_masks(r.mask, label_mask, high, 0.15)


def test_clip_es_same_cams_and_masks_everywhere(voc_small, tmp_path):
    voc14 = voc_small
    from wsclip.serve.labelers import LabelerConfig

    clip = tiny_vit_clip(tmp_path / "clip.safetensors")
    ids = (voc14 / "val.txt").read_text().split()[:6]
    labels = json.loads((voc14 / "labels.json").read_text())
    voc6 = tmp_path / "voc6"
    voc6.mkdir()
    for sub in ("JPEGImages", "labels.json"):
        (voc6 / sub).symlink_to(voc14 / sub)
    (voc6 / "val.txt").write_text("\n".join(ids) + "\n")
    common = ["--split", "val", "--device", "cpu"]
    assert main(["cam", "--method", "clip-es", "--clip", str(clip), "--data", str(voc6), "--batch-size", "1",
                 "--out", str(tmp_path / "cams"), "--workers", "0", *common]) == 0
    assert main(["pseudo", "--cams", str(tmp_path / "cams"), "--out", str(tmp_path / "pseudo")]) == 0
    assert main(["label", "--images", f"voc:{voc6}", "--method", "clip-es", "--clip", str(clip),
                 "--out", str(tmp_path / "label"), "--batch-size", "1", "--workers", "0", "--cams", *common]) == 0
    served = _server_masks(LabelerConfig(method="clip-es", clip=str(clip), device="cpu", batch_size=1),
                           voc14, ids, labels)
    for i in ids:
        cam = read_cam_file(tmp_path / "cams" / f"{i}.npz")
        lab = read_cam_file(tmp_path / "label" / "cams" / f"{i}.npz")
        np.testing.assert_array_equal(cam["keys"], lab["keys"])
        np.testing.assert_allclose(cam["high_res"].astype(np.float32), lab["high_res"].astype(np.float32), atol=2e-3)
        high = cam["high_res"].astype(np.float32)
        label_mask = read_mask(tmp_path / "label" / f"{i}.png")
        bg = 1.0 - high.max(0) if len(high) else np.ones(label_mask.shape, np.float32)
        _same_masks(read_mask(tmp_path / "pseudo" / f"{i}.png"), label_mask, high, bg)
        assert np.array_equal(served[i], label_mask), i
