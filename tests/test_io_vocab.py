import json

import numpy as np
import pytest
import torch

from wsclip import io, vocab
from wsclip.errors import BadFileError, CheckpointError, MissingFileError, UnknownClassError


def test_vocab_sizes_and_text():
    assert len(vocab.VOC_CLASSES) == 20 and len(vocab.COCO_CLASSES) == 80
    assert len(vocab.CLIMS_VOC_BACKGROUND) == 10 and len(vocab.CLIMS_COCO_BACKGROUND) == 88
    assert len(vocab.CLIP_ES_VOC_BACKGROUND) == 25 and len(vocab.CLIP_ES_COCO_BACKGROUND) == 23
    assert "sknowboard" not in vocab.CLIP_ES_COCO_NAMES and "snowboard" in vocab.CLIP_ES_COCO_NAMES
    assert vocab.CLIMS_VOC_NAMES[vocab.VOC_CLASSES.index("person")] == "player"
    p = vocab.build_prompts("voc", "clip-es")
    assert p["foreground"][2] == "a clean origami bird avian."
    assert len(p["background"]) == 25
    custom = vocab.build_prompts("mine", "clims", classes=["widget"])
    assert custom["foreground"] == ["a photo of widget."]


def test_vocab_errors():
    with pytest.raises(UnknownClassError, match="Did you mean 'cat'"):
        vocab.class_index("cta", vocab.VOC_CLASSES)
    with pytest.raises(UnknownClassError, match="unknown dataset"):
        vocab.class_names("imagenet")
    with pytest.raises(ValueError):
        vocab.prompts(["a"], "no placeholder")


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    io.atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp file left


def test_mask_png_roundtrip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    m = rng.integers(0, 21, size=(13, 7)).astype(np.uint8)
    m[0, 0] = 255
    io.write_mask(tmp_path / "m.png", m)
    np.testing.assert_array_equal(io.read_mask(tmp_path / "m.png"), m)
    assert io.encode_mask_png(m) == io.encode_mask_png(m.copy())  # deterministic bytes
    with pytest.raises(MissingFileError):
        io.read_image(tmp_path / "nope.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(BadFileError, match="bad.jpg"):
        io.read_image(tmp_path / "bad.jpg")
    with pytest.raises(BadFileError):
        io.decode_image_bytes(b"")


def test_checkpoint_roundtrip_and_errors(tmp_path):
    t = {"w": torch.randn(3, 4), "b": torch.arange(5)}
    io.save_checkpoint(tmp_path / "c.safetensors", t, {"kind": "camnet", "classes": ["a"]})
    got, meta = io.load_checkpoint(tmp_path / "c.safetensors", expect_kind="camnet")
    assert torch.equal(got["w"], t["w"]) and torch.equal(got["b"], t["b"])
    assert meta["classes"] == ["a"] and "wsclip_version" in meta
    with pytest.raises(CheckpointError, match="is a CAM network checkpoint, not a segmentation network checkpoint"):
        io.load_checkpoint(tmp_path / "c.safetensors", expect_kind="seg")
    (tmp_path / "c.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        io.load_checkpoint(tmp_path / "c.safetensors")
    with pytest.raises(MissingFileError):
        io.load_checkpoint(tmp_path / "missing.safetensors")
