"""A CLIMS step against a reference written from the public code's documented behaviour (METHODS.md sections 3
and 10): which features feed which loss, and `--compat official` (bn1 in train mode) to 1e-5 / 1e-4."""

import copy

import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP

from wsclip.compat import resolve
from wsclip.config import ClimsConfig
from wsclip.models.camnet import CAMNet
from wsclip.models.clip import ClipModel
from wsclip.train.clims import IMAGENET_MEAN, IMAGENET_STD, ClimsObjective, prepare_camnet

CFG = {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "patch_size": 8, "head_width": 16},
       "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
K = 4
PROMPTS = [f"a photo of class{i}." for i in range(K)]
BACKGROUND = [f"a photo of word{i}." for i in range(5)]


@pytest.fixture(scope="module")
def clip():
    """A tiny random CLIP whose image and text features share a common direction (LayerNorm biases), so the
    cosine similarities lie around 0.3-0.5, inside the OTM/BTM clamps and above the CBS threshold."""
    torch.manual_seed(0)
    model = CLIP(**CFG)
    w = torch.randn(CFG["embed_dim"])
    with torch.no_grad():
        model.visual.ln_post.bias.copy_(torch.linalg.lstsq(model.visual.proj.T, w[:, None]).solution[:, 0])
        model.ln_final.bias.copy_(torch.linalg.lstsq(model.text_projection.T, w[:, None]).solution[:, 0])
    return ClipModel(model, "tiny", CFG)


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    img01 = torch.rand(3, 3, 45, 37, generator=g)  # odd sizes
    x = (img01 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    labels = torch.zeros(3, K)
    labels[0, [0, 3]] = 1
    labels[2, 1] = 1  # image 1 has no positive class
    return {"image": x, "labels": labels}


def _net(seed=2):
    torch.manual_seed(seed)
    net = CAMNet("tiny", K)
    with torch.no_grad():  # running statistics far from the batch's, so bn1's mode shows
        net.backbone.bn1.running_mean.uniform_(-2, 2)
        net.backbone.bn1.running_var.uniform_(0.2, 4)
    return net


def reference_terms(net, batch, clip, mask_norm, tau):
    """The public step, pair by pair: fg = P * X and bg = (1 - P) * X at CLIP's size (bilinear, align_corners);
    OTM on fg vs the class text, BTM on bg vs the class text, CBS on fg vs the background words, REG = mean(P)."""
    x, labels = batch["image"], batch["labels"]
    cams = torch.sigmoid(net(x))
    s = clip.image_size
    if mask_norm == "imagenet":  # the public code masks the ImageNet-normalised pixels it trains on
        img = x
    else:
        m_in, s_in = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
        img = ((x * s_in + m_in).clamp(0, 1) - torch.tensor(clip.mean).view(1, 3, 1, 1)) / torch.tensor(clip.std).view(1, 3, 1, 1)
    img = F.interpolate(img, size=(s, s), mode="bilinear", align_corners=True)
    cam = F.interpolate(cams, size=(s, s), mode="bilinear", align_corners=True)
    fg, bg, t = [], [], []
    for n, k in labels.nonzero().tolist():
        fg.append(cam[n, k] * img[n])
        bg.append((1 - cam[n, k]) * img[n])
        t.append(PROMPTS[k])

    def enc(pixels):
        return F.normalize(clip.model.encode_image(pixels), dim=-1)

    text = clip.encode_text(t)
    s_fg = (enc(torch.stack(fg)) * text).sum(-1)
    s_bg = (enc(torch.stack(bg)) * text).sum(-1)
    c = enc(torch.stack(fg)) @ clip.encode_text(BACKGROUND).T
    return {"otm": -torch.log(s_fg.clamp(1e-4, 0.9999)).mean(),
            "btm": -torch.log(1 - s_bg.clamp(1e-4, 0.9999)).mean(),
            "cbs": -(torch.log(1 - c) * (c > tau)).sum(),
            "reg": cams.mean()}


def _objective(clip, cfg):
    return ClimsObjective(clip, clip.encode_text(PROMPTS), clip.encode_text(BACKGROUND), cfg)


def _grads(loss, net):
    return [g.detach().clone() for g in torch.autograd.grad(loss, [p for p in net.parameters() if p.requires_grad])]


def _rel(a, b):
    return max(float((x - y).norm() / y.norm()) for x, y in zip(a, b) if y.norm() > 0)


@pytest.mark.parametrize("mask_norm", ["clip", "imagenet"])
def test_each_loss_gets_the_right_features(clip, mask_norm):
    """BTM must see the background images and CBS the foreground ones (a swap changes every figure here)."""
    cfg = ClimsConfig(tau=-1.0, mask_norm=mask_norm, kernel_backend="torch")  # tau < 0: CBS counts every word
    net = _net()
    batch = _batch()
    loss, terms = _objective(clip, cfg)(net, batch)
    ref = reference_terms(net, batch, clip, mask_norm, cfg.tau)
    for name in ("otm", "btm", "cbs", "reg"):
        torch.testing.assert_close(terms[name].double(), ref[name].double(), rtol=1e-5, atol=1e-6, msg=name)
    want = 10 * ref["otm"] + 24 * ref["btm"] + ref["cbs"] + 0.2 * ref["reg"]
    torch.testing.assert_close(loss.double(), want.double(), rtol=1e-5, atol=1e-6)
    # the similarities lie inside the clamps (so OTM/BTM have gradients) and fg and bg differ
    s = torch.exp(-ref["otm"].detach()), 1 - torch.exp(-ref["btm"].detach())
    assert 0.1 < float(s[0]) < 0.9 and 0.1 < float(s[1]) < 0.9 and abs(float(s[0] - s[1])) > 1e-3


def test_compat_official_is_the_public_step_bn1_in_train_mode(clip):
    """--compat official: loss terms within 1e-5 and CAM-network gradients within 1e-4 (relative L2) of the public
    step, whose bn1 (frozen only by requires_grad=False) normalises with batch statistics."""
    batch = _batch(3)
    cfg = resolve(ClimsConfig(compat="official", kernel_backend="torch"))  # tau 0.26
    assert (cfg.bn1, cfg.mask_norm) == ("train", "imagenet")
    public = _net()
    torch.nn.Module.train(public)  # a plain module: every BatchNorm, bn1 included, in train mode
    ref = reference_terms(public, batch, clip, "imagenet", cfg.tau)
    ref_loss = 10 * ref["otm"] + 24 * ref["btm"] + ref["cbs"] + 0.2 * ref["reg"]
    ref_grads = _grads(ref_loss, public)

    ours = prepare_camnet(_net(), cfg)
    assert ours.backbone.bn1.training and not ours.backbone.bn1.weight.requires_grad
    loss, terms = _objective(clip, cfg)(ours, batch)
    for name in ref:
        assert abs(float(terms[name]) - float(ref[name])) <= 1e-5 * (1 + abs(float(ref[name]))), name
    assert float(terms["cbs"]) > 0
    assert _rel(_grads(loss, ours), ref_grads) < 1e-4

    # wsclip's default keeps bn1's statistics frozen too: a different (and here much different) step
    default = prepare_camnet(_net(), resolve(ClimsConfig()))
    assert not default.backbone.bn1.training and default.training
    loss_d, _ = _objective(clip, cfg)(default, batch)
    assert _rel(_grads(loss_d, default), ref_grads) > 1e-2
    # an explicit bn1 wins over --compat
    assert resolve(ClimsConfig(compat="official", bn1="eval")).bn1 == "eval"
    assert copy.deepcopy(ours).train().backbone.bn1.training  # the mode survives train()/copies
