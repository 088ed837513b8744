"""load_clip / save_clip: every supported file format round-trips a tiny random open_clip model exactly;
wrong files fail with clear WsclipErrors; precision, text cache, gradients and preprocessing behave."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, convert_to_custom_text_state_dict, convert_weights_to_lp

from wsclip.errors import CheckpointError, MissingFileError, ShapeError, WsclipError
from wsclip.models.clip import CLIP_MEAN, CLIP_STD, ClipModel, load_clip, save_clip

TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 2}
# inferable from shapes: 64-wide heads (vision width 128 -> 2 heads; text width 32 -> 1 head)
VIT_CFG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8}, "text_cfg": TEXT}
# not inferable (16-wide vision heads, 2 text heads, layer scale, QuickGELU): needs its sidecar
SIDE_CFG = {"embed_dim": 24, "quick_gelu": True,
            "vision_cfg": {"image_size": 24, "layers": 2, "width": 64, "patch_size": 8, "head_width": 16, "ls_init_value": 0.1},
            "text_cfg": {**TEXT, "heads": 2}}
RN_CFG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None}, "text_cfg": TEXT}
PROMPTS = ["a photo of cat.", "a clean origami dog.", ""]


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    model = CLIP(**cfg).eval()
    with torch.no_grad():  # random non-trivial LayerNorm / embedding values so a wrong load cannot match
        for name, p in model.named_parameters():
            if p.dim() == 1 and "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _assert_same(clip: ClipModel, ref: torch.nn.Module, size: int):
    ref_sd, got_sd = ref.state_dict(), clip.model.state_dict()
    assert set(ref_sd) == set(got_sd)
    for k, v in ref_sd.items():
        assert torch.equal(v.float(), got_sd[k].float()), k
    x = torch.randn(3, 3, size, size)
    tokens = clip.tokenize(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(x, normalize=False), ref.encode_image(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(clip.encode_text(PROMPTS, normalize=False), ref.encode_text(tokens), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def vit_model():
    return _model(VIT_CFG)


@pytest.fixture(scope="module")
def openai_model():
    """OpenAI-style: QuickGELU, conv/linear weights in fp16, LayerNorms and embeddings in fp32."""
    model = _model({**VIT_CFG, "quick_gelu": True}, seed=1)
    convert_weights_to_lp(model, dtype=torch.float16)
    return model


@pytest.fixture(scope="module")
def vit_file(vit_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "m.pt"
    torch.save(vit_model.state_dict(), path)
    return path


def _openai_sd(model):
    sd = dict(model.state_dict())
    sd.update(input_resolution=torch.tensor(32), context_length=torch.tensor(16), vocab_size=torch.tensor(49408))
    return sd


# ----------------------------------------------------------------------------- formats
@pytest.mark.parametrize("fmt", ["pt", "bin-wrapped", "safetensors", "pth-custom-text"])
def test_open_clip_state_dict_formats_round_trip(tmp_path, vit_model, fmt):
    sd = vit_model.state_dict()
    if fmt == "pt":
        path = tmp_path / "model.pt"
        torch.save(sd, path)
    elif fmt == "bin-wrapped":  # open_clip training checkpoint, saved under DDP
        path = tmp_path / "epoch_3.bin"
        torch.save({"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:  # CustomTextCLIP key layout (text tower under "text.")
        path = tmp_path / "model.pth"
        torch.save(convert_to_custom_text_state_dict(dict(sd)), path)
    clip = load_clip(path)
    assert clip.name.startswith("custom-ViT")
    assert (clip.image_size, clip.patch_size, clip.embed_dim, clip.context_length) == (32, 8, 32, 16)
    assert clip.model.visual.transformer.resblocks[0].attn.num_heads == 2
    assert clip.mean == CLIP_MEAN and clip.std == CLIP_STD
    assert not clip.model.training and not any(p.requires_grad for p in clip.model.parameters())
    _assert_same(clip, vit_model, 32)


def test_openai_plain_state_dict(tmp_path, openai_model):
    path = tmp_path / "ViT-tiny.pt"
    torch.save(_openai_sd(openai_model), path)
    clip = load_clip(path)
    assert clip.model_cfg["quick_gelu"] is True  # OpenAI weights were trained with QuickGELU
    _assert_same(clip, openai_model.float(), 32)
    # the same weights forced to nn.GELU give different features: the activation really matters
    gelu = load_clip(path, quick_gelu=False)
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(gelu.encode_image(x), clip.encode_image(x), atol=1e-4)


def test_fp32_copy_of_openai_weights_is_ambiguous_and_said_so(tmp_path):
    """An fp32 state dict cannot tell QuickGELU from GELU: the choice follows --compat, is stated by --clip-act
    or a sidecar, and is reported (warning + clip.act_source) whenever the file alone decided nothing."""
    import json

    openai_model = _model({**VIT_CFG, "quick_gelu": True}, seed=1)  # built here: other tests cast the fixture
    convert_weights_to_lp(openai_model, dtype=torch.float16)
    ref = _model({**VIT_CFG, "quick_gelu": True}, seed=1)
    ref.load_state_dict({k: v.float() for k, v in openai_model.state_dict().items()})
    path = tmp_path / "openai-fp32.pt"
    torch.save({k: v.float() for k, v in openai_model.state_dict().items()}, path)  # no OpenAI markers left
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match="cannot say whether.*using gelu"):
        plain = load_clip(path)
    assert (plain.act, plain.act_source) == ("gelu", "ambiguous")
    with pytest.warns(UserWarning, match="using quick_gelu"):
        official = load_clip(path, compat="official")  # the public code's `clip` package always builds QuickGELU
    assert official.act == "quick_gelu"
    _assert_same(official, ref, 32)
    assert not torch.allclose(plain.encode_image(x), official.encode_image(x), atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a stated activation is no guess: no warning
        stated = load_clip(path, act="quick_gelu")
        assert (stated.act, stated.act_source) == ("quick_gelu", "--clip-act")
        _assert_same(stated, ref, 32)
        assert load_clip(path, act="gelu", compat="official").act == "gelu"  # the user's word wins
        path.with_suffix(".json").write_text(json.dumps({"kind": "clip", "act": "quick_gelu"}))
        side = load_clip(path)
        assert side.act == "quick_gelu" and side.act_source.startswith("sidecar")
        _assert_same(side, ref, 32)
        # the fp16 release layout and TorchScript archives are OpenAI's own: QuickGELU, no warning
        torch.save(openai_model.state_dict(), tmp_path / "fp16.pt")
        assert load_clip(tmp_path / "fp16.pt").act == "quick_gelu"
    with pytest.raises(WsclipError, match="activation"):
        load_clip(path, act="relu")


def test_openai_torchscript_archive(tmp_path, openai_model):
    import copy

    scripted_src = copy.deepcopy(openai_model)
    scripted_src.register_buffer("input_resolution", torch.tensor(32))  # as in OpenAI's archives
    path = tmp_path / "ViT-tiny-jit.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(scripted_src), str(path))
    from wsclip.models.clip_files import sniff_format

    assert sniff_format(path) == "torchscript"
    clip = load_clip(path)
    assert clip.model_cfg["quick_gelu"] is True
    _assert_same(clip, openai_model.float(), 32)


def test_save_clip_sidecar_round_trip(tmp_path):
    model = _model(SIDE_CFG, seed=2)
    path = tmp_path / "tiny_clip.safetensors"
    save_clip(path, model, SIDE_CFG, "tiny-clip", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    meta = __import__("json").loads(path.with_suffix(".json").read_text())
    assert meta["kind"] == "clip" and meta["model_cfg"] == SIDE_CFG
    clip = load_clip(path)
    assert clip.name == "tiny-clip" and clip.mean == (0.5, 0.5, 0.5) and clip.std == (0.25, 0.25, 0.25)
    assert clip.model.visual.transformer.resblocks[0].attn.num_heads == 4
    assert clip.model.transformer.resblocks[0].attn.num_heads == 2
    _assert_same(clip, model, 24)
    assert load_clip(path.with_suffix(".json")).name == "tiny-clip"  # the sidecar path works too
    # the same weights read with inference alone would get the head layout wrong: the sidecar is what fixes it
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    bare = load_clip(tmp_path / "bare.pt", quick_gelu=True)
    assert bare.model.visual.transformer.resblocks[0].attn.num_heads == 1


def test_hf_folder_layout(tmp_path):
    from safetensors.torch import save_file

    from wsclip.io import atomic_write_json

    model = _model(SIDE_CFG, seed=3)
    folder = tmp_path / "tiny-hf"
    folder.mkdir()
    save_file(dict(model.state_dict()), str(folder / "open_clip_model.safetensors"))
    atomic_write_json(folder / "open_clip_config.json", {"model_cfg": SIDE_CFG, "preprocess_cfg": {"mean": [0.1, 0.2, 0.3], "std": [1, 1, 1]}})
    for target in (folder, folder / "open_clip_model.safetensors"):
        clip = load_clip(target)
        assert clip.name == "tiny-hf" and clip.mean == (0.1, 0.2, 0.3)
        _assert_same(clip, model, 24)


def test_resnet_clip_round_trip(tmp_path):
    model = _model(RN_CFG, seed=4)
    path = tmp_path / "rn.bin"
    torch.save(model.state_dict(), path)
    clip = load_clip(path)
    assert clip.patch_size is None and clip.image_size == 32 and not clip.is_vit
    _assert_same(clip, model, 32)
    with pytest.raises(CheckpointError, match="not a ViT"):
        clip.vit_forward(torch.zeros(1, 3, 32, 32))


def test_arch_override_and_registry_inference():
    """Shapes alone identify registry architectures, including heads that are not 64 wide (ViT-H-14)."""
    from wsclip.models.clip_files import build_model, infer_model_cfg, match_registry
    import open_clip

    for name in ("ViT-B-32", "RN50", "ViT-H-14"):
        sd = build_model(open_clip.get_model_config(name), device="meta").state_dict()
        cfg = infer_model_cfg(sd)
        found = match_registry(cfg, sd)
        assert found is not None and found[0] == name
    assert match_registry(VIT_CFG, _model(VIT_CFG).state_dict()) is None


def test_arch_given(vit_file, vit_model):
    path = vit_file
    clip = load_clip(path, arch=VIT_CFG)
    _assert_same(clip, vit_model, 32)
    with pytest.raises(CheckpointError) as err:
        load_clip(path, arch="ViT-B-32")
    msg = str(err.value)
    assert "ViT width 128" in msg and "ViT width 768" in msg and "arch='ViT-B-32'" in msg
    with pytest.raises(WsclipError, match="unknown arch"):
        load_clip(path, arch="ViT-Q-99")


# ----------------------------------------------------------------------------- errors
def test_wrong_files_give_clear_errors(tmp_path, voc14):
    missing = tmp_path / "nope" / "clip.pt"
    with pytest.raises(MissingFileError, match="nope"):
        load_clip(missing)
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match="not a model checkpoint.*text"):
        load_clip(text)
    jpeg = tmp_path / "photo.pt"
    shutil.copy(next((voc14 / "JPEGImages").glob("*.jpg")), jpeg)
    with pytest.raises(CheckpointError, match="JPEG"):
        load_clip(jpeg)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_clip(empty)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_files(tmp_path, vit_model, suffix):
    from safetensors.torch import save_file

    full = tmp_path / f"full{suffix}"
    if suffix == ".pt":
        torch.save(vit_model.state_dict(), full)
    else:
        save_file(dict(vit_model.state_dict()), str(full))
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_clip(cut)


def test_non_clip_state_dict(tmp_path):
    sd = {"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(2, 4), "fc.bias": torch.zeros(2)}
    path = tmp_path / "resnet.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="not a CLIP checkpoint.*token_embedding.weight.*conv1.weight"):
        load_clip(path)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_clip(tmp_path / "list.pt")


def test_pickled_objects_refused(tmp_path, vit_model):
    import argparse

    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": vit_model.state_dict(), "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(CheckpointError, match="re-save"):
        load_clip(path)


def test_sidecar_of_another_kind(tmp_path, vit_model):
    from wsclip.io import save_checkpoint

    path = tmp_path / "camnet.safetensors"
    save_checkpoint(path, vit_model.state_dict(), {"kind": "camnet", "backbone": "resnet50"})
    with pytest.raises(CheckpointError, match="'camnet' checkpoint"):
        load_clip(path)


def test_names_never_download_silently():
    with pytest.raises(MissingFileError, match="name a tag"):
        load_clip("ViT-B-32")
    with pytest.raises(CheckpointError, match="Known tags for ViT-B-32"):
        load_clip("ViT-B-32:no-such-tag")
    with pytest.raises(WsclipError, match="precision"):
        load_clip("ViT-B-32", precision="fp8")


# ----------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("precision,atol", [("fp16", 2e-2), ("bf16", 8e-2)])
def test_low_precision(vit_file, precision, atol):
    path = vit_file
    ref = load_clip(path)
    low = load_clip(path, precision=precision)
    assert low.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    assert low.model.visual.conv1.weight.dtype == low.dtype
    x = torch.randn(2, 3, 32, 32)
    out = low.encode_image(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref.encode_image(x), rtol=0, atol=atol)
    torch.testing.assert_close(low.encode_text(PROMPTS), ref.encode_text(PROMPTS), rtol=0, atol=atol)


def test_text_cache_avoids_re_encoding(vit_file, vit_model):
    clip = load_clip(vit_file)
    rows = []
    clip.model.token_embedding.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0]))
    a = clip.encode_text(["cat", "dog"])
    assert rows == [2]
    b = clip.encode_text(["dog", "cat", "bird", "cat"])
    assert rows == [2, 1]  # only "bird" was new
    torch.testing.assert_close(b[:2], a.flip(0))
    torch.testing.assert_close(b[3], a[0])
    raw = clip.encode_text(["bird"], normalize=False)
    assert rows == [2, 1]
    torch.testing.assert_close(F.normalize(raw, dim=-1), b[2:3])
    with torch.no_grad():
        direct = vit_model.encode_text(clip.tokenize(["bird"]))
    torch.testing.assert_close(raw, direct, rtol=0, atol=1e-6)
    assert set(clip.text_cache) == {(clip.identity, t) for t in ("cat", "dog", "bird")}
    b[:] = 0  # callers may scribble on results without corrupting the cache
    assert clip.encode_text(["cat"]).norm() > 0.99
    clip.clear_text_cache()
    clip.encode_text(["cat"])
    assert rows == [2, 1, 1] and not clip.encode_text([]).numel()
    assert clip.tokenize("one").shape == (1, 16) and clip.tokenize(["a", "b"]).dtype == torch.long


def test_gradients_reach_pixels_not_weights(vit_file):
    clip = load_clip(vit_file)
    pixels = torch.randn(2, 3, 32, 32, requires_grad=True)
    text = clip.encode_text(["a photo of cat."])
    (clip.encode_image(pixels) @ text.T).sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in clip.model.parameters())
    with pytest.raises(ShapeError, match="32x32"):
        clip.encode_image(torch.zeros(1, 3, 24, 24))


def test_preprocess_tensor(vit_file, voc14):
    from wsclip.io import read_image

    clip = load_clip(vit_file)
    img = read_image(next((voc14 / "JPEGImages").glob("*.jpg")))  # (H, W, 3) uint8
    out = clip.preprocess_tensor(img)
    assert out.shape == (1, 3, 32, 32) and out.dtype == torch.float32
    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
    ref = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    ref = (ref - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(clip.preprocess_tensor(x[0]), out)  # float CHW in [0, 1] gives the same
    odd = clip.preprocess_tensor(np.zeros((2, 7, 5, 3), np.uint8), size=(24, 40))
    assert odd.shape == (2, 3, 24, 40)
    torch.testing.assert_close(odd[0, :, 0, 0], -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD))
