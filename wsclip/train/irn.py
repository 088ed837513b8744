"""IRN boundary training (`wsclip train irn`) and the boundary map, METHODS.md section 6.

1. Seeds: for each image, its CAM file (`wsclip cam` output: "keys" and "high_res") gives
   two label maps, argmax over [threshold, CAMs] with the fg threshold (0.30; COCO 0.35)
   and with the bg threshold (0.10), each refined by a dense CRF when the `[crf]` extra is
   installed (IRNet's settings: labels as unaries with 0.7 confidence, 10 iterations,
   Gaussian sxy 3 compat 3, bilateral sxy 50 srgb 5 compat 10). Seed = the class where the
   fg map says foreground, 0 where even the bg map says background, 255 (ignore) elsewhere.
   Seeds are written once as PNGs (resumable) and reused.
2. Affinity labels on the stride-4 grid (seeds resized by nearest neighbour): for every
   pixel i and forward offset j = i + o of radius 10, a pair is bg-positive (both 0),
   fg-positive (both the same class) or negative (different labels); pairs touching 255
   or leaving the grid give no loss.
3. Affinity from the predicted boundary map B: a(i, j) = 1 - max of B over the path pixels
   of the segment i..j (grid points whose distance to the segment's line is below 1 inside
   its bounding box, end points included). `path_max` computes it for all offsets with
   per-offset path lists (max over shifted views, the arg-max stored as uint8; the backward
   pass is one scatter-add per offset: memory K x grid bytes instead of every path sample).
4. Loss, IRNet's balanced form: L = ((L_bg + L_fg) / 2 + L_neg) / 2 with
   L_bg / L_fg = mean over bg- / fg-positive pairs of -log(a + 1e-5) and
   L_neg = mean over negative pairs of -log(1 + 1e-5 - a). Means are over the global batch
   (DDP-exact through loop.global_scale).

The backbone is frozen (the CAM net's ResNet; ImageNet weights via --pretrained, or the
backbone of a CAM checkpoint via --backbone-from); only the edge branch trains (SGD, lr 0.1,
batch 32, 3 epochs by default).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from wsclip.errors import BadFileError, MissingFileError, ShapeError, WsclipError
from wsclip.refine.random_walk import neighbor_offsets, path_pixels  # the IRN path rule, shared with inference

log = logging.getLogger(__name__)

SEED_IGNORE = 255
SEED_INFO = "seeds.json"  # how the seeds in a folder were made
#: IRNet's seed CRF (labels as unaries with confidence 0.7)
IRN_CRF = dict(iters=10, gauss_sxy=3.0, gauss_compat=3.0, bilateral_sxy=50.0, bilateral_srgb=5.0, bilateral_compat=10.0)
IRN_CRF_CONFIDENCE = 0.7


# ============================================================================ paths and affinities
def _offsets(radius: int) -> list[tuple[int, int]]:
    return [tuple(o) for o in neighbor_offsets(radius).tolist()]


def _pad(edge: torch.Tensor, radius: int, value: float) -> torch.Tensor:
    r1 = radius - 1
    return F.pad(edge, (r1, r1, 0, r1), value=value)  # offsets have dy >= 0 and |dx| <= r - 1


def path_max_reference(edge: torch.Tensor, radius: int, pad_value: float = 1.0) -> torch.Tensor:
    """Plain reference of `path_max`: stack every path sample, max over them (autograd does the rest)."""
    n, h, w = edge.shape
    r1 = radius - 1
    ep = _pad(edge, radius, pad_value)
    outs = []
    for pts in path_pixels(radius):
        stack = torch.stack([ep[:, py:py + h, r1 + px:r1 + px + w] for py, px in pts])
        outs.append(stack.max(dim=0).values)
    return torch.stack(outs, dim=1)


class _PathMax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, edge, radius, pad_value):
        n, h, w = edge.shape
        r1 = radius - 1
        paths = path_pixels(radius)
        ep = _pad(edge.detach(), radius, pad_value)
        out = edge.new_empty(n, len(paths), h, w)
        arg = torch.empty(n, len(paths), h, w, dtype=torch.uint8, device=edge.device)
        for k, pts in enumerate(paths):
            py, px = pts[0]
            best = ep[:, py:py + h, r1 + px:r1 + px + w].clone()
            idx = torch.zeros(n, h, w, dtype=torch.uint8, device=edge.device)
            for j, (py, px) in enumerate(pts[1:], start=1):
                cand = ep[:, py:py + h, r1 + px:r1 + px + w]
                better = cand > best
                best = torch.where(better, cand, best)
                idx.masked_fill_(better, j)
            out[:, k] = best
            arg[:, k] = idx
        ctx.save_for_backward(arg)
        ctx.radius, ctx.shape = radius, (n, h, w)
        return out

    @staticmethod
    def backward(ctx, grad):
        (arg,) = ctx.saved_tensors
        n, h, w = ctx.shape
        r1 = ctx.radius - 1
        wp = w + 2 * r1
        gp = grad.new_zeros(n, (h + r1) * wp)
        dev = grad.device
        base = (torch.arange(h, device=dev)[:, None] * wp + torch.arange(w, device=dev)[None, :] + r1).view(1, h, w)
        for k, pts in enumerate(path_pixels(ctx.radius)):
            step = torch.tensor([py * wp + px for py, px in pts], device=dev)
            flat = (base + step[arg[:, k].long()]).view(n, -1)  # padded-grid index of each arg-max sample
            gp.scatter_add_(1, flat, grad[:, k].reshape(n, -1).contiguous())
        return gp.view(n, h + r1, wp)[:, :h, r1:r1 + w], None, None


def path_max(edge: torch.Tensor, radius: int, pad_value: float = 1.0) -> torch.Tensor:
    """Max of `edge` (N, h, w) over each forward offset's path: (N, K, h, w), differentiable.

    Entry [n, k, y, x] is the max over the path from (y, x) to (y + dy_k, x + dx_k); path
    points outside the grid read `pad_value` (1: the IRN rule at image borders).
    """
    if edge.dim() != 3:
        raise ShapeError(f"edge must be (N, h, w), got {tuple(edge.shape)}")
    if max(len(p) for p in path_pixels(radius)) > 255:
        return path_max_reference(edge, radius, pad_value)
    return _PathMax.apply(edge, int(radius), float(pad_value))


def affinity_labels(seeds: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bg_pos, fg_pos, neg) bool (N, K, h, w) from seed labels (N, h, w) (0 bg, 1..K fg, 255 ignore).

    A pair (i, i + o_k) counts only when both labels are known and j is inside the grid.
    """
    if seeds.dim() != 3:
        raise ShapeError(f"seeds must be (N, h, w), got {tuple(seeds.shape)}")
    n, h, w = seeds.shape
    r1 = radius - 1
    lab = seeds.long()
    lp = F.pad(lab, (r1, r1, 0, r1), value=SEED_IGNORE)
    dst = torch.stack([lp[:, dy:dy + h, r1 + dx:r1 + dx + w] for dy, dx in _offsets(radius)], dim=1)
    src = lab[:, None]
    valid = (src != SEED_IGNORE) & (dst != SEED_IGNORE)
    same = src == dst
    return valid & same & (src == 0), valid & same & (src > 0), valid & ~same


def affinity_loss(edge: torch.Tensor, seeds: torch.Tensor, radius: int = 10) -> tuple[torch.Tensor, dict]:
    """IRNet's boundary loss for boundary probabilities (N, h, w) and stride-4 seeds (N, h, w).

    Returns (loss, {"bg_pos", "fg_pos", "neg"}) with loss = ((bg + fg) / 2 + neg) / 2.
    """
    from wsclip.train.loop import global_scale

    if edge.shape != seeds.shape:
        raise ShapeError(f"boundary map {tuple(edge.shape)} and seeds {tuple(seeds.shape)} differ in shape")
    aff = 1.0 - path_max(edge.float(), radius)
    bg_pos, fg_pos, neg = affinity_labels(seeds, radius)
    pos_l = -torch.log(aff + 1e-5)
    neg_l = -torch.log(1.0 + 1e-5 - aff)
    terms = {}
    for name, mask, vals in (("bg_pos", bg_pos, pos_l), ("fg_pos", fg_pos, pos_l), ("neg", neg, neg_l)):
        count = mask.sum()
        local = torch.where(mask, vals, 0.0).sum() / count.clamp(min=1)
        terms[name] = local * global_scale(count, edge.device)
    loss = ((terms["bg_pos"] + terms["fg_pos"]) / 2 + terms["neg"]) / 2
    return loss, terms


def downsample_seeds(seeds: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour (pixel centres) resize of (N, H, W) labels to `size`."""
    return F.interpolate(seeds[:, None].float(), size=size, mode="nearest-exact")[:, 0].to(torch.uint8)


# ============================================================================ seeds
def load_cam_file(path, image_hw: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(keys int64 (C,), cams float32 (C, H, W)) from a `wsclip cam` file; shapes checked against the image."""
    from wsclip.formats import read_cam_file

    z = read_cam_file(path)
    keys = np.asarray(z["keys"], dtype=np.int64).reshape(-1)
    cams = np.asarray(z["high_res"], dtype=np.float32)
    if cams.ndim != 3 or cams.shape[0] != keys.size:
        raise BadFileError(f"{path}: {keys.size} keys but CAMs of shape {cams.shape}; re-run `wsclip cam`")
    if image_hw is not None and cams.shape[0] and cams.shape[1:] != tuple(image_hw):
        raise BadFileError(f"{path}: CAMs are {cams.shape[2]}x{cams.shape[1]}, the image is "
                           f"{image_hw[1]}x{image_hw[0]}; were they made for another dataset?")
    return keys, cams


def crf_available() -> bool:
    try:
        from wsclip.refine.crf import check_available

        check_available()
        return True
    except (ImportError, WsclipError):
        return False


def _threshold_labels(cams: np.ndarray, threshold: float) -> np.ndarray:
    """argmax over [threshold, cams]: 0 = background, c + 1 = the c-th CAM."""
    h, w = cams.shape[1:]
    scores = np.concatenate([np.full((1, h, w), threshold, dtype=np.float32), cams.astype(np.float32)])
    return scores.argmax(0)


def _crf_labels(image: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """IRNet's label CRF: the labels as unaries with confidence 0.7, argmax of the posterior."""
    from wsclip.refine.crf import CRFParams, dense_crf

    if n < 2:
        return labels
    other = (1.0 - IRN_CRF_CONFIDENCE) / (n - 1)
    probs = np.full((n,) + labels.shape, other, dtype=np.float32)
    np.put_along_axis(probs, labels[None], IRN_CRF_CONFIDENCE, axis=0)
    return dense_crf(image, probs, CRFParams(**IRN_CRF)).argmax(0)


def seed_labels(image: np.ndarray | None, cams: np.ndarray, keys: Sequence[int], fg_threshold: float = 0.30,
                bg_threshold: float = 0.10, crf: bool = False) -> np.ndarray:
    """IRN seed mask uint8 (H, W): class k + 1 where the fg-threshold map says foreground, 0 where
    the bg-threshold map says background, 255 elsewhere. `crf` refines both maps (needs `image`)."""
    keys = np.asarray(keys, dtype=np.int64)
    cams = np.asarray(cams, dtype=np.float32)
    lut = np.concatenate([[0], keys + 1]).astype(np.int64)
    fg = _threshold_labels(cams, fg_threshold)
    bg = _threshold_labels(cams, bg_threshold)
    if crf:
        if image is None:
            raise WsclipError("CRF seed refinement needs the image")
        fg = _crf_labels(image, fg, len(keys) + 1)
        bg = _crf_labels(image, bg, len(keys) + 1)
    fg_conf, bg_conf = lut[fg], lut[bg]
    seeds = fg_conf.copy()
    seeds[fg_conf == 0] = SEED_IGNORE
    seeds[(fg_conf == 0) & (bg_conf == 0)] = 0
    return seeds.astype(np.uint8)


def _seed_job(args) -> str:
    from wsclip.io import write_mask

    image, cam_path, out_path, fg, bg, crf = args
    keys, cams = load_cam_file(cam_path, image.shape[:2])
    write_mask(out_path, seed_labels(image, cams, keys, fg, bg, crf))
    return str(out_path)


def resolve_crf(crf: str | bool) -> bool:
    """'auto' -> whether pydensecrf is importable; 'on' requires it (MissingExtraError otherwise)."""
    if crf in (True, "on", "yes", "true"):
        from wsclip.refine.crf import check_available

        check_available()
        return True
    if crf in (False, "off", "no", "false"):
        return False
    if crf != "auto":
        raise WsclipError(f"crf must be auto, on or off, got '{crf}'")
    return crf_available()


def make_seeds(dataset, cam_dir, out_dir, fg_threshold: float = 0.30, bg_threshold: float = 0.10,
               crf: str | bool = "auto", workers: int = 1, restart: bool = False, on_error: str = "fail") -> Path:
    """Write one seed PNG per dataset image into `out_dir` (a resumable `wsclip.jobs.Job`); returns out_dir.

    `workers` > 1 computes them in that many processes (0: one per CPU core).
    The log says whether the seeds are CRF-refined or come from the thresholds alone.
    """
    from wsclip.jobs import Job

    use_crf = resolve_crf(crf)
    log.info("IRN seeds: fg %.2f / bg %.2f, %s", fg_threshold, bg_threshold,
             "CRF-refined" if use_crf else "thresholds alone (no CRF: install the [crf] extra to refine them)")
    cam_dir, out_dir = Path(cam_dir), Path(out_dir)
    if not cam_dir.is_dir():
        raise MissingFileError(f"CAM folder not found: {cam_dir}; run `wsclip cam` first")
    info = {"fg_threshold": float(fg_threshold), "bg_threshold": float(bg_threshold), "crf": use_crf,
            "cams": str(cam_dir)}
    missing = [i for i in dataset.ids if not (cam_dir / f"{i}.npz").is_file()]
    if missing:
        raise MissingFileError(
            f"{len(missing)} images have no CAM file in {cam_dir}, e.g. {missing[0]}.npz: run `wsclip cam` on the same split"
        )
    if workers <= 0:
        from wsclip.refine.crf import default_workers

        workers = default_workers()
    with Job("seeds", out_dir, info, config_file=SEED_INFO, restart=restart, on_error=on_error, desc="irn seeds",
             what="seeds") as job:
        todo = set(job.start(list(dataset.ids)))

        def work(i: int) -> tuple:
            image_id = dataset.ids[i]
            return (dataset.load_image(i), cam_dir / f"{image_id}.npz", out_dir / f"{image_id}.png",
                    fg_threshold, bg_threshold, use_crf)

        order = [i for i, image_id in enumerate(dataset.ids) if image_id in todo]
        if workers > 1 and len(order) > 1:
            from concurrent.futures import ProcessPoolExecutor

            from wsclip.workers import die_with_parent

            with ProcessPoolExecutor(max_workers=workers, initializer=die_with_parent) as pool:
                for i in order:
                    job.submit(pool, dataset.ids[i], _seed_job, work(i))
                    job.drain(keep=2 * workers)
                    job.raise_failure()
                job.drain(keep=0)
        else:
            for i in order:
                with job.item(dataset.ids[i]):
                    _seed_job(work(i))
        job.raise_failure()
        job.finish()
    return out_dir


class SeedDataset(Dataset):
    """Images of a dataset with their seed PNGs as "mask" (for the IRN transform and loss)."""

    def __init__(self, base, seed_dir, transform=None):
        self.base, self.seed_dir, self.transform = base, Path(seed_dir), transform
        self.ids, self.classes = list(base.ids), tuple(base.classes)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        from wsclip.io import read_mask

        image = self.base.load_image(i)
        mask = read_mask(self.seed_dir / f"{self.ids[i]}.png")
        if mask.shape != image.shape[:2]:
            raise ShapeError(f"seed mask of {self.ids[i]} is {mask.shape}, its image {image.shape[:2]}: delete "
                             f"{self.seed_dir} to rebuild the seeds")
        sample = {"id": self.ids[i], "image": image, "mask": mask}
        return self.transform(sample) if self.transform is not None else sample


# ============================================================================ training
class IrnObjective:
    """step_fn for the Trainer: boundary logits -> probabilities -> affinity loss against the seeds."""

    def __init__(self, radius: int = 10):
        self.radius = int(radius)

    def __call__(self, model, batch):
        logits = model(batch["image"])
        edge = torch.sigmoid(logits.float())[:, 0]
        seeds = downsample_seeds(batch["mask"], tuple(edge.shape[-2:]))
        return affinity_loss(edge, seeds, self.radius)


FINAL_NAME = "irn.safetensors"


def train_irn(cfg, resume: bool = False, dataset=None, callbacks: Iterable = ()) -> Path:
    """Make the seeds (once) and train the boundary branch; returns the path of the final checkpoint.

    `dataset` may be given pre-built (tests): a wsclip dataset without transform.
    """
    from wsclip.config import save_yaml
    from wsclip.data import open_dataset
    from wsclip.data.transforms import clims_train_transform, collate
    from wsclip.models.irn import build_irn, irn_meta, save_irn
    from wsclip.train.loop import Trainer, init_distributed, rank, seed_everything

    cfg.validate()
    if not 0 <= cfg.bg_threshold <= cfg.fg_threshold:
        raise WsclipError(f"need 0 <= bg threshold <= fg threshold, got {cfg.bg_threshold} and {cfg.fg_threshold}")
    init_distributed()
    if dataset is None:
        if not cfg.data:
            raise WsclipError("no training data given: pass --data (a VOC/COCO folder, folder:DIR or synth:)")
        dataset = open_dataset(cfg.data, split=cfg.split)
    out = Path(cfg.out)
    seed_dir = Path(cfg.seeds) if cfg.seeds else out / "seeds"
    if not cfg.cams:
        raise WsclipError("no CAMs given: pass --cams DIR (the .npz files of `wsclip cam` for this split)")
    if rank() == 0:
        make_seeds(dataset, cfg.cams, seed_dir, cfg.fg_threshold, cfg.bg_threshold, cfg.crf, cfg.seed_workers)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()

    seed_everything(cfg.seed)
    net = build_irn(cfg.backbone, cfg.pretrained)
    if cfg.backbone_from:
        from wsclip.io import load_checkpoint

        tensors, meta = load_checkpoint(cfg.backbone_from)
        if meta.get("backbone") not in (None, cfg.backbone):
            raise WsclipError(f"{cfg.backbone_from} has a {meta.get('backbone')} backbone, this run uses "
                              f"--backbone {cfg.backbone}")
        net.load_backbone(tensors)
    elif not cfg.pretrained and not cfg.backbone.startswith("tiny"):
        log.warning("IRN backbone is randomly initialised: pass --pretrained (ImageNet weights) or --backbone-from")

    tf = clims_train_transform(crop=cfg.crop, scale=tuple(cfg.resize_long))
    train_set = SeedDataset(dataset, seed_dir, tf)
    trainer = Trainer(
        net, IrnObjective(cfg.radius), train_set, param_groups=[(net.trainable_parameters(), 1.0)],
        model_meta=irn_meta(net, cfg.radius, {"preset": cfg.preset}), desc="train irn", callbacks=callbacks,
        out_dir=cfg.out, batch_size=cfg.batch_size, lr=cfg.lr, max_steps=cfg.max_steps, epochs=cfg.epochs,
        momentum=cfg.momentum, weight_decay=cfg.weight_decay, poly_power=cfg.poly_power,
        accum_steps=cfg.accum_steps, amp=cfg.amp, seed=cfg.seed, ckpt_every=cfg.ckpt_every,
        log_every=cfg.log_every, sync_bn=False, device=cfg.device, num_workers=cfg.num_workers,
        collate_fn=collate,
    )
    if trainer.is_main and (resume or trainer.latest_checkpoint() is None):
        save_yaml(cfg, out / "config.yaml")
    model = trainer.fit(resume=resume)
    final = out / FINAL_NAME
    if trainer.is_main:
        seeds_info = json.loads((seed_dir / SEED_INFO).read_text())
        save_irn(final, model, cfg.radius, {"preset": cfg.preset, "steps": trainer.max_steps, "seeds": seeds_info})
    return final


# ============================================================================ inference
def predict_boundary(image, model, flip: bool = True, device=None) -> torch.Tensor:
    """Class-boundary map B (ceil(H/4), ceil(W/4)) float32 in [0, 1]: see wsclip.models.irn.predict_boundary."""
    from wsclip.models.irn import predict_boundary as _predict

    return _predict(image, model, flip=flip, device=device)


__all__: Sequence[str] = (
    "IrnObjective", "SeedDataset", "affinity_labels", "affinity_loss", "downsample_seeds", "load_cam_file",
    "make_seeds", "path_max", "path_max_reference", "path_pixels", "predict_boundary", "seed_labels", "train_irn",
)
