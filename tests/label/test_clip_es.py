"""CLIP-ES: the batched GradCAM equals the one-class-at-a-time reference; CAA, sizes, bucketing, CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from PIL import Image

from wsclip.cli import main
from wsclip.errors import WsclipError
from wsclip.label.clip_es import (
    ClipEs, ClipEsConfig, bucket_by_shape, caa_layer_indices, gradcam_minmax, make_clip_es_cams, rounded_size,
)
from wsclip.models.clip import ClipModel, load_clip, save_clip
from wsclip.refine.caa import box_mask
from wsclip.vocab import VOC_CLASSES

TEXT = {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}


def tiny_cfg(patch=8, layers=3):
    vision = {"image_size": 32, "layers": layers, "width": 48, "patch_size": patch, "head_width": 16}
    return {"embed_dim": 16, "quick_gelu": True, "vision_cfg": vision, "text_cfg": TEXT}


def tiny_clip(patch=8, layers=3, seed=0) -> ClipModel:
    torch.manual_seed(seed)
    cfg = tiny_cfg(patch, layers)
    model = CLIP(**cfg)
    with torch.no_grad():  # livelier layer norms than the default init
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return ClipModel(model, "tiny-vit", cfg)


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


def reference_cams(es: ClipEs, image: np.ndarray, keys):
    """Public-code structure: batch 1, one forward + one backward per class, then CAA per class."""
    clip = es.clip
    pixels = es.preprocess(image)[None]
    fg = es.fg_text[list(keys)]
    text = torch.cat([fg, es.bg_text])
    raws, refs = [], []
    for n, _ in enumerate(keys):
        trace = clip.vit_forward(pixels, attn_layers=es.attn_layers)
        visual = clip.model.visual
        feat = visual.ln_post(trace.tokens[:, 1:]).mean(1) @ visual.proj
        probs = (es.logit_scale * F.normalize(feat, dim=-1) @ text.T).softmax(-1)
        (grad,) = torch.autograd.grad(probs[0, n], trace.ln1)
        h, w = trace.grid
        acts = trace.ln1[0, 1:].detach().double()  # (N, C)
        weights = grad[0, 1:].double().mean(0)  # (C,)
        cam = torch.relu(acts @ weights).reshape(h, w)
        cam = cam - cam.min()
        cam = cam / (cam.max() + 1e-7)
        raws.append(cam)
        # CAA, literal: average the attention of the chosen layers, drop CLS, 3 x (cols, rows), sym, square
        attn = torch.stack(trace.attn).mean(0)[0, 1:, 1:].double()
        d = attn.clone()
        for _ in range(3):
            d = d / d.sum(0, keepdim=True)
            d = d / d.sum(1, keepdim=True)
        s = (d + d.T) / 2
        a = s @ s
        b = torch.from_numpy(box_mask(cam.numpy(), es.box_threshold)).double()
        f = a @ (b * cam).reshape(-1)
        refs.append(((f - f.min()) / (f.max() - f.min() + 1e-7)).reshape(h, w))
    return torch.stack(raws), torch.stack(refs)


def max_rel(got, ref):
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def test_batched_gradcam_and_caa_equal_per_class_reference(clip):
    es = ClipEs(clip, VOC_CLASSES, ClipEsConfig(logit_scale=10.0, compute="fp32"))
    rng = np.random.default_rng(0)
    # both round up to 40x56 with patch 8 -> one batch; different class counts (3 and 1 slots)
    images = [rng.integers(0, 256, (37, 50, 3), dtype=np.uint8), rng.integers(0, 256, (33, 49, 3), dtype=np.uint8)]
    keys = [[0, 4, 14], [7]]
    res = es.label(images, keys)  # one batched forward + one batched backward for all 4 maps
    batched = es.forward(torch.stack([es.preprocess(x) for x in images]), torch.tensor([[0, 4, 14], [7, -1, -1]]))
    for i, (im, k, r) in enumerate(zip(images, keys, res)):
        raw_ref, caa_ref = reference_cams(es, im, k)
        assert raw_ref.amax((1, 2)).min() > 0.99  # non-trivial maps
        assert r["high_res_raw"].shape == (len(k), *im.shape[:2])
        assert r["cam"].shape == (len(k), 5, 7)
        assert max_rel(batched["raw"][i, : len(k)], raw_ref) < 1e-4
        assert max_rel(r["cam"], caa_ref) < 1e-4
        torch.testing.assert_close(r["high_res_raw"], F.interpolate(raw_ref[None].float(), size=im.shape[:2],
                                                                   mode="bilinear", align_corners=False)[0],
                                   rtol=0, atol=1e-4)
    assert batched["raw"][1, 1:].abs().max() == 0  # empty slots are zero


def test_bf16_compute_within_tolerance_of_fp32_and_auto_is_deterministic(clip):
    from wsclip.label.backends import cpu_has_bf16
    from wsclip.label.clip_es import BF16_TOLERANCE

    rng = np.random.default_rng(5)
    images, keys = [rng.integers(0, 256, (37, 50, 3), dtype=np.uint8)], [[0, 4]]
    ref = ClipEs(clip, VOC_CLASSES, ClipEsConfig(logit_scale=10.0, compute="fp32")).label(images, keys)[0]
    low = ClipEs(clip, VOC_CLASSES, ClipEsConfig(logit_scale=10.0, compute="bf16")).label(images, keys)[0]
    for k in ("cam", "high_res_raw"):
        err = float((low[k] - ref[k]).norm() / ref[k].norm())
        assert 0 < err <= BF16_TOLERANCE, (k, err)
    autos = [ClipEs(clip, VOC_CLASSES, ClipEsConfig(logit_scale=10.0)) for _ in range(2)]
    got = [a.label(images, keys)[0]["cam"] for a in autos]
    assert autos[0].compute == autos[1].compute and torch.equal(got[0], got[1])
    if cpu_has_bf16():
        assert autos[0].compute == ("bf16" if autos[0].probe["bf16_ok"] else "fp32")
    else:
        assert autos[0].compute == "fp32" and autos[0].probe is None
    with pytest.raises(WsclipError, match="compute"):
        ClipEs(clip, VOC_CLASSES, ClipEsConfig(compute="fp8"))


def test_image_embedding_poolings(clip):
    """'tokens' (default, public code): proj(mean(ln_post(token))); 'mean' (METHODS.md text): proj(ln_post(mean))."""
    rng = np.random.default_rng(2)
    pixels = ClipEs(clip, VOC_CLASSES).preprocess(rng.integers(0, 256, (29, 35, 3), dtype=np.uint8))[None]
    trace = clip.vit_forward(pixels, attn_layers=[])
    visual = clip.model.visual
    patches = trace.tokens[:, 1:]
    expected = {"tokens": visual.ln_post(patches).mean(1) @ visual.proj,
                "mean": visual.ln_post(patches.mean(1)) @ visual.proj}
    for pooling, ref in expected.items():
        got = ClipEs(clip, VOC_CLASSES, ClipEsConfig(pooling=pooling)).image_embedding(trace)
        torch.testing.assert_close(got, ref.float(), rtol=1e-5, atol=1e-6)
    assert (expected["tokens"] - expected["mean"]).abs().max() > 1e-4  # the two really differ


def test_sizes_empty_labels_and_no_caa(clip):
    es = ClipEs(clip, VOC_CLASSES, ClipEsConfig(logit_scale=10.0, caa=False, compute="fp32"))
    rng = np.random.default_rng(1)
    im = rng.integers(0, 256, (17, 30, 3), dtype=np.uint8)
    (r,) = es.label([im], [[3, 11]])
    assert r["cam"].shape == (2, 3, 4)  # ceil(17/8) x ceil(30/8)
    assert r["high_res"].shape == (2, 17, 30) and "high_res_raw" not in r
    assert 0.99 < float(r["high_res"].max()) <= 1.0 + 1e-6 and float(r["high_res"].min()) >= 0
    (e,) = ClipEs(clip, VOC_CLASSES).label([im], [[]])
    assert e["keys"].numel() == 0 and e["high_res"].shape == (0, 17, 30)
    assert rounded_size((17, 30), 8) == (24, 32) and rounded_size((16, 16), 16) == (16, 16)
    assert caa_layer_indices(12) == list(range(4, 12)) and caa_layer_indices(3) == [1, 2]
    x = torch.rand(2, 3, 4, 5) * 3 + 1
    y = gradcam_minmax(x)
    assert torch.allclose(y.amin((2, 3)), torch.zeros(2, 3)) and (y.amax((2, 3)) > 0.999).all()


def test_bucket_by_shape():
    items = [{"i": n, "s": s} for n, s in enumerate("abacbbcaabcc")]
    batches = list(bucket_by_shape(items, lambda it: it["s"], batch_size=2, max_pending=3))
    assert sorted(it["i"] for b in batches for it in b) == list(range(12))
    assert all(len({it["s"] for it in b}) == 1 and len(b) <= 2 for b in batches)
    produced = [0]

    def stream():
        for it in items:
            produced[0] += 1
            yield it

    released = 0
    for b in bucket_by_shape(stream(), lambda it: it["s"], batch_size=2, max_pending=3):
        released += len(b)
        assert produced[0] - released <= 3  # never more than max_pending items held back
    assert released == 12


def _tiny_voc(root: Path, voc14: Path, ids, size=(48, 64)) -> Path:
    """A small VOC-layout copy of some voc14 images, resized (so the test stays fast)."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    labels = json.loads((voc14 / "labels.json").read_text())
    for i in ids:
        Image.open(voc14 / "JPEGImages" / f"{i}.jpg").resize(size[::-1], Image.BICUBIC).save(root / "JPEGImages" / f"{i}.jpg")
        m = Image.open(voc14 / "SegmentationClass" / f"{i}.png")
        m.resize(size[::-1], Image.NEAREST).save(root / "SegmentationClass" / f"{i}.png")
    (root / "labels.json").write_text(json.dumps({i: labels[i] for i in ids}))
    (root / "val.txt").write_text("\n".join(ids) + "\n")
    return root


def test_cli_cam_clip_es_writes_cams_and_resumes(tmp_path, voc14):
    ids = ["2009_000573", "2007_000033", "2008_006874"]
    data = _tiny_voc(tmp_path / "voc", voc14, ids, size=(45, 61))
    ckpt = tmp_path / "tiny.safetensors"
    c = tiny_clip(patch=16)
    save_clip(ckpt, c, c.model_cfg, "tiny-vit")
    assert load_clip(ckpt).patch_size == 16
    out = tmp_path / "cams"
    argv = ["cam", "--method", "clip-es", "--clip", str(ckpt), "--data", str(data), "--split", "val",
            "--out", str(out), "--device", "cpu", "--workers", "0", "--batch-size", "2"]
    assert main(argv) == 0
    files = sorted(p.stem for p in out.glob("*.npz"))
    assert files == sorted(ids)
    with np.load(out / "2009_000573.npz") as z:
        assert z["keys"].tolist() == [1, 4]  # bicycle, bottle (labels.json holds 2, 5)
        assert z["cam"].shape == (2, 3, 4) and z["cam"].dtype == np.float16
        assert z["high_res"].shape == (2, 45, 61) and z["high_res_raw"].shape == (2, 45, 61)
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*.npz")}
    assert main(argv) == 0  # resume: nothing redone
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.npz")} == mtimes
    assert main(["cam", "--method", "clip-es", "--data", str(data), "--out", str(out)]) == 2  # --clip missing
    # `wsclip refine caa` alone on the raw maps gives back the labeler's CAA maps (same patch grid)
    ref = tmp_path / "caa"
    assert main(["refine", "caa", "--cams", str(out), "--out", str(ref), "--data", str(data), "--split", "val",
                 "--clip", str(ckpt), "--key", "high_res_raw", "--device", "cpu"]) == 0
    with np.load(ref / "2009_000573.npz") as z, np.load(out / "2009_000573.npz") as orig:
        assert z["cam"].shape == (2, 3, 4) and z["high_res"].shape == (2, 45, 61)
        np.testing.assert_array_equal(z["high_res_raw"], orig["high_res_raw"])
        assert np.abs(z["high_res"].astype(np.float32) - orig["high_res"].astype(np.float32)).mean() < 0.1


def test_cli_clip_es_flags_reach_the_config(tmp_path, voc14):
    ids = ["2009_000573"]
    data = _tiny_voc(tmp_path / "voc", voc14, ids, size=(45, 61))
    ckpt = tmp_path / "tiny.safetensors"
    c = tiny_clip(patch=16)
    save_clip(ckpt, c, c.model_cfg, "tiny-vit")
    flags = ["--pooling", "mean", "--caa-layers", "1", "--box-compat", "--caa-backend", "torch", "--box-threshold", "0.5"]
    assert main(["cam", "--method", "clip-es", "--clip", str(ckpt), "--data", str(data), "--split", "val",
                 "--out", str(tmp_path / "cli"), "--device", "cpu", "--workers", "0", *flags]) == 0
    cfg = ClipEsConfig(pooling="mean", caa_layers=1, box_compat=True, caa_backend="torch", box_threshold=0.5)
    make_clip_es_cams(ckpt, str(data), tmp_path / "api", split="val", cfg=cfg, device="cpu", num_workers=0)
    default = tmp_path / "default"
    make_clip_es_cams(ckpt, str(data), default, split="val", cfg=ClipEsConfig(), device="cpu", num_workers=0)
    with np.load(tmp_path / "cli" / "2009_000573.npz") as a, np.load(tmp_path / "api" / "2009_000573.npz") as b, \
            np.load(default / "2009_000573.npz") as d:
        np.testing.assert_array_equal(a["high_res"], b["high_res"])
        assert not np.array_equal(a["high_res"], d["high_res"])  # the flags changed something


def test_make_cams_resume_after_interrupt(tmp_path, voc14, clip):
    ids = ["2007_000332", "2010_000530"]
    data = _tiny_voc(tmp_path / "voc", voc14, ids, size=(30, 40))
    out = tmp_path / "cams"

    def stop(_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_clip_es_cams(clip, str(data), out, split="val", cfg=ClipEsConfig(batch_size=1), device="cpu",
                          num_workers=0, on_image=stop)
    first = sorted(out.glob("*.npz"))
    assert len(first) >= 1 and not list(out.glob(".*tmp*"))
    res = make_clip_es_cams(clip, str(data), out, split="val", cfg=ClipEsConfig(batch_size=1), device="cpu",
                            num_workers=0)
    assert res["skipped"] == len(first) and res["written"] == 2 - len(first)


def test_compat_official_preprocess_is_the_public_pil_pipeline_and_logit_scale_is_the_checkpoints():
    """--compat official: torchvision's Resize(BICUBIC) on a PIL image, ToTensor, Normalize (the public code's own
    transform, run here), box_compat on; both compats take exp(logit_scale) from the checkpoint."""
    import math

    from torchvision.transforms import Compose, InterpolationMode, Normalize, Resize, ToTensor

    from wsclip.models.clip import CLIP_MEAN, CLIP_STD

    clip = tiny_clip(seed=4)
    with torch.no_grad():
        clip.model.logit_scale.fill_(math.log(7.0))
    off = ClipEs(clip, VOC_CLASSES, ClipEsConfig(compat="official"))
    ours = ClipEs(clip, VOC_CLASSES)
    assert (off.cfg.preprocess, off.cfg.box_compat) == ("pil", True)
    assert (ours.cfg.preprocess, ours.cfg.box_compat) == ("tensor", False)
    rng = np.random.default_rng(5)
    for shape in ((37, 50, 3), (16, 16, 3), (9, 31, 3)):
        im = rng.integers(0, 256, shape, dtype=np.uint8)
        public = Compose([Resize(rounded_size(shape[:2], 8), interpolation=InterpolationMode.BICUBIC), ToTensor(),
                          Normalize(CLIP_MEAN, CLIP_STD)])(Image.fromarray(im))
        torch.testing.assert_close(off.preprocess(im), public, rtol=0, atol=1e-6)
        torch.testing.assert_close(off.preprocess(torch.from_numpy(im)), public, rtol=0, atol=1e-6)
        if shape[:2] != (16, 16):  # wsclip's float resize is another function
            assert (ours.preprocess(im) - public).abs().max() > 1e-2
    # the logit scale: the checkpoint's (7 here) unless set
    assert off.logit_scale == pytest.approx(7.0) and ours.logit_scale == pytest.approx(7.0)
    assert ClipEs(clip, VOC_CLASSES, ClipEsConfig(logit_scale=3.0)).logit_scale == 3.0
    feats = torch.randn(2, clip.embed_dim)
    keys = torch.tensor([[1, 5], [2, -1]])
    probs = ours.class_probs(feats, keys)
    text = torch.cat([ours.fg_text, ours.bg_text])
    logits = 7.0 * F.normalize(feats, dim=-1) @ text.T
    want = logits[0, [1, 5] + list(range(20, text.shape[0]))].softmax(-1)
    torch.testing.assert_close(probs[0, [1, 5] + list(range(20, text.shape[0]))], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="preprocess"):
        ClipEs(clip, VOC_CLASSES, ClipEsConfig(preprocess="cv2"))
