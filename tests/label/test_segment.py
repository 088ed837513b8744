"""`wsclip segment`: multi-scale + flip inference against a plain reference, CRF, resume, outputs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from wsclip.errors import CheckpointError, WsclipError
from wsclip.io import read_image, read_mask
from wsclip.label.segment import parse_scales, segment, segment_probs
from wsclip.models.seg import build_seg_model, save_seg_model

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def model(tmp_path):
    torch.manual_seed(1)
    net = build_seg_model("deeplabv2", "tiny", 4, rates=(1, 2)).eval()
    for c in net.head.convs:  # confident, varied predictions (the init is near-uniform)
        torch.nn.init.normal_(c.weight, std=0.3)
        torch.nn.init.normal_(c.bias, std=1.0)
    path = tmp_path / "seg.safetensors"
    save_seg_model(path, net, ["a", "b", "c"])
    return net, path


@pytest.fixture()
def images(tmp_path):
    """A folder of images of odd sizes, one in a sub-folder (ids keep the relative path)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    sizes = {"a": (37, 29), "b": (20, 51), "sub/c": (33, 33)}
    for name, (h, w) in sizes.items():
        base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)  # smooth blobs, not pure noise
        img = np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR))
        Image.fromarray(img).save(root / f"{name}.png")
    return root, sizes


def reference_probs(net, image, scales, flip):
    x = (torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255 - MEAN) / STD
    h, w = image.shape[:2]
    total = torch.zeros(1, net.num_classes, h, w)
    views = 0
    with torch.no_grad():
        for s in scales:
            xs = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False) if s != 1 else x
            for fl in ([False, True] if flip else [False]):
                v = xs.flip(-1) if fl else xs
                p = F.interpolate(net(v), size=(h, w), mode="bilinear", align_corners=False).softmax(1)
                total += p.flip(-1) if fl else p
                views += 1
    return total[0] / views


def test_segment_matches_reference_and_resumes(model, images, tmp_path):
    net, path = model
    root, sizes = images
    out = tmp_path / "out"
    res = segment(path, root, out, scales=(0.5, 1.0, 1.5), flip=True, num_workers=0, device="cpu")
    assert res == {"written": 3, "skipped": 0, "failed": [], "total": 3}
    labels = set()
    for name, hw in sizes.items():
        with Image.open(out / f"{name}.png") as im:
            assert im.mode == "P" and im.size == (hw[1], hw[0])
        got = read_mask(out / f"{name}.png")
        image = read_image(root / f"{name}.png")
        ref = reference_probs(net, image, (0.5, 1.0, 1.5), True)
        top2 = ref.topk(2, dim=0).values
        sure = (top2[0] - top2[1]) > 1e-4  # ties may break either way
        assert np.array_equal(got[sure.numpy()], ref.argmax(0).numpy()[sure.numpy()])
        labels |= set(np.unique(got).tolist())
    assert labels <= {0, 1, 2, 3} and len(labels) > 1

    # resume: finished masks are skipped, a missing one is redone identically
    before = (out / "sub" / "c.png").read_bytes()
    (out / "sub" / "c.png").unlink()
    res = segment(path, root, out, scales=(0.5, 1.0, 1.5), flip=True, num_workers=1, device="cpu")
    assert res == {"written": 1, "skipped": 2, "failed": [], "total": 3}
    assert (out / "sub" / "c.png").read_bytes() == before


def test_segment_probs_single_scale_is_softmax_of_upsampled_logits(model, images):
    net, _ = model
    root, _ = images
    image = read_image(root / "b.png")
    got = segment_probs(net, image, scales=(1.0,), flip=False)
    torch.testing.assert_close(got, reference_probs(net, image, (1.0,), False), rtol=1e-5, atol=1e-6)
    assert got.shape == (4, 20, 51)


def test_crf_refinement_in_processes_matches_inline(model, images, tmp_path):
    pytest.importorskip("pydensecrf.densecrf")
    from wsclip.refine.crf import dense_crf

    net, path = model
    root, _ = images
    one = segment(path, root, tmp_path / "one", scales=(1.0,), flip=False, crf=True, crf_workers=1,
                  num_workers=0, device="cpu")
    two = segment(path, root, tmp_path / "two", scales=(1.0,), flip=False, crf=True, crf_workers=2,
                  num_workers=0, device="cpu")
    assert one["written"] == two["written"] == 3
    for name in ("a", "b", "sub/c"):
        a, b = read_mask(tmp_path / "one" / f"{name}.png"), read_mask(tmp_path / "two" / f"{name}.png")
        assert np.array_equal(a, b)
        image = read_image(root / f"{name}.png")
        probs = segment_probs(net, image, (1.0,), False).numpy()
        assert np.array_equal(a, dense_crf(image, probs).argmax(0))


def test_segment_errors(model, images, tmp_path):
    _, path = model
    root, _ = images
    with pytest.raises(WsclipError):
        parse_scales("1.0,x")
    with pytest.raises(WsclipError):
        parse_scales("0,1")
    assert parse_scales("0.5, 1,1.5") == [0.5, 1.0, 1.5]
    from wsclip.models.camnet import build_camnet, save_camnet

    save_camnet(tmp_path / "cam.safetensors", build_camnet("tiny", 3), ["a", "b", "c"])
    with pytest.raises(CheckpointError, match="wsclip train seg"):
        segment(tmp_path / "cam.safetensors", root, tmp_path / "o", num_workers=0, device="cpu")
