"""CAM network: output stride 16 (8 for tiny-s8) for any size, modes, frozen stem, checkpoints."""

import json
import math

import numpy as np
import pytest
import torch

from wsclip.errors import CheckpointError, WsclipError
from wsclip.models.camnet import build_camnet, load_camnet, save_camnet


@pytest.mark.parametrize("hw", [(64, 64), (65, 97), (33, 17), (16, 16), (1, 1)])
def test_tiny_output_stride_16_any_size(hw):
    net = build_camnet("tiny", num_classes=5).eval()
    out = net(torch.randn(2, 3, *hw))
    assert out.shape == (2, 5, math.ceil(hw[0] / 16), math.ceil(hw[1] / 16))


@pytest.mark.parametrize("hw", [(128, 128), (65, 97), (33, 17), (8, 8), (1, 1)])
def test_tiny_s8_output_stride_8_any_size(hw):
    from wsclip.models.camnet import backbone_strides

    net = build_camnet("tiny-s8", num_classes=6).eval()
    assert net.stride == 8 and backbone_strides("tiny-s8") == (4, 4, 8, 8, 8)
    with torch.no_grad():
        out = net(torch.randn(2, 3, *hw))
    assert out.shape == (2, 6, math.ceil(hw[0] / 8), math.ceil(hw[1] / 8))
    assert build_camnet("tiny", 6).stride == 16 and backbone_strides("resnet50") == (4, 4, 8, 16, 16)


def test_official_cam_of_a_stride_8_net_sits_on_its_own_grid():
    """A stride-8 map upsampled as a stride-16 one would shift and stretch: the peak must stay where it is."""
    from wsclip.label.cam_labeler import CamLabeler
    from wsclip.label.clims_cam import cam_maps

    class Peak(torch.nn.Module):  # a 'network' whose stride-8 map is one hot cell
        stride = 8

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            out = torch.zeros(x.shape[0], 1, -(-x.shape[2] // 8), -(-x.shape[3] // 8))
            out[:, 0, 3, 1] = 1.0
            return out

    hw = (72, 40)  # not a multiple of 16
    lab = CamLabeler(Peak(), ["peak"], scales=(1.0,), flip=False, preprocess="pil")
    _, high = cam_maps(lab, np.zeros((*hw, 3), np.uint8), [0])
    y, x = divmod(int(high[0].argmax()), hw[1])
    assert 24 <= y < 32 and 8 <= x < 16  # cell (3, 1) of the 8 px grid


def test_resnet50_stride_16_without_dilation():
    net = build_camnet("resnet50", num_classes=20).eval()
    b4 = net.backbone.layer4[0]
    assert b4.conv2.stride == (1, 1) and b4.downsample[0].stride == (1, 1)
    assert all(m.dilation == (1, 1) for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert net.backbone.layer3[0].conv2.stride == (2, 2)
    assert net.classifier.weight.shape == (20, 2048, 1, 1) and net.classifier.bias is None
    with torch.no_grad():
        assert net(torch.randn(1, 3, 80, 48)).shape == (1, 20, 5, 3)


def test_modes_classify_and_param_groups():
    net = build_camnet("tiny", num_classes=4).eval()
    x = torch.randn(3, 3, 48, 40)
    with torch.no_grad():
        raw = net(x)
        torch.testing.assert_close(net.cam(x, "relu"), raw.clamp(min=0))
        torch.testing.assert_close(net.cam(x, "sigmoid"), torch.sigmoid(raw))
        torch.testing.assert_close(net.classify(x), raw.mean(dim=(2, 3)))
    with pytest.raises(WsclipError):
        net.cam(x, "softmax")
    back, head = net.param_groups()
    assert head == [net.classifier.weight]
    frozen = {id(p) for p in (*net.backbone.conv1.parameters(), *net.backbone.bn1.parameters())}
    assert frozen and not frozen & {id(p) for p in back}
    assert len(back) + len(head) + len(frozen) == len(list(net.parameters()))


def test_stem_bn_and_freeze_bn_stay_in_eval():
    net = build_camnet("tiny", num_classes=3)
    net.train()
    assert not net.backbone.bn1.training and net.backbone.layer1[0].bn1.training
    stats = net.backbone.layer2[0].bn1.running_mean.clone()
    net.freeze_bn().train()
    assert not any(m.training for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    net(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(net.backbone.layer2[0].bn1.running_mean, stats)


def test_checkpoint_reloads_identically(tmp_path):
    net = build_camnet("tiny", num_classes=3)
    net.train()
    net(torch.randn(4, 3, 32, 32))  # move BN running statistics away from their init
    path = tmp_path / "cam.safetensors"
    save_camnet(path, net, ["a", "b", "c"], preset="synth", extra={"note": 1})
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["kind"] == "camnet" and meta["backbone"] == "tiny" and meta["num_classes"] == 3
    assert meta["classes"] == ["a", "b", "c"] and meta["preset"] == "synth" and "wsclip_version" in meta
    loaded, meta2 = load_camnet(path)
    assert meta2["classes"] == ["a", "b", "c"] and not loaded.training
    for (k, a), (k2, b) in zip(net.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    x = torch.randn(2, 3, 45, 61)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), loaded(x))


def test_wrong_checkpoints_are_clear_errors(tmp_path):
    from wsclip.io import save_checkpoint

    net = build_camnet("tiny", num_classes=3)
    other = tmp_path / "clip.safetensors"
    save_checkpoint(other, {"w": torch.zeros(2)}, {"kind": "clip", "name": "x"})
    with pytest.raises(CheckpointError, match="is a CLIP checkpoint, not a CAM network"):
        load_camnet(other)
    # sidecar claims another architecture than the weights
    path = tmp_path / "cam.safetensors"
    save_camnet(path, net, ["a", "b", "c"])
    side = path.with_suffix(".json")
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "num_classes": 5}))
    with pytest.raises(CheckpointError, match="does not hold the weights of a tiny CAM network with 5 classes"):
        load_camnet(path)
    with pytest.raises(WsclipError):
        save_camnet(path, net, ["a"])
    with pytest.raises(WsclipError, match="unknown CAM backbone"):
        build_camnet("vgg16")


def test_pretrained_state_dict_loading(tmp_path):
    src = build_camnet("resnet18", num_classes=2)
    import torchvision

    tv = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(tv.state_dict(), path)
    net = build_camnet("resnet18", num_classes=2, pretrained=path)
    torch.testing.assert_close(net.backbone.layer3[0].conv1.weight, tv.layer3[0].conv1.weight)
    assert not torch.equal(src.backbone.layer3[0].conv1.weight, net.backbone.layer3[0].conv1.weight)
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError):
        build_camnet("resnet18", num_classes=2, pretrained=bad)
