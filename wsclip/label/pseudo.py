"""Pseudo masks from CAM files (METHODS.md sections 5 and 6): `wsclip pseudo`.

Per image: scores = [background, CAMs of the present classes], background either a constant
threshold or (1 - max_c CAM)^alpha; optionally IRN random walk (boundary maps from an IRN
checkpoint or a folder), dense CRF (in worker processes) and the confidence filter of CLIP-ES's
CGL (max posterior below 0.95 -> 255); argmax; a palette PNG per image (`wsclip eval` reads it).
Outputs are written atomically; existing PNGs are skipped, so a killed run resumes. Each mask's
quality score (wsclip.label.quality: CGL-dropped share, CRF changes, CAM sharpness, degenerate classes)
goes to `quality.json` ({id: quality}) in the output folder, for `wsclip review` and the exports. A corrupt
or mismatched CAM file is reported by name and skipped (`on_error="skip"`) or stops the run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from wsclip.errors import BadFileError, DatasetLayoutError, MissingFileError, ShapeError, WsclipError
from wsclip.constants import IGNORE_INDEX
from wsclip.formats import read_cams
from wsclip.jobs import error_record
from wsclip.label.masks import background_argmax
from wsclip.refine.crf import CRFParams, crf_pool

__all__ = ["PseudoConfig", "stack_scores", "scores_to_mask", "read_cams", "make_pseudo_masks"]

BACKGROUNDS = ("power", "threshold")
QUALITY_FILE = "quality.json"  # {id: quality entry} of the masks in a `wsclip pseudo` folder
ON_ERROR = ("skip", "fail")


@dataclass
class PseudoConfig:
    """How CAMs become masks. Defaults: CLIP-ES's background (1 - max)^1, no refinement.

    `compat` ("wsclip" or "official", wsclip.compat) decides the CRF settings left None (crf_params.uint8_wrap).
    """

    key: str = "high_res"  # which maps of the CAM file ("high_res_raw": CLIP-ES maps without CAA)
    bg: str = "power"  # "power": (1 - max)^alpha; "threshold": the constant bg_threshold
    alpha: float = 1.0
    bg_threshold: float = 0.15
    crf: bool = False
    crf_params: CRFParams = field(default_factory=CRFParams)
    confidence: float | None = None  # CGL: 0.95 (pixels below -> 255)
    rw_beta: float = 10.0
    rw_exp_times: int = 8
    rw_radius: int = 5
    rw_bg_threshold: float = 0.20  # VOC (COCO 0.25)
    on_error: str = "fail"
    workers: int | None = None  # CRF worker processes (None: all cores; 0 or 1: in this process)
    compat: str = "wsclip"

    def check(self) -> None:
        if self.bg not in BACKGROUNDS:
            raise WsclipError(f"unknown background rule {self.bg!r}: use one of {', '.join(BACKGROUNDS)}")
        if self.on_error not in ON_ERROR:
            raise WsclipError(f"--on-error must be one of {', '.join(ON_ERROR)}, got {self.on_error!r}")
        if self.confidence is not None and not 0.0 <= self.confidence <= 1.0:
            raise WsclipError(f"confidence must be in [0, 1], got {self.confidence}")


# ----------------------------------------------------------------------------- per image
def stack_scores(cams: np.ndarray, cfg: PseudoConfig) -> np.ndarray:
    """(1 + K, H, W) float32: the background score in front of the CAMs (K, H, W)."""
    cams = np.asarray(cams, dtype=np.float32)
    if cfg.bg == "threshold":
        bg = np.full(cams.shape[1:], cfg.bg_threshold, dtype=np.float32)
    else:
        top = cams.max(0) if len(cams) else np.zeros(cams.shape[1:], np.float32)
        bg = np.power(np.clip(1.0 - top, 0.0, 1.0), cfg.alpha).astype(np.float32)
    return np.concatenate([bg[None], cams]).astype(np.float32)


def scores_to_mask(scores: np.ndarray, keys, confidence: float | None = None) -> np.ndarray:
    """uint8 mask (H, W): argmax over [bg, classes] mapped to 0 / keys + 1; max below `confidence` -> 255."""
    scores = np.asarray(scores)
    mask = background_argmax(scores[1:], scores[0], keys)
    if confidence is not None:
        mask[scores.max(0) < confidence] = IGNORE_INDEX
    return mask.astype(np.uint8)


def random_walk_scores(cams: np.ndarray, edge, cfg: PseudoConfig, low=None, device=None) -> np.ndarray:
    """IRN refinement of CAMs (K, H, W) with a boundary map (h, w) at stride 4: (1 + K, H, W) scores.

    `low`: the file's own maps on the boundary grid if it has them (IRN's stride-4 "cam"); otherwise the
    maps are resized to the boundary grid.
    """
    from wsclip.refine.random_walk import irn_refine

    e = torch.as_tensor(np.asarray(edge, dtype=np.float32))
    if e.dim() != 2:
        raise ShapeError(f"boundary map must be (h, w), got {tuple(e.shape)}")
    dev = device or e.device
    H, W = cams.shape[1:]
    if low is not None and tuple(low.shape[1:]) == tuple(e.shape) and low.shape[0] == cams.shape[0]:
        x = torch.as_tensor(np.asarray(low, dtype=np.float32))
    elif len(cams):
        x = F.interpolate(torch.from_numpy(cams)[None], size=tuple(e.shape), mode="bilinear", align_corners=False)[0]
    else:
        x = torch.zeros(0, *e.shape)
    scale = max(1, round(H / e.shape[0]))
    scores, _ = irn_refine(x.to(dev), e.to(dev), beta=cfg.rw_beta, exp_times=cfg.rw_exp_times, radius=cfg.rw_radius,
                           bg_threshold=cfg.rw_bg_threshold, scale=scale, size=(H, W))
    if tuple(scores.shape[-2:]) != (H, W):  # boundary grid coarser than ceil(H / scale): stretch to the image
        scores = F.interpolate(scores[None], size=(H, W), mode="bilinear", align_corners=False)[0]
    return scores.float().cpu().numpy()


def _finish(job) -> dict:
    """Worker side: optional CRF, confidence filter, argmax, atomic PNG write. Returns the mask's quality entry."""
    from wsclip.io import write_mask
    from wsclip.label.quality import assess
    from wsclip.refine.crf import dense_crf

    image, scores, keys, out_path, cfg = job
    before = None
    cams = scores[1:]
    if cfg.crf:
        before = scores_to_mask(scores, keys)
        scores = dense_crf(image, scores, cfg.crf_params)
    mask = scores_to_mask(scores, keys, cfg.confidence)
    write_mask(out_path, mask)
    return assess(mask, keys, cams, before)


# ----------------------------------------------------------------------------- runner
def _finish_fields(job) -> dict:
    """`_finish` in a pool worker; its quality entry goes into the image's manifest record."""
    return {"quality": _finish(job)}


def _save_quality(path: Path, new: dict) -> None:
    """Merge this run's quality entries into the folder's quality.json (atomically)."""
    import json

    from wsclip.io import atomic_write_json

    if not new:
        return
    old = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = {}
    atomic_write_json(path, {**(old if isinstance(old, dict) else {}), **new})


def _open(data, split):
    if data is None or not isinstance(data, (str, Path)):
        return data
    from wsclip.data import open_images

    return open_images(data, split)


def _edge_source(irn, edges_dir, device) -> Callable | None:
    if irn is None and edges_dir is None:
        return None
    if irn is not None and edges_dir is not None:
        raise WsclipError("give either --irn (a boundary network) or --edges (a folder of boundary maps), not both")
    if edges_dir is not None:
        edges_dir = Path(edges_dir)
        if not edges_dir.is_dir():
            raise MissingFileError(f"boundary map folder not found: {edges_dir}")

        def from_folder(image_id, image):
            for suffix in (".npy", ".npz"):
                p = edges_dir / f"{image_id}{suffix}"
                if p.is_file():
                    try:
                        if suffix == ".npy":
                            return np.asarray(np.load(p, allow_pickle=False), dtype=np.float32)
                        with np.load(p, allow_pickle=False) as z:
                            return np.asarray(z["edge"], dtype=np.float32)
                    except Exception as exc:  # noqa: BLE001 - any unreadable file
                        raise BadFileError(f"cannot read boundary map {p}: {exc}") from exc
            raise MissingFileError(f"no boundary map {image_id}.npy or .npz in {edges_dir}")

        return from_folder
    from wsclip.models.irn import load_irn, predict_boundary
    from wsclip.runtime import resolve_device

    dev = resolve_device(device)
    net, _ = load_irn(irn, dev) if isinstance(irn, (str, Path)) else (irn.to(dev), None)

    def from_net(image_id, image):
        if image is None:
            raise WsclipError("the IRN boundary network needs the images: pass the dataset (--data)")
        return predict_boundary(image, net, device=dev).numpy()

    return from_net


def make_pseudo_masks(
    cam_dir,
    out_dir,
    data=None,
    split: str = "train",
    cfg: PseudoConfig | None = None,
    irn=None,
    edges_dir=None,
    device: str = "auto",
    on_image: Callable[[str], None] | None = None,
    restart: bool = False,
) -> dict:
    """Write `<out_dir>/<id>.png` for every CAM file of `cam_dir` (or every image of `data`); resumable (`wsclip.jobs`).

    data: a dataset spec or dataset, needed for the CRF and an IRN network (images) and to choose the
    ids. irn / edges_dir: IRN random walk with boundary maps from a checkpoint or a folder of
    `<id>.npy` (h, w) / `<id>.npz` ("edge") maps at stride 4. Returns {"written", "skipped",
    "failed": [(id, message)], "total"}.
    """
    from wsclip.io import read_errors
    from wsclip.jobs import Job

    from wsclip.compat import resolve

    cfg = resolve(cfg or PseudoConfig())
    cfg.check()
    cam_dir, out = Path(cam_dir), Path(out_dir)
    if not cam_dir.is_dir():
        raise MissingFileError(f"CAM folder not found: {cam_dir}")
    if cfg.crf:
        from wsclip.refine.crf import check_available

        check_available()
    ds = _open(data, split)
    if ds is None and cfg.crf:
        raise WsclipError("--crf needs the images: pass the dataset with --data")
    ids = list(ds.ids) if ds is not None else sorted(p.stem for p in cam_dir.glob("*.npz"))
    if not ids:
        raise DatasetLayoutError(f"no CAM files (*.npz) in {cam_dir}")
    if ds is None and irn is not None:
        raise WsclipError("--irn computes boundary maps from the images: pass the dataset with --data")
    edges = _edge_source(irn, edges_dir, device)
    if edges is not None:
        from wsclip.runtime import resolve_device

        rw_device = resolve_device(device)  # the random walk runs where the user asked (Triton on CUDA)
    need_image = cfg.crf or irn is not None
    cam_errors = read_errors(cam_dir)  # images `wsclip cam` skipped have no CAM file: skipped here too
    workers = cfg.workers
    if workers is None:
        from wsclip.refine.crf import default_workers

        workers = default_workers() if cfg.crf else 0
    settings = _settings(cfg, cam_dir, irn, edges_dir)
    with Job("pseudo", out, settings, restart=restart, on_error=cfg.on_error, on_item=on_image) as job:
        pool = crf_pool(workers) if (cfg.crf and workers > 1) else None
        try:
            for image_id in job.start(ids):
                if image_id in cam_errors and not (cam_dir / f"{image_id}.npz").is_file():
                    job.record(error_record(image_id, f"no CAM file: `wsclip cam` skipped it ({cam_errors[image_id]})"),
                               fatal=False)
                    continue
                image = None
                if need_image:
                    try:
                        image = ds.load_image(ds.index(image_id))
                    except WsclipError as exc:  # a bad image never stops the run (whatever --on-error says)
                        job.record(error_record(image_id, str(exc)), fatal=False)
                        continue
                with job.item(image_id, defer=pool is not None) as fields:
                    cam = read_cams(cam_dir / f"{image_id}.npz", cfg.key)
                    if image is not None and tuple(image.shape[:2]) != tuple(cam["cams"].shape[1:]):
                        raise BadFileError(
                            f"{cam_dir / (image_id + '.npz')}: maps are {cam['cams'].shape[2]}x"
                            f"{cam['cams'].shape[1]} but the image is {image.shape[1]}x{image.shape[0]}; "
                            "the CAMs belong to other images")
                    if edges is not None:
                        low = cam["file"].get("cam") if cfg.key == "high_res" else None  # "cam" pairs with "high_res"
                        scores = random_walk_scores(cam["cams"], edges(image_id, image), cfg, low=low, device=rw_device)
                    else:
                        scores = stack_scores(cam["cams"], cfg)
                    work = (image, scores, cam["keys"], job.out / f"{image_id}.png", cfg)
                    if pool is not None:
                        job.submit(pool, image_id, _finish_fields, work)
                        job.drain(keep=2 * workers)
                        job.raise_failure()
                        continue  # recorded when it finishes
                    fields["quality"] = _finish(work)
            job.drain(keep=0)
            job.raise_failure()
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            _save_quality(job.out / QUALITY_FILE, {i: r["quality"] for i, r in job.manifest.records.items()
                                                   if r.get("status") == "ok" and "quality" in r})
        return job.result()


def _settings(cfg: PseudoConfig, cam_dir: Path, irn, edges_dir) -> dict:
    """What pseudo masks depend on (a resume with other settings is refused)."""
    from wsclip.jobs import file_fingerprint

    s = asdict(cfg)
    for k in ("workers", "on_error"):
        s.pop(k)
    return {**s, "cams": str(cam_dir), "edges": str(edges_dir) if edges_dir else None,
            "irn": file_fingerprint(irn) if isinstance(irn, (str, Path)) else (type(irn).__name__ if irn else None)}
