"""One CLIMS training step with the public code's structure (METHODS.md section 3), for benchmarks.

Written in this project from the algorithm description; nothing is copied. It computes the same
losses as `wsclip.train.clims.ClimsObjective`, but the way the public trainer does:

- every class's CAM of every image is upsampled to the CLIP size (not only the positive pairs),
  then each positive pair is masked by a separate multiply in a Python loop;
- CLIP's image encoder runs three times per pair: fg for OTM, bg for BTM, fg again for CBS;
- the prompt and background-word texts are tokenised and re-encoded every step;
- CLIP's weights keep requires_grad, so backward also computes gradients for every CLIP weight
  (image and text towers) that nothing uses.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PublicClimsStep:
    """The CLIMS objective, public-code structure.

    clip_model: an open_clip CLIP module; with clip_weight_grads (the public code's behaviour) every
    CLIP weight is set to require gradients, so give the baseline its own copy of a CLIP that
    another path uses frozen. tokenize: texts -> token ids; prompts: the
    K class prompts ("a photo of {name}."); background: the L background-word prompts. Inputs are
    ImageNet-normalised images as the CAM network sees them; `clip_norm` (mean, std) re-normalises
    them for CLIP (None keeps ImageNet statistics, as the public code does).
    """

    def __init__(self, clip_model: torch.nn.Module, tokenize, prompts: Sequence[str], background: Sequence[str],
                 image_size: int, alpha: float = 10.0, beta: float = 24.0, gamma: float = 1.0, delta: float = 0.2,
                 tau: float = 0.26, clip_norm: tuple | None = None, clip_weight_grads: bool = True):
        self.clip = clip_model
        self.tokenize = tokenize
        self.prompts = list(prompts)
        self.background = list(background)
        self.size = int(image_size)
        self.weights = (alpha, beta, gamma, delta)
        self.tau = tau
        self.clip_norm = clip_norm
        self.dtype = next(clip_model.parameters()).dtype
        if clip_weight_grads:  # the public code never freezes CLIP: backward fills every weight's .grad
            for p in clip_model.parameters():
                p.requires_grad_(True)

    def _text(self, texts: Sequence[str], device) -> torch.Tensor:
        tokens = self.tokenize(list(texts)).to(device)
        return F.normalize(self.clip.encode_text(tokens).float(), dim=-1)

    def _image(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(pixels.to(self.dtype)).float(), dim=-1)

    def losses(self, net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor):
        """(loss, {"otm", "btm", "cbs", "reg"}) for ImageNet-normalised images (B, 3, H, W), labels (B, K)."""
        cams = torch.sigmoid(net(images).float())  # (B, K, h, w)
        b, k = cams.shape[:2]
        s = self.size
        cam_s = F.interpolate(cams, size=(s, s), mode="bilinear", align_corners=True).reshape(b * k, 1, s, s)
        img = images.float()
        if self.clip_norm is not None:
            m_in = torch.tensor(IMAGENET_MEAN, device=img.device).view(1, 3, 1, 1)
            s_in = torch.tensor(IMAGENET_STD, device=img.device).view(1, 3, 1, 1)
            m_c = torch.tensor(self.clip_norm[0], device=img.device).view(1, 3, 1, 1)
            s_c = torch.tensor(self.clip_norm[1], device=img.device).view(1, 3, 1, 1)
            img = ((img * s_in + m_in).clamp(0.0, 1.0) - m_c) / s_c
        img_s = F.interpolate(img, size=(s, s), mode="bilinear", align_corners=True)
        pairs = labels.nonzero()  # (M, 2) image, class
        fg, bg = [], []
        for n, c in pairs.tolist():  # one pair at a time, as the public loop
            cam = cam_s[n * k + c]
            fg.append(cam * img_s[n])
            bg.append((1 - cam) * img_s[n])
        fg_x, bg_x = torch.stack(fg), torch.stack(bg)
        texts = [self.prompts[c] for c in pairs[:, 1].tolist()]
        dev = images.device
        # OTM: encode the foreground and the pair texts
        s_fg = (self._image(fg_x) * self._text(texts, dev)).sum(-1)
        otm = -torch.log(s_fg.clamp(1e-4, 0.9999)).mean()
        # BTM: encode the background and the texts again
        s_bg = (self._image(bg_x) * self._text(texts, dev)).sum(-1)
        btm = -torch.log(1 - s_bg.clamp(1e-4, 0.9999)).mean()
        # CBS: encode the foreground a second time and the background words
        sim = self._image(fg_x) @ self._text(self.background, dev).t()  # (M, L)
        over = sim > self.tau
        cbs = -torch.log(1 - torch.where(over, sim, torch.zeros_like(sim)))[over].sum()
        reg = cams.mean()
        a, bt, g, d = self.weights
        terms = {"otm": otm, "btm": btm, "cbs": cbs, "reg": reg}
        return a * otm + bt * btm + g * cbs + d * reg, terms

    def step(self, net: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
             labels: torch.Tensor) -> dict:
        """losses + backward (into the CAM net and every CLIP weight) + optimiser step; returns the terms."""
        loss, terms = self.losses(net, images, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for p in self.clip.parameters():  # the public code never uses them; drop them so memory stays flat
            p.grad = None
        return {k: float(v.detach()) for k, v in terms.items()}
