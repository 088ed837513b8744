"""constants / runtime / formats / registry / the background-argmax rule: each against a plain reference."""

import json

import numpy as np
import pytest
import torch

from wsclip.errors import BadFileError, CheckpointError, MissingFileError, WsclipError
from wsclip.formats import mask_annotations, read_cam_file, read_cams, rle_decode, rle_encode, write_cam_file
from wsclip.label.masks import background_argmax


def _reference_argmax(cams, bg, keys):
    """Stack [bg, cams] and take the channel argmax (first wins, so ties go to the background)."""
    bg_map = np.broadcast_to(np.asarray(bg, np.float32), cams.shape[1:])
    stacked = np.concatenate([bg_map[None], cams])
    lut = np.concatenate([[0], np.asarray(keys) + 1])
    return lut[stacked.argmax(0)]


@pytest.mark.parametrize("k,h,w", [(0, 5, 7), (1, 1, 1), (3, 9, 13), (5, 4, 31)])
def test_background_argmax_matches_stacked_argmax_numpy_and_torch(k, h, w):
    rng = np.random.default_rng(k * 100 + h)
    cams = rng.random((k, h, w)).astype(np.float32).round(1)  # rounding makes ties with the background
    keys = np.sort(rng.choice(20, size=k, replace=False))
    for bg in (0.5, rng.random((h, w)).astype(np.float32).round(1)):
        ref = _reference_argmax(cams, bg, keys)
        np.testing.assert_array_equal(background_argmax(cams, bg, keys), ref)
        got = background_argmax(torch.from_numpy(cams), torch.as_tensor(bg), torch.from_numpy(keys))
        np.testing.assert_array_equal(got.numpy(), ref)
    # batched torch, keys = 0..K-1
    batch = torch.from_numpy(np.stack([cams, cams[:, ::-1].copy()]))
    out = background_argmax(batch, 0.3)
    assert out.shape == (2, h, w)
    np.testing.assert_array_equal(out[1].numpy(), _reference_argmax(batch[1].numpy(), 0.3, np.arange(k)))


def test_rle_round_trip_and_coco_decoder():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 5), (33, 64)]:
        for p in (0.0, 0.3, 1.0):
            m = rng.random(shape) < p
            rle = rle_encode(m)
            assert rle["size"] == list(shape)
            np.testing.assert_array_equal(rle_decode(rle), m)
    # uncompressed run lists decode too; runs that miss the size are an error
    np.testing.assert_array_equal(rle_decode({"size": [2, 2], "counts": [1, 2, 1]}), [[False, True], [True, False]])
    with pytest.raises(BadFileError):
        rle_decode({"size": [2, 2], "counts": [1, 1]})
    mask = np.zeros((4, 6), np.uint8)
    mask[1:3, 2:5] = 7
    mask[0, 0] = 255
    (ann,) = mask_annotations(mask, [f"c{i}" for i in range(10)])
    assert ann["category_id"] == 7 and ann["area"] == 6 and ann["bbox"] == [2, 1, 3, 2]


def test_cam_file_round_trip(tmp_path):
    keys = np.array([3, 9])
    high = np.random.default_rng(1).random((2, 9, 11)).astype(np.float32)
    write_cam_file(tmp_path / "a.npz", keys, high[:, ::4, ::4], high, high_res_raw=high * 0.5)
    z = read_cam_file(tmp_path / "a.npz")
    assert z["keys"].dtype == np.int64 and z["high_res"].dtype == np.float16
    np.testing.assert_allclose(z["high_res"], high, atol=1e-3)
    assert set(z) == {"keys", "cam", "high_res", "high_res_raw"}
    np.testing.assert_allclose(read_cams(tmp_path / "a.npz", "high_res_raw")["cams"], high * 0.5, atol=1e-3)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(BadFileError, match="bad.npz"):
        read_cam_file(tmp_path / "bad.npz")
    with pytest.raises(MissingFileError):
        read_cam_file(tmp_path / "none.npz")


def test_runtime_device_selection(monkeypatch):
    from wsclip.runtime import precision_dtype, resolve_device

    monkeypatch.setenv("LOCAL_RANK", "1")
    dev = resolve_device("auto")
    assert dev == (torch.device("cuda", 1) if torch.cuda.is_available() else torch.device("cpu"))
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(WsclipError, match="--device cpu"):
            resolve_device("cuda")
    with pytest.raises(WsclipError, match="unknown device"):
        resolve_device("tpu-9")
    assert precision_dtype("bf16") is torch.bfloat16
    with pytest.raises(WsclipError):
        precision_dtype("fp7")


def test_constants_are_the_single_definition():
    from wsclip import constants
    from wsclip.data import transforms
    from wsclip.kernels import CLIP_MEAN
    from wsclip.models import clip, seg

    assert transforms.IMAGENET_MEAN is constants.IMAGENET_MEAN and seg.IMAGENET_STD is constants.IMAGENET_STD
    assert CLIP_MEAN is constants.CLIP_MEAN and clip.CLIP_STD is constants.CLIP_STD


def test_registry_detects_kinds_in_one_place(tmp_path):
    from wsclip.models.camnet import build_camnet
    from wsclip.registry import KINDS, detect_kind, get_kind, labeler_kind

    path = tmp_path / "cam.safetensors"
    get_kind("cam").save(path, build_camnet("tiny", 3), ["a", "b", "c"])
    assert detect_kind(path) == "camnet" and labeler_kind(path).method == "cam"
    net, meta = KINDS["camnet"].load(path)
    assert net.num_classes == 3 and meta["classes"] == ["a", "b", "c"]
    module = labeler_kind(path).predictor_module(path, scales=(1.0, 0.5))
    assert module.scales == (1.0, 0.5)
    side = path.with_suffix(".json")
    side.write_text(json.dumps({**json.loads(side.read_text()), "kind": "irn"}))
    with pytest.raises(CheckpointError, match="not a labeler"):
        labeler_kind(path)
    with pytest.raises(CheckpointError, match="unknown model kind"):
        get_kind("nope")
