"""CLIP-ES labeling with the public code's structure (METHODS.md sections 5 and 9), for benchmarks.

Written in this project from the algorithm description; nothing is copied. It computes the same
maps as `wsclip.label.clip_es.ClipEs` (default settings: GradCAM at the last block's ln_1 output,
token pooling, CAA over the last blocks' attention, box masks at 0.4 * max), structured the way
the public labeler runs:

- one image at a time (batch 1);
- blocks 1..n-1 once per image, then for EACH class the last block forward and one backward;
- each class's map is copied to the CPU, and the CAA transition (three rounds of column/row
  normalisation, symmetrise, square: an N^3 product) is recomputed for every class on the CPU,
  followed by the box mask and the propagation there.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

EPS = 1e-7


def _rounded(hw, patch: int) -> tuple[int, int]:
    return tuple(int(-(-int(s) // patch) * patch) for s in hw)


def _box_mask(cam: np.ndarray, threshold: float) -> np.ndarray:
    """Union of the bounding boxes of the 8-connected regions of cam > threshold * max (inclusive edges)."""
    from scipy import ndimage

    out = np.zeros(cam.shape, dtype=bool)
    if cam.max() <= 0:
        return out
    labels, _ = ndimage.label(cam > threshold * cam.max(), structure=np.ones((3, 3), dtype=bool))
    for sl in ndimage.find_objects(labels):
        if sl is not None:
            out[sl] = True
    return out


def _attention_block(blk, x: torch.Tensor, y: torch.Tensor | None = None, want_map: bool = False):
    """One open_clip residual block (batch first); y overrides ln_1(x). Returns (x, head-mean attention map)."""
    if y is None:
        y = blk.ln_1(x)
    q = y if blk.attn.batch_first else y.transpose(0, 1)
    out, amap = blk.attn(q, q, q, need_weights=want_map, average_attn_weights=True)
    if not blk.attn.batch_first:
        out = out.transpose(0, 1)
    x = x + blk.ls_1(out)
    x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    return x, amap


class PublicClipEs:
    """Per image, per class CLIP-ES.

    clip: a wsclip ClipModel holding a ViT (its module is used as is); fg_text (K, D) and bg_text
    (L, D) L2-normalised text embeddings (computed once, as the public code does); caa_layers:
    0-based blocks whose attention CAA averages.
    """

    def __init__(self, clip, fg_text: torch.Tensor, bg_text: torch.Tensor, caa_layers: Sequence[int],
                 box_threshold: float = 0.4, logit_scale: float = 100.0):
        self.clip = clip
        self.visual = clip.model.visual
        self.fg_text, self.bg_text = fg_text, bg_text
        self.layers = list(caa_layers)
        self.box_threshold = box_threshold
        self.logit_scale = logit_scale
        self.patch = int(clip.patch_size)
        self.device = clip.device

    def _pixels(self, image) -> torch.Tensor:
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).to(self.device).permute(2, 0, 1)[None].float() / 255.0
        hw = _rounded(x.shape[-2:], self.patch)
        x = F.interpolate(x, size=hw, mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 1.0)
        mean = torch.tensor(self.clip.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.clip.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def _embed(self, pixels: torch.Tensor):
        v = self.visual
        x = v.conv1(pixels.to(v.conv1.weight.dtype))
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1)
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)
        pos = v.positional_embedding
        g = int(round((pos.shape[0] - 1) ** 0.5))
        if (h, w) != (g, g):
            grid = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
            grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
            pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(h * w, -1).to(pos.dtype)])
        return v.ln_pre(x + pos.to(x.dtype)), (int(h), int(w))

    def label(self, image, keys: Sequence[int]) -> dict:
        """CAMs of one uint8 (H, W, 3) image for its 0-based classes `keys`.

        Returns {"keys", "raw" (K', h, w) GradCAM, "cam" (K', h, w) CAA-refined, "high_res" (K', H, W)},
        float32 CPU tensors.
        """
        keys = [int(k) for k in keys]
        blocks = self.visual.transformer.resblocks
        n = len(blocks)
        maps = {}
        with torch.no_grad():
            x, (h, w) = self._embed(self._pixels(image))
            for i, blk in enumerate(blocks[:-1]):
                x, amap = _attention_block(blk, x, want_map=i in self.layers)
                if amap is not None:
                    maps[i] = amap.float()
        text = torch.cat([self.fg_text[keys], self.bg_text]).float()
        raws, refined = [], []
        for j, _ in enumerate(keys):
            # the last block again for every class, with gradients from its ln_1 output
            y = blocks[-1].ln_1(x).detach().requires_grad_(True)
            with torch.enable_grad():
                z, amap = _attention_block(blocks[-1], x, y=y, want_map=(n - 1) in self.layers)
                pooled = self.visual.ln_post(z[:, 1:]).mean(dim=1)
                if self.visual.proj is not None:
                    pooled = pooled @ self.visual.proj
                probs = (self.logit_scale * F.normalize(pooled.float(), dim=-1) @ text.t()).softmax(dim=-1)
                (grad,) = torch.autograd.grad(probs[0, j], y)
            if amap is not None:
                maps[n - 1] = amap.detach().float()
            acts = y.detach()[0, 1:].float()  # (N, C)
            weights = grad[0, 1:].float().mean(dim=0)  # (C,)
            cam = (acts @ weights).clamp_min(0).reshape(h, w)
            cam = cam - cam.min()
            cam = (cam / (cam.max() + EPS)).cpu()  # to the CPU, as the public loop does
            raws.append(cam)
            # CAA, recomputed for every class on the CPU
            attn = torch.stack([maps[i] for i in self.layers]).mean(0)[0, 1:, 1:].cpu()
            d = attn.clone()
            for _ in range(3):
                d = d / d.sum(dim=0, keepdim=True)
                d = d / d.sum(dim=1, keepdim=True)
            sym = (d + d.t()) / 2
            trans = sym @ sym
            box = torch.from_numpy(_box_mask(cam.numpy(), self.box_threshold)).float().reshape(-1)
            f = trans @ (box * cam.reshape(-1))
            f = (f - f.min()) / (f.max() - f.min() + EPS)
            refined.append(f.reshape(h, w))
        hw = tuple(np.asarray(image).shape[:2])
        raw = torch.stack(raws) if raws else torch.zeros(0, h, w)
        cam = torch.stack(refined) if refined else torch.zeros(0, h, w)
        high = F.interpolate(cam[None], size=hw, mode="bilinear", align_corners=False)[0] if keys else \
            torch.zeros(0, *hw)
        return {"keys": torch.tensor(keys, dtype=torch.long), "raw": raw, "cam": cam, "high_res": high}
