"""ViT access for CLIP-ES: any-size inputs, per-block attention maps, a differentiable last block.

The attention is recomputed here from each block's in_proj/out_proj weights (the same math
as torch's MultiheadAttention, no mask), so the returned maps are exact, not approximations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from wsclip.errors import CheckpointError, ShapeError


@dataclass
class ViTTrace:
    """What `vit_forward` returns (batch-first layout, B images, N = h*w patches, C = width).

    image_features: (B, D) proj(ln_post(mean of the patch tokens after the last block)); not normalised.
    ln1: (B, 1+N, C) output of the last block's ln_1, a leaf with requires_grad=True from which the last
        block (and image_features) is computed: torch.autograd.grad(score, ln1) is the GradCAM gradient.
    attn: head-averaged attention probabilities (B, 1+N, 1+N), float32, one per requested block.
    grid: (h, w) patch grid.
    tokens: (B, 1+N, C) output of the last block (before ln_post).
    """

    image_features: torch.Tensor
    ln1: torch.Tensor
    attn: list[torch.Tensor] = field(default_factory=list)
    grid: tuple[int, int] = (0, 0)
    tokens: torch.Tensor | None = None


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_hw, src_grid=None) -> torch.Tensor:
    """Resize a ViT positional embedding ((1+G*G, C) or (1, 1+G*G, C)) to a (h, w) patch grid.

    Bilinear (align_corners=False) on the patch positions, class-token row kept as is; the native
    grid returns the input unchanged. `src_grid` gives a non-square source grid (default: square).
    """
    h, w = (int(grid_hw), int(grid_hw)) if isinstance(grid_hw, int) else (int(grid_hw[0]), int(grid_hw[1]))
    if h < 1 or w < 1:
        raise ShapeError(f"patch grid must be at least 1x1, got {h}x{w}")
    batched = pos_embed.dim() == 3
    pe = pos_embed[0] if batched else pos_embed
    if pe.dim() != 2:
        raise ShapeError(f"positional embedding must be (1+N, C) or (1, 1+N, C), got {tuple(pos_embed.shape)}")
    n = pe.shape[0] - 1
    if src_grid is None:
        g = math.isqrt(n)
        src = (g, g)
    else:
        src = (int(src_grid[0]), int(src_grid[1])) if not isinstance(src_grid, int) else (src_grid, src_grid)
    if src[0] * src[1] != n:
        raise ShapeError(f"positional embedding has {n} patch positions, not a {src[0]}x{src[1]} grid")
    if (h, w) == src:
        return pos_embed
    grid = pe[1:].reshape(1, src[0], src[1], -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
    out = torch.cat([pe[:1], grid.permute(0, 2, 3, 1).reshape(h * w, -1).to(pe.dtype)], dim=0)
    return out[None] if batched else out


def check_vit(visual) -> None:
    """Raise a clear error unless `visual` is a standard open_clip VisionTransformer."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise CheckpointError(
            f"this CLIP's image tower is a {type(visual).__name__}, not a ViT: CLIP-ES needs a ViT CLIP "
            "(e.g. ViT-B-16); load a ViT checkpoint"
        )
    blocks = visual.transformer.resblocks
    ok = all(isinstance(b, ResidualAttentionBlock) and isinstance(b.attn, torch.nn.MultiheadAttention)
             and b.attn._qkv_same_embed_dim and not hasattr(b, "ln_1_kv") for b in blocks)
    if not ok or visual.attn_pool is not None:
        raise CheckpointError("vit_forward supports standard CLIP ViT blocks only (no custom attention blocks or "
                              "attentional pooling); use a plain OpenAI/open_clip ViT")


MAP_CHUNK_BYTES = 16 * 2**20  # float32 attention probabilities computed at once (a ViT-B/16 head at 513 px: 4.7 MB)


def _attention(blk, q_in: torch.Tensor, want_map: bool):
    """Self-attention of a ResidualAttentionBlock on its ln_1 output; returns (output, head-mean map or None)."""
    attn = blk.attn
    b, n, c = q_in.shape
    heads = attn.num_heads
    qkv = F.linear(q_in, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d) each
    amap = None
    if want_map:  # heads in chunks of at most MAP_CHUNK_BYTES of float32 maps: all heads' maps never exist at once
        scale = (c // heads) ** -0.5
        step = max(1, MAP_CHUNK_BYTES // (4 * b * n * n))
        outs = []
        for h0 in range(0, heads, step):
            hs = slice(h0, h0 + step)
            probs = ((q[:, hs].float() * scale) @ k[:, hs].float().transpose(-2, -1)).softmax(dim=-1)
            outs.append(probs.to(v.dtype) @ v[:, hs])
            part = probs.detach().sum(dim=1)
            amap = part if amap is None else amap.add_(part)
        out = torch.cat(outs, dim=1)
        amap = amap.div_(heads)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    out = out.transpose(1, 2).reshape(b, n, c)
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias), amap


def block_forward(blk, x: torch.Tensor, want_map: bool = False, ln1: torch.Tensor | None = None):
    """One ResidualAttentionBlock, batch-first: (x_out, attention map or None). `ln1` overrides ln_1(x)."""
    if ln1 is None:
        ln1 = blk.ln_1(x)
    out, amap = _attention(blk, ln1, want_map)
    x = x + blk.ls_1(out)
    x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    return x, amap


def embed_patches(visual, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch embedding + class token + (interpolated) positional embedding + ln_pre: (B, 1+N, C), (h, w)."""
    x = visual.conv1(pixels)
    h, w = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    pos = interpolate_pos_embed(visual.positional_embedding, (h, w), src_grid=visual.grid_size)
    x = x + pos.to(x.dtype)
    return visual.ln_pre(x), (int(h), int(w))


def vit_forward(visual, pixels: torch.Tensor, attn_layers=None, attn_mean: bool = False,
                frozen_dtype: torch.dtype | None = None) -> ViTTrace:
    """Run a CLIP ViT on (B, 3, H, W) pixels (H, W multiples of the patch size) for CLIP-ES.

    Blocks 1..n-1 run without gradients, the last block with gradients from `ln1`. `attn_layers`:
    0-based block indices whose head-averaged attention maps are returned, in that order (negative allowed).
    `attn_mean`: return one map, their mean, summed in place as the blocks run (one (B, N, N) buffer
    instead of one per layer). `frozen_dtype` (e.g. torch.bfloat16): blocks 1..n-1 run under autocast
    to it (matrix products in that dtype, the residual stream and the maps in float32); the last block,
    whose gradient GradCAM takes, always runs in the model's dtype.
    """
    check_vit(visual)
    blocks = visual.transformer.resblocks
    n_blocks = len(blocks)
    order: list[int] = []
    for i in attn_layers or ():
        j = int(i) + n_blocks if int(i) < 0 else int(i)
        if not 0 <= j < n_blocks:
            raise ShapeError(f"attention layer {i} out of range for a ViT with {n_blocks} blocks (0..{n_blocks - 1})")
        if j not in order:
            order.append(j)
    wanted = set(order)
    if pixels.dim() != 4 or pixels.shape[1] != 3:
        raise ShapeError(f"pixels must be (B, 3, H, W), got {tuple(pixels.shape)}")
    ph, pw = visual.patch_size
    if pixels.shape[-2] % ph or pixels.shape[-1] % pw:
        raise ShapeError(f"image size {tuple(pixels.shape[-2:])} is not a multiple of the patch size {ph}: "
                         "resize it (e.g. round H and W up to a multiple of the patch size)")
    maps: dict[int, torch.Tensor] = {}

    def keep(i: int, amap: torch.Tensor) -> None:
        if not attn_mean:
            maps[i] = amap
        elif maps:
            maps[-1].add_(amap)
        else:
            maps[-1] = amap.float()

    dtype = visual.conv1.weight.dtype
    from wsclip.runtime import autocast_to

    low = autocast_to(pixels.device, frozen_dtype)
    with torch.no_grad():
        with low:
            x, grid = embed_patches(visual, pixels.to(dtype))
            for i, blk in enumerate(blocks[:-1]):
                x, amap = block_forward(blk, x, want_map=i in wanted)
                if amap is not None:
                    keep(i, amap)
        x = x.to(dtype)
        last = blocks[-1]
        ln1 = last.ln_1(x).detach().requires_grad_(True)
    with torch.enable_grad():
        x, amap = block_forward(last, x, want_map=(n_blocks - 1) in wanted, ln1=ln1)
        if amap is not None:
            keep(n_blocks - 1, amap)
        pooled = visual.ln_post(x[:, 1:].mean(dim=1))
        if visual.proj is not None:
            pooled = pooled @ visual.proj
    if attn_mean:
        attn = [maps[-1].div_(len(order))] if order else []
    else:
        attn = [maps[i] for i in order]
    return ViTTrace(image_features=pooled.float(), ln1=ln1, attn=attn, grid=grid, tokens=x)
