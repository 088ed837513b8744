"""The tiny CLIP trainer: loss, positives, short training, resume, cache and load_clip round trip."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from wsclip.data.synth import generate_scene
from wsclip.train.tiny_clip import (
    TINY_CLIP_CFG,
    TinyClipConfig,
    build_batch,
    build_tiny_clip,
    content_of_text,
    describes,
    encode_images,
    encode_texts,
    ensure_tiny_clip,
    evaluate_tiny_clip,
    make_views,
    multi_positive_infonce,
    train_tiny_clip,
)

MICRO_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def micro(**kw) -> TinyClipConfig:
    base = dict(steps=8, batch_size=6, lr=2e-3, warmup=2, size=32, checkpoint_every=0, model_cfg=MICRO_CFG)
    return TinyClipConfig(**{**base, **kw})


def _batch_loss(model, x, texts, pos):
    with torch.no_grad():
        a, b = encode_images(model, x)
        t = encode_texts(model, texts)
        s = model.logit_scale.exp()
        return float(0.5 * (multi_positive_infonce(a, t, pos, s) + multi_positive_infonce(b, t, pos, s)))


def test_default_config_is_a_small_open_clip_vit():
    v, t = TINY_CLIP_CFG["vision_cfg"], TINY_CLIP_CFG["text_cfg"]
    assert v["image_size"] == 64 and v["patch_size"] == 8 and 128 <= v["width"] <= 192 and 4 <= v["layers"] <= 6
    assert t["width"] == 128 and t["layers"] == 4 and t["vocab_size"] == 49408
    assert TinyClipConfig().key() == TinyClipConfig().key() != TinyClipConfig(seed=1).key()
    assert TinyClipConfig(checkpoint_every=7).key() == TinyClipConfig().key()
    # a changed world (scene size) or recipe never reuses a cached model
    assert TinyClipConfig(size=64).key() != TinyClipConfig().key() != TinyClipConfig(logit_scale=None).key()


def test_text_contents_and_positives():
    assert content_of_text("a photo of a boat and a bird on water.") == (frozenset({0, 2}), 0)
    assert content_of_text("a clean origami train.") == (frozenset({1}), None)
    assert content_of_text("a picture of sky.") == (frozenset(), 2)
    full = (frozenset({0, 2}), 0)
    assert describes(content_of_text("a photo of a boat."), full)
    assert describes(content_of_text("a photo of a bird on water."), full)
    assert not describes(content_of_text("a photo of a boat on rails."), full)
    assert describes(content_of_text("a photo of water."), full)  # the scene shows water (CBS's signal)
    assert describes(content_of_text("a photo of water."), (frozenset(), 0))
    assert not describes(content_of_text("a photo of water."), (frozenset({0}), None))  # a masked boat shows none
    assert not describes(content_of_text("a photo of sky."), full)
    assert not describes(content_of_text("a photo of a cow."), full)
    assert not describes(content_of_text("a photo of a boat on water."), (frozenset({0}), None))


def test_multi_positive_infonce_reduces_to_clip_loss_for_one_to_one_pairs():
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(7, 16, generator=g), dim=-1)
    txt = F.normalize(torch.randn(7, 16, generator=g), dim=-1)
    logits = 20.0 * img @ txt.t()
    ref = 0.5 * (F.cross_entropy(logits, torch.arange(7)) + F.cross_entropy(logits.t(), torch.arange(7)))
    got = multi_positive_infonce(img, txt, torch.eye(7, dtype=torch.bool), 20.0)
    torch.testing.assert_close(got, ref)
    # two identical positive texts share a view's target: its i2t term bottoms out at ln 2, t2i at 0
    pos = torch.zeros(3, 4, dtype=torch.bool)
    pos[0, :2] = pos[1, 2] = pos[2, 3] = True
    e = torch.eye(4)
    img = torch.stack([F.normalize(e[0] + e[1], dim=0), e[2], e[3]])
    txt = torch.stack([F.normalize(e[0] + e[1], dim=0)] * 2 + [e[2], e[3]])
    assert abs(float(multi_positive_infonce(img, txt, pos, 100.0)) - 0.5 * np.log(2) / 3) < 1e-4


def test_views_and_batch():
    scenes = [generate_scene(0, "pretrain", i, 32) for i in range(5)]
    x, texts, contents = make_views(scenes, np.random.default_rng(0))
    assert x.shape == (20, 3, 32, 32) and len(texts) == len(contents) == 20
    # background views carry no pixels of the removed class: the text never names it
    for t, c in zip(texts, contents):
        assert describes(content_of_text(t), c), (t, c)
    x, texts, pos = build_batch(micro(), 3)
    assert pos.shape == (x.shape[0], len(texts)) and len(set(texts)) == len(texts)
    assert pos.any(1).all(), "every view has a matching text"
    x2, texts2, pos2 = build_batch(micro(), 3)
    assert torch.equal(x, x2) and texts == texts2 and torch.equal(pos, pos2)


def test_more_masked_views_add_one_masked_object_view_per_scene_and_keep_the_default_key():
    scenes = [generate_scene(0, "pretrain", i, 32) for i in range(5)]
    _, _, one = make_views(scenes, np.random.default_rng(0))
    x, texts, two = make_views(scenes, np.random.default_rng(0), masked_views=2)
    assert x.shape[0] == len(texts) == len(two) == 25
    masked = [c for c in two if c[1] is None and len(c[0]) == 1]  # a single class, no background: masked objects
    assert len(masked) >= len([c for c in one if c[1] is None and len(c[0]) == 1]) + 5
    for t, c in zip(texts, two):
        assert describes(content_of_text(t), c), (t, c)
    # the ViT's setting changes the cache key; the default leaves the keys of files cached before it alone
    assert micro(masked_views=2).key() != micro().key() == micro(masked_views=1).key()


def test_short_training_lowers_the_loss_and_resumes_identically(tmp_path):
    cfg = micro(checkpoint_every=3)
    torch.manual_seed(cfg.seed)
    init = build_tiny_clip(cfg.model_cfg)
    held_out = build_batch(cfg, 10_000)
    before = _batch_loss(init, *held_out)

    straight = tmp_path / "straight.safetensors"
    summary = train_tiny_clip(straight, cfg, eval_n=0)
    model = build_tiny_clip(cfg.model_cfg)
    model.load_state_dict(load_file(str(straight)))
    assert _batch_loss(model, *held_out) < before - 0.05
    assert summary["loss_last"] < summary["loss_first"]
    meta = json.loads(straight.with_suffix(".json").read_text())
    assert meta["kind"] == "clip" and meta["model_cfg"] == MICRO_CFG and meta["train_key"] == cfg.key()

    resumed = tmp_path / "resumed.safetensors"
    part = train_tiny_clip(resumed, cfg, eval_n=0, stop_after=5)
    assert part["stopped_at"] == 5 and not resumed.exists()
    assert (tmp_path / "resumed.safetensors.partial.pt").is_file()
    train_tiny_clip(resumed, cfg, eval_n=0)
    assert not (tmp_path / "resumed.safetensors.partial.pt").exists()
    a, b = load_file(str(straight)), load_file(str(resumed))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_cache_and_load_clip_round_trip(tmp_path):
    from wsclip.models.clip import load_clip

    cfg = micro(steps=3)
    path = ensure_tiny_clip(tmp_path, seed=0, cfg=cfg)
    stamp = path.stat().st_mtime_ns
    assert ensure_tiny_clip(tmp_path, seed=0, cfg=cfg) == path and path.stat().st_mtime_ns == stamp
    assert ensure_tiny_clip(tmp_path, seed=0, steps=4, cfg=cfg) != path

    model = build_tiny_clip(cfg.model_cfg).eval()
    model.load_state_dict(load_file(str(path)))
    clip = load_clip(path)
    assert clip.image_size == 32 and clip.patch_size == 8
    x = torch.randn(3, 3, 32, 32)
    texts = ["a photo of a boat.", "a photo of water."]
    with torch.no_grad():
        ref_img, _ = encode_images(model, x)
        ref_txt = encode_texts(model, texts)
    torch.testing.assert_close(clip.encode_image(x, normalize=True), ref_img, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(clip.encode_text(texts, normalize=True), ref_txt, rtol=1e-5, atol=1e-5)

    ev = evaluate_tiny_clip(model, n=6, size=32)
    assert ev["images"] == 6
    assert all(0.0 <= v <= 1.0 for k, v in ev.items() if k != "images" and not k.startswith("median_"))
    assert all(-1.0 <= ev[f"median_{k}"] <= 1.0 for k in ("s_fg", "s_bg", "s_full", "c_fg_bg", "c_full_bg"))


def test_resnet_variant_trains_and_loads_like_any_clip(tmp_path):
    from wsclip.errors import WsclipError
    from wsclip.models.clip import load_clip
    from wsclip.train.tiny_clip import TINY_CLIP_RN_CFG

    assert TinyClipConfig(arch="rn").model_cfg == TINY_CLIP_RN_CFG != TinyClipConfig().model_cfg
    assert TinyClipConfig(arch="rn").key() != TinyClipConfig().key()
    with pytest.raises(WsclipError, match="architecture"):
        TinyClipConfig(arch="vgg")
    rn = {**TINY_CLIP_RN_CFG, "embed_dim": 32, "vision_cfg": {**TINY_CLIP_RN_CFG["vision_cfg"], "image_size": 32,
                                                               "width": 8}}
    path = tmp_path / "rn.safetensors"
    summary = train_tiny_clip(path, micro(steps=2, model_cfg=rn, arch="rn"), eval_n=4)
    assert summary["eval"]["images"] == 4
    model = build_tiny_clip(rn).eval()
    model.load_state_dict(load_file(str(path)))
    clip = load_clip(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        cls_emb, pooled = encode_images(model, x)
    assert cls_emb is pooled  # no patch tokens in a ResNet tower
    torch.testing.assert_close(clip.encode_image(x, normalize=True), cls_emb, rtol=1e-5, atol=1e-5)


def test_cli_train_tiny_clip(tmp_path):
    from wsclip.cli import main
    from wsclip.errors import WsclipError

    out = tmp_path / "t.safetensors"
    assert main(["train", "tiny-clip", "--out", str(out), "--steps", "1", "--batch-size", "2", "--eval-n", "0"]) == 0
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert main(["train", "tiny-clip", "--out", str(tmp_path / "t.pt"), "--steps", "1"]) == 2
    with pytest.raises(WsclipError):
        train_tiny_clip(tmp_path / "x.safetensors", micro(steps=0))
