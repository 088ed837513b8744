"""CLIMS and QA-CLIMS losses (METHODS.md sections 3 and 4), reductions exactly as specified.

Similarities and embeddings are taken as given: callers pass cosine similarities
(for OTM/BTM/CBS) or L2-normalised embeddings (for FRC/BRC).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsclip.errors import ShapeError

#: clamp applied to the similarities of OTM and BTM (public CLIMS code)
SIM_MIN, SIM_MAX = 1e-4, 0.9999


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A zero that keeps `like` in the autograd graph (for empty pair sets)."""
    return like.sum() * 0.0


def otm(sim: torch.Tensor) -> torch.Tensor:
    """Object-text matching: -mean_pairs log(clamp(s_fg, 1e-4, 0.9999)); sim is (M,)."""
    if sim.dim() != 1:
        raise ShapeError(f"otm expects similarities of shape (M,), got {tuple(sim.shape)}")
    if sim.numel() == 0:
        return _zero(sim)
    return -torch.log(sim.clamp(SIM_MIN, SIM_MAX)).mean()


def btm(sim: torch.Tensor) -> torch.Tensor:
    """Background-text matching: -mean_pairs log(1 - clamp(s_bg, 1e-4, 0.9999)); sim is (M,)."""
    if sim.dim() != 1:
        raise ShapeError(f"btm expects similarities of shape (M,), got {tuple(sim.shape)}")
    if sim.numel() == 0:
        return _zero(sim)
    return -torch.log(1.0 - sim.clamp(SIM_MIN, SIM_MAX)).mean()


def cbs(sim: torch.Tensor, tau: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Co-occurring background suppression: -sum_pairs sum_l 1[c_l > tau] log(1 - c_l).

    sim is (M, L): foreground-region vs background-word similarities. A sum, not a
    mean. Optional bool `mask` (M, L) keeps only the marked entries (per-class word
    lists, e.g. the paper version's boat/train lists).
    """
    if sim.dim() != 2:
        raise ShapeError(f"cbs expects similarities of shape (M, L), got {tuple(sim.shape)}")
    keep = sim > tau
    if mask is not None:
        if mask.shape != sim.shape:
            raise ShapeError(f"cbs mask has shape {tuple(mask.shape)}, similarities {tuple(sim.shape)}")
        keep = keep & mask.bool()
    # double where: unselected entries become 0 before the log, so c = 1 there cannot
    # produce inf/NaN values or gradients; no host sync (no boolean indexing)
    safe = torch.where(keep, sim, torch.zeros_like(sim))
    return torch.where(keep, -torch.log1p(-safe), torch.zeros_like(sim)).sum()


def area(cams: torch.Tensor) -> torch.Tensor:
    """Area regulariser: mean of the CAMs over every entry (all images, classes and pixels)."""
    if cams.numel() == 0:
        return _zero(cams)
    return cams.mean()


def _qa_logits(x, t_fg, t_bg, tau, bg_mask, name):
    if x.dim() != 2 or t_fg.shape != x.shape or t_bg.dim() != 3 or t_bg.shape[0] != x.shape[0] or t_bg.shape[2] != x.shape[1]:
        raise ShapeError(
            f"{name} expects region (M, D), t_fg (M, D), t_bg (M, L, D); got {tuple(x.shape)}, "
            f"{tuple(t_fg.shape)}, {tuple(t_bg.shape)}"
        )
    if bg_mask is None:
        bg_mask = torch.ones(t_bg.shape[:2], dtype=torch.bool, device=t_bg.device)
    elif bg_mask.shape != t_bg.shape[:2]:
        raise ShapeError(f"{name}: bg_mask has shape {tuple(bg_mask.shape)}, expected {tuple(t_bg.shape[:2])}")
    bg_mask = bg_mask.bool()
    keep = bg_mask.any(dim=1)  # pairs with at least one background text
    x, t_fg, t_bg, bg_mask = x[keep], t_fg[keep], t_bg[keep], bg_mask[keep]
    l_fg = (x * t_fg).sum(-1) / tau  # (M',)
    l_bg = torch.einsum("md,mld->ml", x, t_bg) / tau  # (M', L)
    l_bg = l_bg.masked_fill(~bg_mask, float("-inf"))
    return l_fg, l_bg, bg_mask


def frc(v, t_fg, t_bg, tau: float, bg_mask=None) -> torch.Tensor:
    """QA-CLIMS foreground region contrast, summed over pairs.

    -log(e^{v.t_fg/tau} / (e^{v.t_fg/tau} + sum_j e^{v.t_bg_j/tau})). v, t_fg (M, D) and
    t_bg (M, L, D) are L2-normalised embeddings; bg_mask (M, L) marks real (non-padding)
    background texts; pairs without any are skipped.
    """
    l_fg, l_bg, _ = _qa_logits(v, t_fg, t_bg, tau, bg_mask, "frc")
    if l_fg.numel() == 0:
        return _zero(v)
    return F.softplus(torch.logsumexp(l_bg, dim=1) - l_fg).sum()


def brc(u, t_fg, t_bg, tau: float, bg_mask=None) -> torch.Tensor:
    """QA-CLIMS background region contrast, summed over pairs.

    -log(mean_j e^{u.t_bg_j/tau} / (mean_j e^{u.t_bg_j/tau} + e^{u.t_fg/tau})), the mean
    over the pair's real background texts. Shapes and normalisation as in `frc`.
    """
    l_fg, l_bg, mask = _qa_logits(u, t_fg, t_bg, tau, bg_mask, "brc")
    if l_fg.numel() == 0:
        return _zero(u)
    log_mean_bg = torch.logsumexp(l_bg, dim=1) - torch.log(mask.sum(1).to(l_bg.dtype))
    return F.softplus(l_fg - log_mean_bg).sum()
