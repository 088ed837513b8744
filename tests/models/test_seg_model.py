"""DeepLab segmentation network: strides, heads against plain references, checkpoints, ONNX."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from wsclip.errors import CheckpointError, MissingFileError, WsclipError
from wsclip.models.seg import build_backbone, build_seg_model, load_seg_model, save_seg_model


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def ceil_div(a, b):
    return -(-a // b)


@pytest.mark.parametrize("arch,stride", [("deeplabv2", 8), ("deeplabv3plus", 4)])
@pytest.mark.parametrize("hw", [(33, 47), (64, 64), (17, 9)])
def test_tiny_logit_shapes_at_odd_sizes(arch, stride, hw):
    net = build_seg_model(arch, "tiny", 5).eval()
    with torch.no_grad():
        y = net(torch.randn(2, 3, *hw))
        p = net.predict(torch.randn(1, 3, *hw), scales=(0.5, 1.0, 1.25), flip=True)
    assert y.shape == (2, 5, ceil_div(hw[0], stride), ceil_div(hw[1], stride))
    assert net.stride == stride
    assert p.shape == (1, 5, *hw)
    assert torch.allclose(p.sum(1), torch.ones(1, *hw), atol=1e-5)


def test_resnet_backbones_are_dilated_to_stride_8():
    net = build_seg_model("deeplabv2", "resnet50", 21).eval()
    with torch.no_grad():
        y = net(torch.randn(1, 3, 41, 57))
    assert y.shape == (1, 21, 6, 8)
    for layer, d in ((net.backbone.layer3, 2), (net.backbone.layer4, 4)):
        convs = [m for m in layer.modules() if isinstance(m, nn.Conv2d)]
        assert all(c.stride == (1, 1) for c in convs)
        assert all(c.dilation == (d, d) and c.padding == (d, d) for c in convs if c.kernel_size == (3, 3))
    b101 = build_backbone("resnet101", output_stride=16)
    assert len(b101.layer3) == 23 and b101.layer3[0].conv2.stride == (2, 2)
    assert b101.layer4[0].conv2.stride == (1, 1) and b101.layer4[1].conv2.dilation == (2, 2)


def test_v2_head_is_the_sum_of_four_dilated_convs():
    net = build_seg_model("deeplabv2", "tiny", 4).eval()
    assert [c.dilation[0] for c in net.head.convs] == [6, 12, 18, 24]
    for c in net.head.convs:  # non-zero biases so the reference checks them too
        nn.init.normal_(c.bias)
    x = torch.randn(2, 3, 50, 35)
    with torch.no_grad():
        feats = net.backbone.layer4(net.backbone.layer3(net.backbone.layer2(net.backbone.layer1(
            net.backbone.maxpool(net.backbone.relu(net.backbone.bn1(net.backbone.conv1(x))))))))
        ref = sum(F.conv2d(feats, c.weight, c.bias, padding=r, dilation=r)
                  for c, r in zip(net.head.convs, (6, 12, 18, 24)))
        got = net(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_predict_matches_plain_multiscale_flip_reference():
    net = build_seg_model("deeplabv2", "tiny", 6, rates=(1, 2)).eval()
    x = torch.randn(1, 3, 37, 29)
    ref = torch.zeros(1, 6, 37, 29)
    with torch.no_grad():
        for s in (0.75, 1.0, 1.5):
            xs = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False) if s != 1 else x
            assert xs.shape[-2:] == (int(37 * s), int(29 * s))
            for flip in (False, True):
                v = xs.flip(-1) if flip else xs
                p = F.interpolate(net(v), size=(37, 29), mode="bilinear", align_corners=False).softmax(1)
                ref += p.flip(-1) if flip else p
        got = net.predict(x, scales=(0.75, 1.0, 1.5), flip=True)
    torch.testing.assert_close(got, ref / 6, rtol=1e-5, atol=1e-6)


def test_param_groups_cover_trainable_parameters_and_freeze_bn():
    net = build_seg_model("deeplabv3plus", "tiny", 3)
    groups = net.param_groups(10.0, 20.0)
    assert [g["lr_mult"] for g in groups] == [1.0, 10.0, 20.0]
    assert groups[2]["weight_decay"] == 0.0 and "weight_decay" not in groups[1]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in net.parameters() if p.requires_grad}
    assert all(p.ndim == 1 for p in groups[2]["params"]) and all(p.ndim > 1 for p in groups[1]["params"])

    net.freeze_bn().train()
    bns = [m for m in net.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training and not m.weight.requires_grad for m in bns)
    head_bn = [m for m in net.head.modules() if isinstance(m, nn.BatchNorm2d)]
    assert head_bn and all(m.training for m in head_bn)
    frozen = {id(p) for m in bns for p in m.parameters()}
    assert not frozen & {id(p) for g in net.param_groups() for p in g["params"]}
    before = bns[0].running_mean.clone()
    net(torch.randn(2, 3, 32, 32))
    assert torch.equal(bns[0].running_mean, before)


def test_imagenet_state_dict_loading(tmp_path):
    src = build_backbone("tiny")
    sd = {k: v for k, v in src.state_dict().items()}
    sd["fc.weight"] = torch.zeros(10, 128)  # a classifier head is ignored
    torch.save(sd, tmp_path / "tiny.pth")
    net = build_seg_model("deeplabv2", "tiny", 3, pretrained=tmp_path / "tiny.pth")
    assert torch.equal(net.backbone.conv1.weight, src.conv1.weight)
    assert torch.equal(net.backbone.layer4[0].conv2.weight, src.layer4[0].conv2.weight)
    with pytest.raises(MissingFileError):
        build_seg_model("deeplabv2", "tiny", 3, pretrained=tmp_path / "nope.pth")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError):
        build_seg_model("deeplabv2", "tiny", 3, pretrained=tmp_path / "bad.pth")


@pytest.mark.parametrize("arch", ["deeplabv2", "deeplabv3plus"])
def test_checkpoint_round_trip(tmp_path, arch):
    net = build_seg_model(arch, "tiny", 4, rates=(2, 3)).eval()
    for m in net.modules():  # non-trivial BN statistics must survive the round trip
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
    path = tmp_path / "seg.safetensors"
    save_seg_model(path, net, ["a", "b", "c"], extra={"steps": 3})
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["kind"] == "seg" and meta["arch"] == arch and meta["backbone"] == "tiny"
    assert meta["num_classes"] == 4 and meta["classes"] == ["a", "b", "c"] and meta["rates"] == [2, 3]
    loaded, meta2 = load_seg_model(path)
    x = torch.randn(1, 3, 40, 33)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
    assert meta2["steps"] == 3 and not loaded.training


def test_checkpoint_errors(tmp_path):
    net = build_seg_model("deeplabv2", "tiny", 4)
    with pytest.raises(WsclipError, match="3 outputs|4 outputs"):
        save_seg_model(tmp_path / "x.safetensors", net, ["a", "b"])
    from wsclip.models.camnet import build_camnet, save_camnet

    save_camnet(tmp_path / "cam.safetensors", build_camnet("tiny", 3), ["a", "b", "c"])
    with pytest.raises(CheckpointError, match="not a segmentation network"):
        load_seg_model(tmp_path / "cam.safetensors")
    path = tmp_path / "seg.safetensors"
    save_seg_model(path, net, ["a", "b", "c"])
    side = path.with_suffix(".json")
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "backbone": "resnet50"}))
    with pytest.raises(CheckpointError, match="does not hold the weights of a deeplabv2"):
        load_seg_model(path)
    side.write_text(json.dumps({**meta, "arch": "unet"}))
    with pytest.raises(CheckpointError, match="arch"):
        load_seg_model(path)
    with pytest.raises(WsclipError):
        build_seg_model("deeplabv2", "vgg16", 3)


def test_onnx_export_with_dynamic_size_matches_pytorch(tmp_path):
    ort = pytest.importorskip("onnxruntime")

    class Probs(nn.Module):  # what a deployed model computes: multi-scale + flip probabilities
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.predict(x, scales=(0.5, 1.0), flip=True)

    net = build_seg_model("deeplabv3plus", "tiny", 4).eval()
    path = tmp_path / "seg.onnx"
    model = Probs(net).eval()  # export restores the top module's mode on every child
    torch.onnx.export(model, (torch.randn(1, 3, 48, 40),), str(path), input_names=["x"], output_names=["p"],
                      dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}, "p": {0: "b", 2: "h", 3: "w"}},
                      opset_version=17, dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 61, 37)
    (got,) = sess.run(None, {"x": x.numpy()})
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
