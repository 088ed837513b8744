"""The one rule from class maps to a label mask: argmax over [background, classes].

Used by every CAM path (`wsclip cam` evaluation, `wsclip pseudo`, the labelers, the server, the
exported CamLabeler graph). Ties go to the background; labels are 0 (background) and k + 1
for class k.
"""

from __future__ import annotations

import numpy as np
import torch


def background_argmax(cams, bg, keys=None):
    """Labels (..., H, W) int64 of maps (..., K, H, W): 0 where no map exceeds `bg`, else keys[argmax] + 1.

    `bg`: a scalar or a per-pixel score broadcastable to (..., H, W); `keys`: the class index of
    each map (default 0..K-1). numpy in -> numpy out, torch in -> torch out (traceable for ONNX).
    """
    if isinstance(cams, torch.Tensor):
        if cams.shape[-3] == 0:
            return torch.zeros(cams.shape[:-3] + cams.shape[-2:], dtype=torch.long, device=cams.device)
        top, idx = cams.max(dim=-3)
        lab = idx + 1 if keys is None else (torch.as_tensor(keys, device=cams.device).long() + 1)[idx]
        bg = torch.as_tensor(bg, dtype=top.dtype, device=top.device)
        return torch.where(top > bg, lab, torch.zeros_like(lab))
    cams = np.asarray(cams)
    if cams.shape[-3] == 0:
        return np.zeros(cams.shape[:-3] + cams.shape[-2:], dtype=np.int64)
    idx = cams.argmax(axis=-3)
    top = np.take_along_axis(cams, idx[..., None, :, :], axis=-3)[..., 0, :, :]
    lab = idx + 1 if keys is None else (np.asarray(keys, dtype=np.int64) + 1)[idx]
    return np.where(top > bg, lab, 0).astype(np.int64)
