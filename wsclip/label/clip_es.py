"""CLIP-ES: training-free CAMs from a frozen CLIP ViT (METHODS.md section 5).

Per image: resize (bicubic) to H, W rounded up to a multiple of the patch size; run the ViT with
interpolated positional embeddings, every block but the last without gradients; image embedding
= mean-pooled patch tokens; softmax of logit_scale * cosine over the image's ground-truth classes
plus the background words; GradCAM of each class's probability at the last block's ln_1 output;
CAA refinement with the attention of the last 8 blocks (two thirds for shallower ViTs).

Differences from the public code (same maths): one forward for every class (the public code
runs the last block once per class); on CUDA every ground-truth class of every image in a batch
comes from ONE batched vector-Jacobian product (`is_grads_batched`: slot k of the batch holds
each image's k-th class), on the CPU one VJP per slot (the batched one holds a copy of every
attention gradient per slot: memory); several images of the same rounded size share one
forward (bucketing by shape; on the CPU up to CPU_TOKENS_PER_PASS tokens), attention maps are
averaged in place, and everything stays on the device until the CAM file is written.

CAM file (`<id>.npz`, shared with `wsclip.label.clims_cam`): "keys" (K',) int64 0-based classes,
"cam" (K', h, w) float16 at patch resolution, "high_res" (K', H, W) float16 at image size; with
CAA, "cam"/"high_res" hold the CAA-refined maps and "high_res_raw" the plain GradCAM ones.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from wsclip.errors import ShapeError, WsclipError
from wsclip.formats import write_cam_file
from wsclip.runtime import precision
from wsclip.stages import stage

__all__ = ["ClipEsConfig", "ClipEs", "gradcam_minmax", "rounded_size", "caa_layer_indices", "write_cam_npz", "bucket_by_shape",
           "make_clip_es_cams", "caa_refine_cam_files"]

POOLINGS = ("tokens", "mean")
COMPUTE = ("auto", "fp32", "bf16")
#: relative error (L2) of bf16 GradCAM and CAA maps against fp32 that `compute="auto"` accepts: the
#: low-precision tolerance of the clip-es-label benchmark check
BF16_TOLERANCE = 5e-2
#: patch tokens per ViT pass on the CPU: at VOC sizes (1000+ tokens) one image already fills the cores and
#: a batch only multiplies the memory (attention maps, the last block's activations per class); small
#: images are still batched up to this many tokens
CPU_TOKENS_PER_PASS = 1024


@dataclass
class ClipEsConfig:
    """CLIP-ES settings; defaults are the paper's (VOC). Fields left None that `wsclip.compat` names
    (preprocess, box_compat) take their value from `compat` ("wsclip" or "official")."""

    compat: str = "wsclip"
    template: str | None = None  # default: 'a clean origami {}.'
    background: tuple[str, ...] | None = None  # default: the dataset's CLIP-ES background words
    logit_scale: float | None = None  # None: the checkpoint's exp(logit_scale) (100 for OpenAI's weights)
    caa: bool = True
    box_threshold: float | None = None  # default: 0.7 for the COCO classes, else 0.4
    box_compat: bool | None = None  # public code's uint8 threshold and exclusive far box edges (official)
    preprocess: str | None = None  # image resize: "tensor" (float bicubic, antialiased; wsclip) or "pil" (official)
    clip_act: str | None = None  # when the CLIP file is loaded here: quick_gelu or gelu (see load_clip)
    caa_layers: int | None = None  # last blocks whose attention CAA averages (default 8 of 12)
    pooling: str = "tokens"  # 'tokens': ln_post per patch token, then mean (public code); 'mean': ln_post(mean)
    batch_size: int = 8
    caa_backend: str = "auto"  # CAA kernels: auto, triton, torch
    compute: str | None = None  # frozen blocks 1..n-1: fp32, bf16 (autocast), auto (bf16 where the CPU has it and
    #                        the first image's maps match fp32 within BF16_TOLERANCE, and it is faster);
    #                        None: auto, or fp32 under --compat official


def rounded_size(hw, patch: int) -> tuple[int, int]:
    """(H, W) rounded up to multiples of the patch size."""
    return tuple(int(-(-int(s) // patch) * patch) for s in hw)


def caa_layer_indices(n_blocks: int, n: int | None = None) -> list[int]:
    """0-based blocks whose attention CAA averages: the last `n` (default 8 when there are >= 12, else 2/3)."""
    if n is None:
        n = 8 if n_blocks >= 12 else max(1, round(2 * n_blocks / 3))
    n = max(1, min(int(n), n_blocks))
    return list(range(n_blocks - n, n_blocks))


def gradcam_minmax(cam: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """(cam - min) / (max(cam - min) + eps) over the last two dims, as pytorch-grad-cam's scale_cam_image."""
    flat = cam.flatten(-2)
    flat = flat - flat.amin(-1, keepdim=True)
    return (flat / (flat.amax(-1, keepdim=True) + eps)).reshape(cam.shape)


class ClipEs:
    """The CLIP-ES CAM maker around a loaded CLIP (`wsclip.models.clip.ClipModel`, a ViT).

    `classes`: the dataset's class names in index order (for the text presets of METHODS.md
    section 1 they are replaced by the synonym-fused CLIP-ES names when they match VOC or COCO).
    """

    def __init__(self, clip, classes: Sequence[str], cfg: ClipEsConfig | None = None):
        from wsclip.label.prompts import clip_es_text
        from wsclip.vocab import COCO_CLASSES, VOC_CLASSES

        from wsclip.compat import resolve

        self.cfg = cfg = resolve(cfg or ClipEsConfig())
        if cfg.preprocess not in ("tensor", "pil"):
            raise WsclipError(f"unknown preprocess {cfg.preprocess!r}: use 'tensor' or 'pil'")
        if cfg.pooling not in POOLINGS:
            raise WsclipError(f"unknown pooling {cfg.pooling!r}: use one of {', '.join(POOLINGS)}")
        if cfg.compute not in COMPUTE:
            raise WsclipError(f"unknown compute {cfg.compute!r}: use one of {', '.join(COMPUTE)}")
        if not clip.is_vit:
            raise WsclipError(f"CLIP-ES needs a ViT CLIP; {clip.name} has a {type(clip.model.visual).__name__} image tower")
        self.clip = clip
        #: the logit scale of the softmax: the config's, else the checkpoint's (as the public code)
        self.logit_scale = float(cfg.logit_scale) if cfg.logit_scale is not None else clip.logit_scale
        self.classes = tuple(classes)
        self.preset = preset = {tuple(VOC_CLASSES): "voc", tuple(COCO_CLASSES): "coco"}.get(self.classes)
        if cfg.box_threshold is not None:
            self.box_threshold = float(cfg.box_threshold)
        else:
            self.box_threshold = 0.7 if preset == "coco" else 0.4
        if preset is not None:
            text = clip_es_text(preset, template=cfg.template, background=cfg.background)
        else:
            text = clip_es_text("custom", classes=self.classes, template=cfg.template, background=cfg.background)
        self.prompts = text
        self.device = clip.device
        self.fg_text = clip.encode_text(text["foreground"]).to(self.device)  # (K, D) normalised
        self.bg_text = clip.encode_text(text["background"]).to(self.device)  # (L, D)
        self.patch = int(clip.patch_size)
        self.n_blocks = len(clip.model.visual.transformer.resblocks)
        self.attn_layers = caa_layer_indices(self.n_blocks, cfg.caa_layers) if cfg.caa else []
        self.compute = cfg.compute if cfg.compute != "auto" else None  # resolved on the first batch
        self.probe: dict | None = None

    # ------------------------------------------------------------------ pieces
    def preprocess(self, image) -> torch.Tensor:
        """(3, H', W') CLIP-normalised pixels on the device from a uint8 (H, W, 3) image; H', W' rounded up."""
        if not isinstance(image, torch.Tensor):
            arr = np.asarray(image)
            image = torch.from_numpy(np.ascontiguousarray(arr) if arr.flags.writeable else np.array(arr))
        img = image
        if img.dim() != 3 or img.shape[-1] != 3:
            raise ShapeError(f"expected an RGB (H, W, 3) image, got shape {tuple(img.shape)}")
        size = rounded_size(img.shape[:2], self.patch)
        if self.cfg.preprocess == "pil":  # PIL works on the CPU: do not send the image to the device first
            return self.clip.preprocess_tensor(img, size=size, resize="pil")[0]
        return self.clip.preprocess_tensor(img.to(self.device), size=size)[0]

    def image_embedding(self, trace) -> torch.Tensor:
        """(B, D) image embedding from a ViTTrace, differentiable w.r.t. trace.ln1."""
        if self.cfg.pooling == "mean":
            return trace.image_features.float()
        visual = self.clip.model.visual
        pooled = visual.ln_post(trace.tokens[:, 1:]).mean(dim=1)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return pooled.float()

    def class_probs(self, feats: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Softmax (B, K + L) over each image's ground-truth classes and the background words.

        keys (B, S) long, -1 = empty slot. Classes not in an image's keys get probability 0.
        """
        feats = F.normalize(feats, dim=-1)
        text = torch.cat([self.fg_text, self.bg_text]).to(feats.dtype)
        logits = self.logit_scale * feats @ text.T
        K = self.fg_text.shape[0]
        allowed = torch.zeros(feats.shape[0], K + 1, dtype=torch.bool, device=feats.device)
        allowed.scatter_(1, torch.where(keys >= 0, keys, K), True)
        allowed = torch.cat([allowed[:, :K], torch.ones_like(logits[:, K:], dtype=torch.bool)], dim=1)
        return logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)

    def forward(self, pixels: torch.Tensor, keys: torch.Tensor) -> dict:
        """Batched CLIP-ES at patch resolution for pixels (B, 3, H', W') and keys (B, S) (-1 = empty slot).

        Returns {"raw": GradCAM (B, S, h, w) min-max normalised, "refined": CAA maps (B, S, h, w) or
        None, "probs": (B, K + L)}; empty slots hold zeros. Runs at wsclip's inference precision
        (`wsclip.runtime.precision`: fp32 without TF32 on CUDA; the CLIP weights' dtype as loaded).
        """
        with precision(self.device):
            return self._forward(pixels, keys)

    def _forward(self, pixels: torch.Tensor, keys: torch.Tensor) -> dict:
        if keys.dim() != 2 or keys.shape[0] != pixels.shape[0]:
            raise ShapeError(f"keys must be (B, S) for {pixels.shape[0]} images, got {tuple(keys.shape)}")
        K = self.fg_text.shape[0]
        if (keys >= K).any():
            raise ShapeError(f"class index {int(keys.max())} out of range for {K} classes")
        keys = keys.to(self.device)
        if self.compute is None:
            self.compute = self._choose_compute()
        return self._run(pixels, keys, self.compute)

    def _choose_compute(self) -> str:
        """`compute="auto"`: bf16 on a CPU that runs it natively (where the clip-es-label benchmark and
        `wsclip profile` measure it faster) when its maps on a fixed probe image match fp32 within
        BF16_TOLERANCE; else fp32. No timing decides it, so every run (and a resumed one) chooses alike."""
        import time

        from wsclip.label.backends import cpu_has_bf16

        if self.device.type != "cpu" or not cpu_has_bf16():
            return "fp32"
        gen = torch.Generator().manual_seed(0)  # a smooth random 224 px image, the same every time
        img = F.interpolate(torch.rand(1, 3, 14, 14, generator=gen), size=(224, 224), mode="bilinear")
        pixels = self.preprocess((img[0].permute(1, 2, 0) * 255).to(torch.uint8))[None]
        keys = torch.tensor([[0, min(1, self.fg_text.shape[0] - 1)]], device=self.device)
        runs = {}
        for mode in ("fp32", "bf16"):
            t = time.perf_counter()
            runs[mode] = (self._run(pixels, keys, mode), time.perf_counter() - t)
        (ref, t32), (low, t16) = runs["fp32"], runs["bf16"]
        errs = {k: float((low[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30))
                for k in ("raw", "refined") if ref[k] is not None}
        ok = all(e <= BF16_TOLERANCE for e in errs.values())
        self.probe = {"seconds": {"fp32": t32, "bf16": t16}, "rel_err": errs, "bf16_ok": ok}
        return "bf16" if ok else "fp32"

    def _run(self, pixels: torch.Tensor, keys: torch.Tensor, compute: str) -> dict:
        B, S = keys.shape
        with stage("forward", self.device):
            trace = self.clip.vit_forward(pixels, attn_layers=self.attn_layers, attn_mean=True,
                                          frozen_dtype=torch.bfloat16 if compute == "bf16" else None)
            h, w = trace.grid
            probs = self.class_probs(self.image_embedding(trace), keys)
            valid = keys >= 0
            raw = torch.zeros(B, S, h, w, device=self.device)
        if S and valid.any():
            with stage("backward", self.device):
                # slot s of grad_outputs selects, for every image at once, its s-th class probability
                onehot = torch.zeros(S, B, probs.shape[1], device=self.device, dtype=probs.dtype)
                b_idx, s_idx = torch.nonzero(valid, as_tuple=True)
                onehot[s_idx, b_idx, keys[b_idx, s_idx]] = 1.0
                if self.device.type == "cuda":
                    (grads,) = torch.autograd.grad(probs, trace.ln1, grad_outputs=onehot, is_grads_batched=True)
                else:  # one slot at a time: the batched VJP holds S copies of every attention gradient at once
                    grads = torch.stack([torch.autograd.grad(probs, trace.ln1, grad_outputs=onehot[k],
                                                             retain_graph=k < S - 1)[0] for k in range(S)])
                acts = trace.ln1.detach()[:, 1:].float()  # (B, N, C)
                weights = grads[:, :, 1:].float().mean(dim=2)  # (S, B, C): spatial mean of each channel's gradient
                cam = torch.einsum("sbc,bnc->bsn", weights, acts).clamp_min(0).reshape(B, S, h, w)
                raw = gradcam_minmax(cam) * valid[:, :, None, None]
                trace.tokens = None  # the last block's activations are not needed any more
        refined = None
        if self.cfg.caa:
            with stage("caa", self.device):
                refined = self._caa(trace.attn[0][:, 1:, 1:], raw, h, w) * valid[:, :, None, None]
                del trace  # freeing the attention maps is part of this stage's cost
        return {"raw": raw.detach(), "refined": None if refined is None else refined.detach(), "probs": probs.detach()}

    def _caa(self, attn: torch.Tensor, raw: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """CAA maps (B, S, h, w) from the layer- and head-averaged attention (B, N, N) without the CLS token."""
        from wsclip.refine.caa import refine_from_attention

        attn = attn.float()
        if self.cfg.box_compat:
            from wsclip.refine.caa import box_mask, refine, transition

            masks = torch.stack([box_mask(m, self.box_threshold, compat=True)
                                 for m in raw.reshape(-1, h, w)]).reshape(raw.shape)
            return refine(raw, transition(attn, backend=self.cfg.caa_backend), masks, backend=self.cfg.caa_backend)
        return refine_from_attention(attn, raw, self.box_threshold, backend=self.cfg.caa_backend)

    def label(self, images: Sequence, keys: Sequence) -> list[dict]:
        """CAMs of images (uint8 (H, W, 3), all with the same rounded size) and their 0-based class lists.

        Returns per image {"keys", "cam", "high_res"[, "high_res_raw"]} as float32 tensors on the device.
        """
        step = len(images)
        if self.device.type == "cpu" and len(images):
            h, w = rounded_size(images[0].shape[:2], self.patch)
            step = max(1, CPU_TOKENS_PER_PASS // ((h // self.patch) * (w // self.patch)))
        out: list[dict] = []
        for s0 in range(0, len(images), step):
            out += self._label(images[s0:s0 + step], keys[s0:s0 + step])
        return out

    def _label(self, images: Sequence, keys: Sequence) -> list[dict]:
        with stage("preprocess", self.device):
            pixels = torch.stack([self.preprocess(im) for im in images])
            S = max((len(k) for k in keys), default=0)
            kt = torch.full((len(images), S), -1, dtype=torch.long)
            for i, k in enumerate(keys):
                kt[i, : len(k)] = torch.as_tensor(list(k), dtype=torch.long)
        res = self.forward(pixels, kt)
        with stage("postprocess", self.device):
            return self._items(images, keys, res)

    def _items(self, images, keys, res) -> list[dict]:
        out = []
        for i, im in enumerate(images):
            n = len(keys[i])
            hw = tuple(im.shape[:2])
            raw = res["raw"][i, :n]
            main = res["refined"][i, :n] if res["refined"] is not None else raw
            item = {"keys": torch.as_tensor(list(keys[i]), dtype=torch.long), "cam": main,
                    "high_res": _upsample(main, hw)}
            if res["refined"] is not None:
                item["high_res_raw"] = _upsample(raw, hw)
            out.append(item)
        return out


def _upsample(maps: torch.Tensor, hw) -> torch.Tensor:
    if maps.shape[0] == 0:
        return maps.new_zeros(0, *hw)
    return F.interpolate(maps[None], size=tuple(hw), mode="bilinear", align_corners=False)[0]


def write_cam_npz(path, arrays: dict) -> None:
    """`wsclip.formats.write_cam_file` with the arrays given as a dict (keys, cam, high_res, ...)."""
    write_cam_file(path, **arrays)


# ============================================================================ dataset runner
def _decoded(dataset, i: int) -> dict:
    """DataLoader side: the image as a tensor (no resizing: that happens on the device) and its classes."""
    from wsclip.label.clims_cam import load_image_and_keys

    item = load_image_and_keys(dataset, i)
    return {**item, "image": torch.from_numpy(item["image"]), "keys": item["keys"].tolist()}


def bucket_by_shape(items: Iterable[dict], key: Callable[[dict], tuple], batch_size: int,
                    max_pending: int | None = None) -> Iterator[list[dict]]:
    """Group a stream into batches of equal `key` (e.g. rounded image size), at most `batch_size` each.

    At most `max_pending` items wait (default 4 * batch_size): beyond that the fullest bucket is
    released early, so memory stays bounded whatever the mix of shapes.
    """
    max_pending = max(batch_size, max_pending or 4 * batch_size)
    buckets: OrderedDict[tuple, list[dict]] = OrderedDict()
    pending = 0
    for item in items:
        k = key(item)
        buckets.setdefault(k, []).append(item)
        pending += 1
        if len(buckets[k]) >= batch_size:
            pending -= len(buckets[k])
            yield buckets.pop(k)
        elif pending > max_pending:
            fullest = max(buckets, key=lambda b: len(buckets[b]))
            pending -= len(buckets[fullest])
            yield buckets.pop(fullest)
    yield from buckets.values()


def make_clip_es_cams(
    clip,
    data,
    out_dir,
    split: str = "train",
    cfg: ClipEsConfig | None = None,
    device: str = "auto",
    precision: str = "fp32",
    num_workers: int = 2,
    on_image: Callable[[str], None] | None = None,
    restart: bool = False,
    on_error: str = "skip",
) -> dict:
    """Write `<out_dir>/<id>.npz` CLIP-ES CAMs for every image of `data` (a spec or a dataset); resumable.

    clip: a checkpoint path (loaded with `wsclip.models.clip.load_clip`) or a ClipModel. Runs as a
    `wsclip.jobs.Job` ("cam": a resume with other settings is refused). Returns {"written",
    "skipped", "failed", "total"}.
    """
    from wsclip.jobs import Job, load_items
    from wsclip.runtime import resolve_device

    cfg = cfg or ClipEsConfig()
    if cfg.batch_size < 1:
        raise WsclipError(f"batch size must be >= 1, got {cfg.batch_size}")
    dev = resolve_device(device)
    if isinstance(clip, (str, Path)):
        from wsclip.models.clip import load_clip

        clip = load_clip(clip, device=dev, precision=precision, act=cfg.clip_act, compat=cfg.compat)
    if isinstance(data, (str, Path)):
        from wsclip.data import open_images

        ds = open_images(data, split)
    else:
        ds = data
    labeler = ClipEs(clip, ds.classes, cfg)
    settings = {"method": "clip-es", "clip": _clip_fingerprint(clip), "precision": precision, **asdict(cfg)}
    with Job("cam", out_dir, settings, restart=restart, on_error=on_error, suffix=".npz", desc="cam clip-es",
             on_item=on_image) as job:
        decoded = load_items(job, ds, job.start(list(ds.ids)), _decoded, num_workers)
        with ThreadPoolExecutor(max_workers=2) as writers:  # zlib releases the GIL: writes overlap compute
            for batch in bucket_by_shape(decoded, lambda it: rounded_size(it["image"].shape[:2], labeler.patch),
                                         cfg.batch_size):
                results = labeler.label([it["image"] for it in batch], [it["keys"] for it in batch])
                for it, res in zip(batch, results):
                    arrays = {k: (v.half() if v.is_floating_point() else v).cpu() for k, v in res.items()}
                    job.submit(writers, it["id"], write_cam_npz, job.out / f"{it['id']}.npz", arrays)
                job.drain(keep=2 * cfg.batch_size)
                job.raise_failure()
            job.drain(keep=0)
        return job.result()


def _clip_fingerprint(clip) -> dict | None:
    """The CLIP file a ClipModel was loaded from (hashed), or its name."""
    from wsclip.jobs import file_fingerprint

    path = getattr(clip, "path", None) or getattr(clip, "source", None)
    return file_fingerprint(path) if path and Path(str(path)).is_file() else {"name": getattr(clip, "name", None)}


def caa_refine_cam_files(
    clip,
    data,
    cam_dir,
    out_dir,
    split: str = "train",
    key: str = "high_res",
    cfg: ClipEsConfig | None = None,
    device: str = "auto",
    precision: str = "fp32",
    on_image: Callable[[str], None] | None = None,
    restart: bool = False,
    on_error: str = "skip",
) -> dict:
    """CAA alone (`wsclip refine caa`): refine the `key` maps of existing CAM files with CLIP's attention.

    Each image's maps are area-resized to the CLIP patch grid and min-max normalised, box-masked and
    propagated with the image's CAA transition, then upsampled; the output file holds "keys", "cam"
    (refined, patch grid), "high_res" (refined, image size) and "high_res_raw" (the input maps).
    Existing outputs are skipped. Returns {"written", "skipped", "total"}.
    """
    from wsclip.jobs import Job
    from wsclip.runtime import resolve_device

    cfg = cfg or ClipEsConfig()
    if not cfg.caa:
        raise WsclipError("CAA refinement with caa=False does nothing")
    dev = resolve_device(device)
    if isinstance(clip, (str, Path)):
        from wsclip.models.clip import load_clip

        clip = load_clip(clip, device=dev, precision=precision, act=cfg.clip_act, compat=cfg.compat)
    ds = data
    if isinstance(data, (str, Path)):
        from wsclip.data import open_images

        ds = open_images(data, split)
    labeler = ClipEs(clip, ds.classes, cfg)
    cfg = labeler.cfg  # resolved (--compat)
    cam_dir = Path(cam_dir)
    settings = {"cams": str(cam_dir), "key": key, "clip": _clip_fingerprint(clip), "precision": precision, **asdict(cfg)}
    with Job("refine caa", out_dir, settings, restart=restart, on_error=on_error, suffix=".npz",
             on_item=on_image) as job:
        for image_id in job.start(list(ds.ids)):
            with job.item(image_id):
                _caa_refine_one(clip, labeler, ds, cam_dir / f"{image_id}.npz", job.out / f"{image_id}.npz", key, cfg)
        return job.result()


def _caa_refine_one(clip, labeler: ClipEs, ds, src: Path, dst: Path, key: str, cfg: ClipEsConfig) -> None:
    from wsclip.formats import read_cam_file
    from wsclip.refine.caa import box_mask, refine, refine_from_attention, transition

    image_id = src.stem
    z = read_cam_file(src)
    maps = torch.as_tensor(np.asarray(z[key], dtype=np.float32), device=labeler.device)
    image = ds.load_image(ds.index(image_id))
    if tuple(maps.shape[1:]) != tuple(image.shape[:2]):
        raise ShapeError(f"{src}: '{key}' maps are {tuple(maps.shape[1:])}, the image {tuple(image.shape[:2])}")
    with torch.no_grad():
        trace = clip.vit_forward(labeler.preprocess(image)[None], attn_layers=labeler.attn_layers)
    h, w = trace.grid
    attn = torch.stack(trace.attn).mean(0)[:, 1:, 1:].float()
    low = gradcam_minmax(F.interpolate(maps[None], size=(h, w), mode="area")) if len(maps) else maps.new_zeros(1, 0, h, w)
    if cfg.box_compat:
        masks = torch.stack([box_mask(m, labeler.box_threshold, compat=True) for m in low[0]])[None]
        refined = refine(low, transition(attn, backend=cfg.caa_backend), masks, backend=cfg.caa_backend)[0]
    else:
        refined = refine_from_attention(attn, low, labeler.box_threshold, backend=cfg.caa_backend)[0]
    write_cam_file(dst, z["keys"], refined, _upsample(refined, image.shape[:2]), high_res_raw=maps)
