"""The benchmark baselines (public-code structure) compute what wsclip's paths compute, on tiny random models."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip.model import CLIP

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.baselines.clims_public_step import IMAGENET_MEAN, IMAGENET_STD, PublicClimsStep  # noqa: E402
from wsclip.models.clip import ClipModel  # noqa: E402

TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
VISION = {"image_size": 32, "layers": 3, "width": 48, "patch_size": 8, "head_width": 16}
CFG = {"embed_dim": 24, "vision_cfg": VISION, "text_cfg": TEXT}


def _clip(seed: int) -> ClipModel:
    torch.manual_seed(seed)
    model = CLIP(**CFG)
    with torch.no_grad():  # non-trivial layer norms, so a wrong order of operations shows
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return ClipModel(model, "tiny-vit", CFG)


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


# ============================================================================ CLIMS step
@pytest.mark.parametrize("mask_norm,tau,seed", [("imagenet", 0.26, 0), ("clip", -1.0, 1)])
def test_public_clims_step_matches_wsclip_objective(mask_norm, tau, seed):
    from wsclip.config import ClimsConfig
    from wsclip.models.camnet import CAMNet
    from wsclip.train.clims import ClimsObjective

    clip = _clip(seed)
    k = 5
    torch.manual_seed(seed + 10)
    net = CAMNet("tiny", k).train()
    prompts = [f"a photo of class{i}." for i in range(k)]
    background = [f"a photo of word{i}." for i in range(4)]
    # odd sizes; image 2 has no positive class; image 0 has three
    b, hh, ww = 3, 50, 38
    img01 = torch.rand(b, 3, hh, ww)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (img01 - mean) / std
    labels = torch.zeros(b, k)
    labels[0, [0, 2, 4]] = 1
    labels[1, 3] = 1
    cfg = ClimsConfig(mask_norm=mask_norm, tau=tau, kernel_backend="torch", alpha=10.0, beta=24.0, gamma=1.0,
                      delta=0.2)
    objective = ClimsObjective(clip, clip.encode_text(prompts), clip.encode_text(background), cfg)
    params = [p for p in net.parameters() if p.requires_grad]

    loss_w, terms_w = objective(net, {"image": x, "labels": labels})
    grads_w = torch.autograd.grad(loss_w, params)

    norm = (clip.mean, clip.std) if mask_norm == "clip" else None
    public = PublicClimsStep(copy.deepcopy(clip.model), clip.tokenize, prompts, background, clip.image_size, tau=tau,
                             clip_norm=norm)
    loss_p, terms_p = public.losses(net, x, labels)
    grads_p = torch.autograd.grad(loss_p, params)

    assert set(terms_w) == set(terms_p) == {"otm", "btm", "cbs", "reg"}
    for name in terms_w:
        a, b = float(terms_w[name].detach()), float(terms_p[name].detach())
        assert np.isfinite(b) and abs(a - b) <= 1e-5 * (1 + abs(a)), name
    if tau < 0:  # every similarity counts: CBS is a sum over all (pair, word) entries
        assert float(terms_p["cbs"].detach()) != 0
    assert abs(float(loss_w.detach()) - float(loss_p.detach())) <= 1e-5 * (1 + abs(float(loss_w.detach())))
    worst = max(_rel(gp, gw) for gp, gw in zip(grads_p, grads_w) if gw.norm() > 0)
    assert worst < 1e-4
    assert any(g.norm() > 0 for g in grads_w)


def test_public_clims_step_computes_clip_weight_gradients():
    """The baseline's wasted work is real: backward reaches CLIP's image and text weights; wsclip's does not."""
    from wsclip.models.camnet import CAMNet

    clip = _clip(2)
    net = CAMNet("tiny", 3).train()
    public = PublicClimsStep(clip.model, clip.tokenize, ["a", "b", "c"], ["w"], clip.image_size, tau=-1.0)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    loss, _ = public.losses(net, torch.randn(2, 3, 40, 40), labels)
    loss.backward()
    assert clip.model.visual.conv1.weight.grad is not None and clip.model.visual.conv1.weight.grad.norm() > 0
    assert clip.model.token_embedding.weight.grad is not None
    before = [p.detach().clone() for p in net.parameters()]
    public.step(net, opt, torch.randn(2, 3, 40, 40), labels)
    assert all(p.grad is None for p in clip.model.parameters())  # dropped after the step
    assert all(p.requires_grad for p in clip.model.parameters())  # the public code never freezes CLIP
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))  # the CAM net trained


# ============================================================================ CLIP-ES
def test_public_clip_es_matches_wsclip_labeler():
    from benchmarks.baselines.clip_es_public import PublicClipEs
    from wsclip.label.clip_es import ClipEs, ClipEsConfig
    from wsclip.vocab import VOC_CLASSES

    clip = _clip(3)
    # a mild logit scale: a random CLIP at 100 saturates the softmax and every GradCAM vanishes
    labeler = ClipEs(clip, VOC_CLASSES, ClipEsConfig(caa_layers=2, caa_backend="torch", logit_scale=3.0, compute="fp32"))
    public = PublicClipEs(clip, labeler.fg_text, labeler.bg_text, labeler.attn_layers, labeler.box_threshold,
                          logit_scale=3.0)
    rng = np.random.default_rng(0)
    # two images of the same rounded size (43x61 -> 48x64), different class counts
    images = [rng.integers(0, 256, (43, 61, 3), dtype=np.uint8) for _ in range(2)]
    keys = [[3, 14], [7]]
    ours = labeler.label(images, keys)
    checked = 0
    for im, k, w in zip(images, keys, ours):
        p = public.label(im, k)
        assert p["cam"].shape == w["cam"].shape == (len(k), 6, 8)
        assert p["high_res"].shape == w["high_res"].shape == (len(k), 43, 61)
        assert torch.equal(p["keys"], w["keys"].cpu())
        raw = w["high_res_raw"]
        assert (p["raw"].flatten(1).amax(1) > 0.99).all()  # min-max normalised maps, not degenerate
        up = torch.nn.functional.interpolate(p["raw"][None], size=(43, 61), mode="bilinear", align_corners=False)[0]
        assert _rel(up, raw) < 1e-4  # GradCAM, one backward per class vs one batched backward
        assert _rel(p["cam"], w["cam"]) < 1e-4  # CAA, recomputed per class on the CPU vs (V S) S
        assert _rel(p["high_res"], w["high_res"]) < 1e-4
        checked += len(k)
    assert checked == 3
