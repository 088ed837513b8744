"""The uniform labeler (wsclip.serve.labelers) against the plain components it wraps."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsclip.errors import ShapeError, WsclipError
from wsclip.serve.labelers import (LabelerConfig, load_labeler, mask_annotations, plan_batches, refine_result,
                                   rle_decode, rle_encode)
from wsclip.vocab import VOC_CLASSES


def _images(rng, sizes):
    return [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for hw in sizes]


def test_plan_batches_groups_by_size_in_order():
    sizes = [(5, 7), (3, 3), (5, 7), (5, 7), (3, 3), (9, 1), (5, 7)]
    assert plan_batches(sizes, 2) == [[0, 2], [3, 6], [1, 4], [5]]
    assert plan_batches(sizes, 1) == [[0], [2], [3], [6], [1], [4], [5]]
    assert plan_batches([], 4) == []
    with pytest.raises(WsclipError):
        plan_batches(sizes, 0)


def _plain_counts(b: np.ndarray) -> list[int]:
    """Column-major run lengths starting with a zero run, by a plain loop."""
    counts, cur, run = [], 0, 0
    for v in b.T.reshape(-1):
        if int(v) != cur:
            counts.append(run)
            cur, run = int(v), 0
        run += 1
    counts.append(run)
    return counts


def _plain_decode_string(s: str) -> list[int]:
    """COCO's text counts decoded by a direct transcription of the format (deltas after the third)."""
    counts, p = [], 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        counts.append(x + (counts[-2] if len(counts) > 2 else 0))
    return counts


@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (7, 13), (64, 33), (1, 200)])
def test_rle_round_trip_and_counts(hw):
    rng = np.random.default_rng(hw[0] * 1000 + hw[1])
    for density in (0.0, 1.0, 0.02, 0.5):
        b = rng.random(hw) < density
        if hw == (2, 2) and density == 0.5:
            b = np.array([[0, 1], [1, 1]], bool)
        rle = rle_encode(b)
        assert rle["size"] == list(hw)
        assert _plain_decode_string(rle["counts"]) == _plain_counts(b)
        assert np.array_equal(rle_decode(rle), b)
    assert rle_encode(np.array([[0, 1], [1, 1]], bool))["counts"] == "13"  # runs 1 zero, 3 ones
    assert rle_encode(np.ones((1, 1), bool))["counts"] == "01"  # leading empty zero run


def test_mask_annotations():
    m = np.zeros((5, 6), np.uint8)
    m[1:3, 2:5] = 3
    m[4, 0] = 255
    (a,) = mask_annotations(m, VOC_CLASSES)
    assert a["category_id"] == 3 and a["category"] == "bird" and a["area"] == 6 and a["bbox"] == [2, 1, 3, 2]
    assert np.array_equal(rle_decode(a["segmentation"]), m == 3)


def test_cam_labeler_matches_cam_labeler_module(cam_ckpt):
    """Masks and CAMs equal CamLabeler.run on the same groups; missing labels come from the class scores."""
    from wsclip.label.cam_labeler import load_cam_labeler

    lab = load_labeler(LabelerConfig(model=str(cam_ckpt), device="cpu", batch_size=2, backend="eager"))
    assert lab.method == "cam" and lab.backend == "pytorch" and lab.classes == VOC_CLASSES
    ref = load_cam_labeler(cam_ckpt)
    rng = np.random.default_rng(1)
    sizes = [(33, 47), (40, 40), (33, 47), (33, 47), (17, 9)]
    images = _images(rng, sizes)
    given = np.zeros(20, np.float32)
    given[[2, 11]] = 1
    labels = [given, None, given, None, given]
    res = lab.label_batch(images, labels, want_cams=True)
    for idx in plan_batches(sizes, 2):
        x = torch.from_numpy(np.stack([images[i] for i in idx])).permute(0, 3, 1, 2)
        with torch.no_grad():
            probs = torch.sigmoid(ref.camnet.classify(ref.normalize(x))).numpy()
        y = []
        for j, i in enumerate(idx):
            if labels[i] is not None:
                y.append(labels[i])
            else:
                p = (probs[j] >= 0.5).astype(np.float32)
                p[probs[j].argmax()] = 1
                y.append(p)
        y = np.stack(y)
        out = ref.run(x.numpy(), y)
        for j, i in enumerate(idx):
            keys = np.nonzero(y[j])[0]
            assert np.array_equal(res[i].mask, out["mask"][j].astype(np.uint8))
            assert np.array_equal(res[i].keys, keys)
            np.testing.assert_allclose(res[i].cams, out["cams"][j, keys], rtol=0, atol=1e-6)
            assert res[i].predicted == (labels[i] is None)
            assert res[i].mask.shape == sizes[i] and res[i].mask.dtype == np.uint8
    # a whole list and its groups labelled separately agree exactly (same compositions)
    again = lab.label_batch([images[0], images[2]], [labels[0], labels[2]])
    assert np.array_equal(again[0].mask, res[0].mask) and np.array_equal(again[1].mask, res[2].mask)


def test_labeler_input_errors(cam_ckpt):
    lab = load_labeler(LabelerConfig(model=str(cam_ckpt), device="cpu", predict="none"))
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(WsclipError, match="--labels"):
        lab.label_batch([img], [None])
    with pytest.raises(ShapeError):
        lab.label_batch([img], [np.ones(3)])
    with pytest.raises(ShapeError):
        lab.label_batch([img.astype(np.float32)], [np.ones(20)])
    with pytest.raises(ShapeError):
        lab.label_batch([img, img], [np.ones(20)])
    with pytest.raises(WsclipError):
        load_labeler(LabelerConfig(model=str(cam_ckpt), method="nope"))
    with pytest.raises(WsclipError, match="--irn"):
        load_labeler(LabelerConfig(model=str(cam_ckpt), refine="irn"))


def test_crf_refinement_matches_dense_crf(cam_ckpt, voc14):
    from wsclip.io import read_image
    from wsclip.refine.crf import dense_crf

    image = read_image(voc14 / "JPEGImages" / "2007_000033.jpg")[::8, ::8].copy()  # 65x65
    lab = load_labeler(LabelerConfig(model=str(cam_ckpt), device="cpu", refine="crf"))
    y = np.zeros(20, np.float32)
    y[[0, 14]] = 1
    (r,) = lab.label_batch([image], [y], want_cams=True)
    stacked = np.concatenate([np.full((1, *image.shape[:2]), lab.bg, np.float32), r.cams])
    assert np.array_equal(r.crf_scores, stacked) and r.crf_values.tolist() == [0, 1, 15]
    expect = np.array([0, 1, 15], np.uint8)[dense_crf(image, stacked).argmax(0)]
    assert np.array_equal(refine_result(image, r).mask, expect)
    # --compat official: the labeler's CRF sees the public code's wrapped BGR image
    from wsclip.refine.crf import CRFParams

    # (its CAMs are the official path's own: padded stride grid, so they are stacked from `o` itself)
    official = load_labeler(LabelerConfig(model=str(cam_ckpt), device="cpu", refine="crf", compat="official"))
    (o,) = official.label_batch([image], [y], want_cams=True)
    assert o.crf_params.uint8_wrap is True and not r.crf_params.uint8_wrap
    o_stacked = np.concatenate([np.full((1, *image.shape[:2]), official.bg, np.float32), o.cams])
    values = np.array([0, 1, 15], np.uint8)
    want = values[dense_crf(image, o_stacked, CRFParams(uint8_wrap=True)).argmax(0)]
    assert np.array_equal(refine_result(image, o).mask, want)
    assert not np.array_equal(want, values[dense_crf(image, o_stacked).argmax(0)])  # the wrap changes the masks


def test_seg_labeler_matches_seg_module(tmp_path):
    from wsclip.label.seg_labeler import SegLabeler
    from wsclip.models.seg import build_seg_model, save_seg_model

    torch.manual_seed(0)
    net = build_seg_model("deeplabv2", "tiny", num_classes=21).eval()
    path = tmp_path / "seg.safetensors"
    save_seg_model(path, net, VOC_CLASSES)
    lab = load_labeler(LabelerConfig(model=str(path), device="cpu"))
    assert lab.method == "seg" and not lab.needs_labels
    rng = np.random.default_rng(2)
    images = _images(rng, [(41, 29), (41, 29)])
    only = np.zeros(20, np.float32)
    only[[4, 6]] = 1
    res = lab.label_batch(images, [None, only])
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    out = SegLabeler(net, VOC_CLASSES).run(x)
    assert np.array_equal(res[0].mask, out["mask"][0].astype(np.uint8))
    allowed = np.r_[1, only] > 0
    expect = np.where(allowed[:, None, None], out["probs"][1], -1).argmax(0)
    assert np.array_equal(res[1].mask, expect.astype(np.uint8))
    assert set(np.unique(res[1].mask)) <= {0, 5, 7}


def test_onnx_backend_agrees_with_pytorch(cam_ckpt, tmp_path):
    from wsclip.export.onnx import export_onnx

    path = tmp_path / "cam.onnx"
    export_onnx("camnet", cam_ckpt, path, hw=(32, 32))
    ort = load_labeler(LabelerConfig(model=str(path), device="cpu", predict="none"))
    pt = load_labeler(LabelerConfig(model=str(cam_ckpt), device="cpu", predict="none"))
    assert ort.backend == "onnxruntime" and ort.classes == pt.classes
    rng = np.random.default_rng(3)
    images = _images(rng, [(45, 61), (45, 61), (30, 30)])
    y = np.zeros(20, np.float32)
    y[[1, 8, 19]] = 1
    a = ort.label_batch(images, [y] * 3, want_cams=True)
    b = pt.label_batch(images, [y] * 3, want_cams=True)
    for ra, rb in zip(a, b):
        np.testing.assert_allclose(ra.cams, rb.cams, rtol=0, atol=1e-4)
        assert (ra.mask == rb.mask).mean() > 0.999
    with pytest.raises(WsclipError, match="clip"):
        load_labeler(LabelerConfig(model=str(path), device="cpu", predict="cam"))


def test_irn_refinement_wiring(cam_ckpt, tmp_path):
    from wsclip.models.irn import build_irn, save_irn
    from wsclip.refine.random_walk import irn_refine

    torch.manual_seed(1)
    irn = build_irn("tiny").eval()
    irn_path = tmp_path / "irn.safetensors"
    save_irn(irn_path, irn)
    lab = load_labeler(LabelerConfig(model=str(cam_ckpt), device="cpu", refine="irn", irn=str(irn_path)))
    rng = np.random.default_rng(4)
    (image,) = _images(rng, [(37, 50)])
    y = np.zeros(20, np.float32)
    y[[3, 9]] = 1
    (r,) = lab.label_batch([image], [y], want_cams=True)
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    with torch.no_grad():
        edge = irn.boundary(lab.module.normalize(x))[0]
        cams, _ = lab.module(x, None)
    small = F.interpolate(cams[:, [3, 9]], size=edge.shape, mode="bilinear", align_corners=False)[0]
    small = small / (small.amax(dim=(1, 2), keepdim=True) + 1e-5)
    _, labels = irn_refine(small, edge, size=(37, 50))
    assert np.array_equal(r.mask, np.array([0, 4, 10], np.uint8)[labels.numpy()])
    (empty,) = lab.label_batch([image], [np.zeros(20, np.float32)])  # no class: all background
    assert not empty.mask.any() and empty.keys.size == 0


def test_clip_zero_shot_and_clip_es(tmp_path, tiny_vit_clip):
    from wsclip.label.clip_es import ClipEs
    from wsclip.models.clip import load_clip

    clip_path = tiny_vit_clip
    lab = load_labeler(LabelerConfig(clip=str(clip_path), device="cpu", label_threshold=0.06))
    assert lab.method == "clip-es" and lab.describe()["predict"] == "clip-zero-shot"
    rng = np.random.default_rng(5)
    images = _images(rng, [(40, 56), (40, 56)])
    y = np.zeros(20, np.float32)
    y[[6, 14]] = 1
    res = lab.label_batch(images, [y, None], want_cams=True)
    # zero-shot reference: softmax over "a photo of {name}." prompts
    clip = load_clip(clip_path)
    names = [{"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}.get(c, c)
             for c in VOC_CLASSES]
    with torch.no_grad():
        probs = torch.softmax(100 * clip.encode_image(clip.preprocess_tensor(images[1])) @
                              clip.encode_text([f"a photo of {n}." for n in names]).T, -1)[0].numpy()
    pred = np.nonzero((probs >= 0.06) | (np.arange(20) == probs.argmax()))[0]
    assert res[1].predicted and np.array_equal(res[1].keys, pred)
    np.testing.assert_allclose(res[1].scores, probs, rtol=0, atol=1e-5)
    # CLIP-ES pseudo mask reference: argmax over [(1 - max_c F_c), F_c]
    es = ClipEs(clip, VOC_CLASSES)
    items = es.label(images, [[6, 14], pred.tolist()])
    for r, item, keys in zip(res, items, ([6, 14], pred)):
        high = item["high_res"].float()
        stacked = torch.cat([(1 - high.amax(0))[None], high])
        expect = np.concatenate([[0], np.asarray(keys) + 1])[stacked.argmax(0).numpy()]
        assert np.array_equal(r.mask, expect.astype(np.uint8))
        np.testing.assert_allclose(r.cams, high.numpy(), rtol=0, atol=1e-6)


def test_tensor_images_as_decoded_on_a_gpu_give_the_same_masks(cam_ckpt):
    """CHW uint8 tensors (what nvJPEG decoding yields) mixed with HWC arrays label exactly like arrays."""
    lab = load_labeler(LabelerConfig(model=str(cam_ckpt), device="cpu", predict="none"))
    rng = np.random.default_rng(6)
    a, b = _images(rng, [(21, 34), (21, 34)])
    y = np.zeros(20, np.float32)
    y[[5, 7]] = 1
    ref = lab.label_batch([a, b], [y, y])
    got = lab.label_batch([a, torch.from_numpy(b).permute(2, 0, 1).contiguous()], [y, y])
    assert all(np.array_equal(r.mask, g.mask) for r, g in zip(ref, got))
