"""The bad-input zoo (tests/zoo.py) through every job that reads image files, via the CLI: each awkward
file is labelled correctly or skipped into errors.json with a one-line reason; the run completes."""

import json

import numpy as np
import pytest
import torch
from zoo import check_outputs, read_errors

from wsclip.cli import main
from wsclip.io import read_mask

CPU = ["--device", "cpu"]


def _written(out, suffix=".png"):
    return {p.stem for p in out.glob(f"*{suffix}")}


@pytest.fixture(scope="module")
def cams(bad_image_zoo, voc_camnet, tmp_path_factory):
    """`wsclip cam` on the zoo with a VOC model (the labels file's 'cat' maps onto the model's classes)."""
    out = tmp_path_factory.mktemp("zoo_cams")
    assert main(["cam", "--checkpoint", str(voc_camnet), "--data", f"folder:{bad_image_zoo}", "--out", str(out),
                 "--scales", "1.0", "--workers", "0", *CPU]) == 0
    return out


def test_cam_skips_bad_images_into_errors_json(cams):
    from wsclip.label.clims_cam import read_cam_file

    shapes = {p.stem: read_cam_file(p)["high_res"].shape[1:] for p in cams.glob("*.npz")}
    check_outputs(cams, _written(cams, ".npz"), read_errors(cams), shapes)
    assert all(read_cam_file(p)["keys"].tolist() == [7] for p in cams.glob("*.npz"))  # 'cat' is VOC class 8


def test_pseudo_crf_skips_bad_images(cams, bad_image_zoo, tmp_path):
    out = tmp_path / "pseudo"
    assert main(["pseudo", "--cams", str(cams), "--data", f"folder:{bad_image_zoo}", "--crf", "--workers", "1",
                 "--out", str(out), *CPU]) == 0
    errors = read_errors(out)
    check_outputs(out, _written(out), errors, {i: read_mask(out / f"{i}.png").shape for i in _written(out)})
    assert "wsclip cam" in errors["truncated"]  # carried over from the CAM job, with its reason


def test_label_skips_bad_images(bad_image_zoo, voc_camnet, tmp_path):
    out = tmp_path / "label"
    assert main(["label", "--model", str(voc_camnet), "--images", f"folder:{bad_image_zoo}", "--out", str(out),
                 "--workers", "0", "--post-workers", "0", "--rle", *CPU]) == 0
    written = {p.stem for p in out.glob("*.png")}
    check_outputs(out, written, read_errors(out), {i: read_mask(out / f"{i}.png").shape for i in written})
    rgba = read_mask(out / "rgba.png")  # fully transparent pixels: alpha dropped, the colours labelled
    assert rgba.shape == (40, 56)
    ann = json.loads((out / "annotations.json").read_text())
    assert {im["file_name"] for im in ann["images"]} >= {"rgba.png", "exif_rotated.jpg", "png_named.jpg"}


def test_segment_skips_bad_images(bad_image_zoo, tmp_path):
    from wsclip.models.seg import build_seg_model, save_seg_model

    torch.manual_seed(0)
    ckpt = tmp_path / "seg.safetensors"
    save_seg_model(ckpt, build_seg_model("deeplabv2", "tiny", 4, rates=(1, 2)).eval(), ["cat", "dog", "cow"])
    out = tmp_path / "seg"
    assert main(["segment", "--checkpoint", str(ckpt), "--images", f"folder:{bad_image_zoo}", "--out", str(out),
                 "--scales", "1.0", "--no-flip", "--workers", "0", *CPU]) == 0
    written = _written(out)
    check_outputs(out, written, read_errors(out), {i: read_mask(out / f"{i}.png").shape for i in written})
    assert np.isin(read_mask(out / "one_pixel.png"), [0, 1, 2, 3]).all()


def test_clip_es_cam_skips_bad_images(bad_image_zoo, tmp_path):
    import open_clip

    from wsclip.label.clims_cam import read_cam_file
    from wsclip.models.clip import save_clip

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    torch.manual_seed(0)
    save_clip(tmp_path / "clip.safetensors", open_clip.CLIP(**cfg), cfg, name="tiny-test")
    out = tmp_path / "es"
    assert main(["cam", "--method", "clip-es", "--clip", str(tmp_path / "clip.safetensors"), "--data",
                 f"folder:{bad_image_zoo}", "--out", str(out), "--workers", "0", "--batch-size", "2", *CPU]) == 0
    shapes = {p.stem: read_cam_file(p)["high_res"].shape[1:] for p in out.glob("*.npz")}
    check_outputs(out, _written(out, ".npz"), read_errors(out), shapes)


def test_only_plain_jpegs_go_to_the_gpu_decoder(bad_image_zoo):
    """`wsclip label --decode gpu` (nvJPEG, which ignores EXIF and CMYK) gets a file's bytes only when
    they are a plain JPEG; everything else is decoded by open_image on the CPU (checked here, no GPU)."""
    from wsclip.io import plain_jpeg

    plain = {n for n in ("good1.jpg", "grey.jpg", "cmyk.jpg", "exif_rotated.jpg", "png_named.jpg", "huge_jpeg.jpg",
                         "truncated.jpg") if plain_jpeg((bad_image_zoo / n).read_bytes())}
    assert {"good1.jpg", "grey.jpg"} <= plain and not plain & {"cmyk.jpg", "exif_rotated.jpg", "png_named.jpg",
                                                              "huge_jpeg.jpg"}
