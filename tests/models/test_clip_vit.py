"""vit_forward / interpolate_pos_embed (CLIP-ES access) against open_clip's own forward on fresh random inputs."""

from __future__ import annotations

import pytest
import torch
from open_clip.model import CLIP

from wsclip.errors import ShapeError
from wsclip.models.clip import ClipModel, interpolate_pos_embed
from wsclip.models.clip_vit import block_forward

TEXT = {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1}
VISION = {"image_size": 32, "layers": 3, "width": 48, "patch_size": 8, "head_width": 16, "ls_init_value": 0.5}
CFG = {"embed_dim": 16, "quick_gelu": True, "vision_cfg": VISION, "text_cfg": TEXT}


def _clip(cfg=CFG, seed=0) -> ClipModel:
    torch.manual_seed(seed)
    model = CLIP(**cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or "ls_" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return ClipModel(model, "tiny-vit", cfg)


@pytest.fixture(scope="module")
def clip() -> ClipModel:
    return _clip()


def _reference_tokens(visual, pixels):
    """open_clip's own path: embeddings, then its blocks; returns every block's output and its ln_1 input."""
    x = visual._embeds(pixels)
    outs, ln1s = [], []
    for blk in visual.transformer.resblocks:
        ln1s.append(blk.ln_1(x))
        x = blk(x)
        outs.append(x)
    return outs, ln1s


@pytest.mark.parametrize("n", [1, 7, 17])
def test_block_forward_matches_open_clip_block(clip, n):
    blk = clip.model.visual.transformer.resblocks[1]
    x = torch.randn(2, n, 48)
    got, amap = block_forward(blk, x, want_map=True)
    with torch.no_grad():
        torch.testing.assert_close(got, blk(x), rtol=0, atol=1e-5)
        y = blk.ln_1(x)
        _, ref_map = blk.attn(y, y, y, need_weights=True, average_attn_weights=True)
    torch.testing.assert_close(amap, ref_map, rtol=0, atol=1e-6)
    torch.testing.assert_close(amap.sum(-1), torch.ones(2, n))
    fast, none = block_forward(blk, x, want_map=False)  # the SDPA path without maps agrees
    assert none is None
    torch.testing.assert_close(fast, got, rtol=0, atol=1e-5)


def test_vit_forward_native_size_matches_open_clip(clip):
    visual = clip.model.visual
    pixels = torch.randn(3, 3, 32, 32)
    trace = clip.vit_forward(pixels, attn_layers=[2, 0])
    with torch.no_grad():
        outs, ln1s = _reference_tokens(visual, pixels)
        y = visual.transformer.resblocks[0].ln_1(visual._embeds(pixels))
        _, map0 = visual.transformer.resblocks[0].attn(y, y, y, need_weights=True)
        y = ln1s[2]
        _, map2 = visual.transformer.resblocks[2].attn(y, y, y, need_weights=True)
    assert trace.grid == (4, 4) and trace.ln1.shape == (3, 17, 48) and trace.ln1.requires_grad
    torch.testing.assert_close(trace.ln1.detach(), ln1s[-1], rtol=0, atol=1e-5)
    torch.testing.assert_close(trace.tokens.detach(), outs[-1], rtol=0, atol=1e-5)
    assert [a.shape for a in trace.attn] == [(3, 17, 17)] * 2
    torch.testing.assert_close(trace.attn[0], map2, rtol=0, atol=1e-6)  # in the requested order
    torch.testing.assert_close(trace.attn[1], map0, rtol=0, atol=1e-6)
    # image features = proj(ln_post(mean of patch tokens)): open_clip computes exactly that with avg pooling
    # and the final LayerNorm after pooling, on the same weights
    avg = CLIP(**{**CFG, "vision_cfg": {**VISION, "pool_type": "avg", "final_ln_after_pool": True}})
    avg.load_state_dict(clip.model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(trace.image_features.detach(), avg.eval().encode_image(pixels), rtol=0, atol=1e-5)
        cls_pooled = clip.model.encode_image(pixels)
    assert not torch.allclose(trace.image_features.detach(), cls_pooled, atol=1e-3)  # not the CLS token


@pytest.mark.parametrize("hw", [(24, 40), (8, 8), (56, 16)])
def test_vit_forward_other_sizes_use_interpolated_positions(clip, hw):
    """Equals an open_clip ViT built for that input size whose positional embedding is the interpolated one."""
    grid = (hw[0] // 8, hw[1] // 8)
    ref = CLIP(**{**CFG, "vision_cfg": {**VISION, "image_size": list(hw)}}).eval()
    sd = dict(clip.model.state_dict())
    sd["visual.positional_embedding"] = interpolate_pos_embed(sd["visual.positional_embedding"], grid)
    ref.load_state_dict(sd)
    pixels = torch.randn(2, 3, *hw)
    trace = clip.vit_forward(pixels, attn_layers=[-1])
    with torch.no_grad():
        outs, _ = _reference_tokens(ref.visual, pixels)
    assert trace.grid == grid and trace.attn[0].shape == (2, 1 + grid[0] * grid[1], 1 + grid[0] * grid[1])
    torch.testing.assert_close(trace.tokens.detach(), outs[-1], rtol=0, atol=1e-5)


def test_gradcam_gradient_flows_from_last_block_only(clip):
    visual = clip.model.visual
    pixels = torch.randn(2, 3, 24, 32, requires_grad=True)
    trace = clip.vit_forward(pixels)
    text = torch.randn(4, 16)
    score = (trace.image_features @ text.T).softmax(-1)[:, 1].sum()
    (grad,) = torch.autograd.grad(score, trace.ln1, retain_graph=True)
    assert grad.shape == trace.ln1.shape and grad.abs().sum() > 0
    # reference: the gradient at the last block's ln_1 output through open_clip's own last block
    blk = visual.transformer.resblocks[-1]
    with torch.no_grad():
        sd = dict(clip.model.state_dict())
        sd["visual.positional_embedding"] = interpolate_pos_embed(sd["visual.positional_embedding"], (3, 4))
        ref = CLIP(**{**CFG, "vision_cfg": {**VISION, "image_size": [24, 32]}}).eval()
        ref.load_state_dict(sd)
        x = ref.visual._embeds(pixels)
        for b in ref.visual.transformer.resblocks[:-1]:
            x = b(x)
    ln1 = blk.ln_1(x).detach().requires_grad_(True)
    out = x + blk.ls_1(blk.attention(q_x=ln1))
    out = out + blk.ls_2(blk.mlp(blk.ln_2(out)))
    feats = visual.ln_post(out[:, 1:].mean(1)) @ visual.proj
    ref_score = (feats @ text.T).softmax(-1)[:, 1].sum()
    (ref_grad,) = torch.autograd.grad(ref_score, ln1)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    # blocks 1..n-1 ran without gradients: nothing reaches the pixels or the frozen weights
    score.backward()
    assert pixels.grad is None
    assert all(p.grad is None for p in clip.model.parameters())


def test_vit_forward_input_checks(clip):
    with pytest.raises(ShapeError, match="multiple of the patch size"):
        clip.vit_forward(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ShapeError, match="out of range"):
        clip.vit_forward(torch.zeros(1, 3, 32, 32), attn_layers=[3])
    with pytest.raises(ShapeError, match=r"\(B, 3, H, W\)"):
        clip.vit_forward(torch.zeros(3, 32, 32))


def test_vit_forward_bf16(tmp_path):
    from wsclip.models.clip import load_clip, save_clip

    cfg = {**CFG, "vision_cfg": {k: v for k, v in VISION.items() if k != "ls_init_value"}}
    save_clip(tmp_path / "v.safetensors", _clip(cfg).model, cfg, "tiny-vit")
    ref, low = load_clip(tmp_path / "v.safetensors"), load_clip(tmp_path / "v.safetensors", precision="bf16")
    pixels = torch.randn(1, 3, 16, 24)
    trace = low.vit_forward(pixels, attn_layers=[1])
    want = ref.vit_forward(pixels, attn_layers=[1])
    assert trace.ln1.dtype == torch.bfloat16 and trace.ln1.requires_grad
    assert trace.image_features.dtype == torch.float32 and trace.attn[0].dtype == torch.float32
    torch.testing.assert_close(trace.image_features, want.image_features, rtol=0, atol=0.15)
    torch.testing.assert_close(trace.attn[0], want.attn[0], rtol=0, atol=0.05)


def test_vit_forward_attn_mean_and_frozen_bf16(clip):
    """attn_mean: the in-place mean of the per-layer maps; frozen_dtype: blocks 1..n-1 under bf16 autocast,
    the last block (GradCAM's) in float32, close to the fp32 run and really in bf16 (not equal)."""
    pixels = torch.randn(2, 3, 24, 40)
    per_layer = clip.vit_forward(pixels, attn_layers=[2, 0, 1])
    mean = clip.vit_forward(pixels, attn_layers=[2, 0, 1], attn_mean=True)
    assert len(mean.attn) == 1 and mean.attn[0].dtype == torch.float32
    torch.testing.assert_close(mean.attn[0], torch.stack(per_layer.attn).mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(mean.tokens, per_layer.tokens, rtol=0, atol=0)
    assert clip.vit_forward(pixels, attn_layers=[], attn_mean=True).attn == []
    low = clip.vit_forward(pixels, attn_layers=[0, 2], attn_mean=True, frozen_dtype=torch.bfloat16)
    ref = clip.vit_forward(pixels, attn_layers=[0, 2], attn_mean=True)
    assert low.ln1.dtype == torch.float32 and low.ln1.requires_grad and low.tokens.dtype == torch.float32
    torch.testing.assert_close(low.ln1, ref.ln1, rtol=0, atol=0.1)
    torch.testing.assert_close(low.attn[0], ref.attn[0], rtol=0, atol=0.02)
    assert (low.ln1 - ref.ln1).abs().max() > 0  # the frozen blocks did run in bf16


# ----------------------------------------------------------------------------- positional embedding
def test_interpolate_pos_embed_native_grid_is_unchanged():
    pe = torch.randn(1 + 16, 12)
    assert interpolate_pos_embed(pe, (4, 4)) is pe
    assert interpolate_pos_embed(pe[None], 4) is not None and torch.equal(interpolate_pos_embed(pe[None], 4), pe[None])


@pytest.mark.parametrize("src,dst", [((4, 4), (3, 5)), ((7, 7), (1, 1)), ((2, 3), (5, 9)), ((6, 6), (13, 2))])
def test_interpolate_pos_embed_shapes_and_values(src, dst):
    c = 6
    h, w = src
    # channel 0 constant, channel 1 linear in x, others random
    grid = torch.randn(h, w, c)
    grid[..., 0] = 0.7
    grid[..., 1] = torch.arange(w, dtype=torch.float32).view(1, w)
    pe = torch.cat([torch.randn(1, c), grid.reshape(h * w, c)])
    out = interpolate_pos_embed(pe, dst, src_grid=src if h != w else None)
    assert out.shape == (1 + dst[0] * dst[1], c)
    assert torch.equal(out[0], pe[0])  # class token kept
    patches = out[1:].reshape(dst[0], dst[1], c)
    torch.testing.assert_close(patches[..., 0], torch.full(dst, 0.7))
    # bilinear, align_corners=False: sample x positions (j + 0.5) * w / W - 0.5, clamped to the source grid
    xs = ((torch.arange(dst[1]) + 0.5) * w / dst[1] - 0.5).clamp(0, w - 1)
    torch.testing.assert_close(patches[..., 1], xs.view(1, -1).expand(dst), rtol=0, atol=1e-5)
    assert out[1:, 2:].min() >= pe[1:, 2:].min() - 1e-6 and out[1:, 2:].max() <= pe[1:, 2:].max() + 1e-6


def test_interpolate_pos_embed_errors():
    with pytest.raises(ShapeError, match="not a 3x3 grid"):
        interpolate_pos_embed(torch.randn(1 + 10, 4), (2, 2))
    with pytest.raises(ShapeError, match="at least 1x1"):
        interpolate_pos_embed(torch.randn(1 + 9, 4), (0, 2))
