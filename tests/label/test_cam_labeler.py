"""CamLabeler / SegLabeler (the deployable PyTorch labelers) against plain step-by-step references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsclip.errors import ShapeError, WsclipError
from wsclip.label.cam_labeler import CamLabeler, Labeler
from wsclip.models.camnet import build_camnet

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _reference(net, images_u8, labels, scales=(1.0,), flip=False, bg=0.15):
    x = (images_u8.float() / 255 - MEAN) / STD
    h, w = x.shape[-2:]
    total = 0
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        for fl in ((False, True) if flip else (False,)):
            v = xs.flip(-1) if fl else xs
            c = F.interpolate(F.relu(net(v)), size=(h, w), mode="bilinear", align_corners=False)
            total = total + (c.flip(-1) if fl else c)
    cams = total * labels[:, :, None, None]
    cams = cams / (cams.flatten(2).max(-1).values[:, :, None, None] + 1e-5)
    scores = torch.cat([torch.full_like(cams[:, :1], bg), cams], 1)
    return cams, scores.argmax(1)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_camnet("tiny", 5).eval()


@pytest.mark.parametrize("scales,flip", [((1.0,), False), ((1.0, 0.5, 1.5), True)])
def test_matches_reference(net, scales, flip):
    lab = CamLabeler(net, list("abcde"), scales=scales, flip=flip, bg_threshold=0.2)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (3, 3, 53, 67), generator=g, dtype=torch.uint8)
    y = (torch.rand(3, 5, generator=g) > 0.4).float()
    with torch.no_grad():
        cams, mask = lab(x, y)
        ref_cams, ref_mask = _reference(net, x, y, scales, flip, bg=0.2)
    torch.testing.assert_close(cams, ref_cams, rtol=1e-5, atol=1e-6)
    assert torch.equal(mask, ref_mask) and mask.dtype == torch.int64
    assert cams.shape == (3, 5, 53, 67) and float(cams.max()) <= 1.0 and float(cams.min()) >= 0.0


def test_run_interface(net):
    lab = CamLabeler(net, list("abcde"))
    assert isinstance(lab, Labeler) and lab.input_names == ("images", "labels")
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 40, 40), dtype=np.uint8)
    out = lab.run(x)
    assert out["cams"].dtype == np.float32 and out["mask"].dtype == np.int64 and out["mask"].shape == (2, 40, 40)
    np.testing.assert_allclose(lab.run(x.astype(np.float32) / 255)["cams"], out["cams"], atol=1e-5)
    np.testing.assert_array_equal(lab.run(x, np.ones((2, 5)))["mask"], out["mask"])
    with pytest.raises(ShapeError):
        lab.run(x[:, :2])
    with pytest.raises(ShapeError):
        lab.run(x, np.ones((2, 4)))
    with pytest.raises(ShapeError):
        CamLabeler(net, list("abc"))


def test_seg_labeler_matches_predict():
    from wsclip.label.seg_labeler import SegLabeler
    from wsclip.models.seg import build_seg_model

    torch.manual_seed(0)
    seg = build_seg_model("deeplabv2", "tiny", 4).eval()
    lab = SegLabeler(seg, ["a", "b", "c"], scales=(1.0, 0.5), flip=True)
    x = torch.randint(0, 256, (1, 3, 29, 35), dtype=torch.uint8)
    out = lab.run(x)
    with torch.no_grad():
        want = seg.predict((x.float() / 255 - MEAN) / STD, (1.0, 0.5), True)
    np.testing.assert_allclose(out["probs"], want.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["mask"], want.argmax(1).numpy())
    with pytest.raises(WsclipError, match="no class-selection"):
        lab.run(x, labels=np.ones((1, 3)))
