"""`wsclip label`: label a folder, glob, list file or VOC/COCO split with any labeler, pipelined and resumable.

Pipeline: a reader thread (CPU) or DataLoader workers (CUDA) decode images (or, on CUDA, read
JPEG bytes for nvJPEG decoding on the GPU) -> the main thread runs the labeler on windows of
images -> refinement (CRF) and file encoding (palette PNG, CAM .npz, overlay) run in a worker
pool while the next window is on the device (`plan_workers` sets the thread budget).
Outputs, under --out:

    <id>.png                palette mask (0 background, k class k, 255 ignore)
    cams/<id>.npz           with --cams: keys, cam (stride 4), high_res (the `wsclip cam` format)
    overlays/<id>.png       with --overlays
    annotations.json        with --rle: COCO-style RLE annotations of every labelled image (each
                            image entry with its quality score, "wsclip_quality")
    manifest.jsonl          one line per finished (or failed) image; what a re-run skips; each line
                            carries the image's quality score and its signals (wsclip.label.quality),
                            and with --gt DIR its per-class IoU
    classes.json            the class names (mask value k + 1 is class k)
    review.json             accept / reject marks of `wsclip review` (the exports honour them)
    errors.json             images skipped with --on-error skip, and why
    summary.json            counts, throughput, errors of the last run
    label_config.json       the settings the outputs were made with (a re-run must match them)

Reproducibility: images are labelled in fixed windows of the input order (`--window`, default 4
batches); the labeler sees the same window whatever was already done, so a killed and resumed run,
or a Ray run, writes byte-identical masks to an uninterrupted one. Every file is written atomically.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from wsclip.errors import MissingFileError, WsclipError
from wsclip.jobs import MANIFEST, ON_ERROR, Job, Manifest, error_record  # noqa: F401 - re-exported
from wsclip.serve.labelers import LabelerConfig, LabelResult, host_image
from wsclip.serve.sources import ImageSource, attach_labels, open_source  # noqa: F401 - re-exported
from wsclip.stages import stage
from wsclip.workers import die_with_parent

CONFIG_FILE = "label_config.json"
CLASSES_FILE = "classes.json"
DECODERS = ("auto", "cpu", "gpu")


# ============================================================================ options and per-image work
@dataclass
class OutputOptions:
    """What to write for each image (picklable: sent to pool workers and Ray actors)."""

    out: Path
    cams: bool = False
    overlays: bool = False
    rle: bool = False
    classes: tuple[str, ...] = ()
    crf: bool = False
    quality: bool = True              # the quality score (wsclip.label.quality) in each record
    gt: Path | None = None            # folder of ground-truth <id>.png: per-image IoU in the record

    @property
    def wants_cams(self) -> bool:
        """Whether the labeler must return CAMs (written with --cams; the quality score's sharpness)."""
        return self.cams or self.quality


def windows(n: int, size: int) -> list[range]:
    """Consecutive index windows of the input order: the fixed units the labeler runs on."""
    if size < 1:
        raise WsclipError(f"window must be at least 1 image, got {size}")
    return [range(s, min(n, s + size)) for s in range(0, n, size)]


def finish_image(image_id: str, image, result: LabelResult, opts: OutputOptions, path: str | None = None) -> dict:
    """Refine (CRF) and write one image's outputs atomically; returns its manifest record.

    `path`: the image's file, recorded for `wsclip review` and the mask exports.
    """
    from wsclip.serve.labelers import refine_result

    before = None
    if opts.crf:
        with stage("crf"):
            image = host_image(image) if image is not None else None
            before = result.mask.copy() if result.crf_scores is not None else None
            result = refine_result(image, result)
    with stage("encode"):
        image = host_image(image) if opts.overlays and image is not None else image  # only overlays draw it
        return _write_outputs(image_id, image, result, opts, path, before)


def _write_outputs(image_id: str, image, result: LabelResult, opts: OutputOptions, path, before) -> dict:
    from wsclip.io import atomic_write_bytes, encode_mask_png
    from wsclip.serve.labelers import mask_annotations

    out = Path(opts.out)
    mask = result.mask
    files = []
    if opts.cams and result.cams is not None:
        from wsclip.formats import write_cam_file

        write_cam_file(out / "cams" / f"{image_id}.npz", result.keys, cam_low(result), result.cams)
        files.append(f"cams/{image_id}.npz")
    if opts.overlays:
        from wsclip.eval.viz import encode_png, overlay

        atomic_write_bytes(out / "overlays" / f"{image_id}.png", encode_png(overlay(image, mask)))
        files.append(f"overlays/{image_id}.png")
    atomic_write_bytes(out / f"{image_id}.png", encode_mask_png(mask))  # last: its presence marks the image done
    files.insert(0, f"{image_id}.png")
    rec = {"id": image_id, "status": "ok", "size": [int(mask.shape[0]), int(mask.shape[1])],
           "labels": [opts.classes[int(k)] for k in result.keys], "label_ids": [int(k) + 1 for k in result.keys],
           "predicted": bool(result.predicted), "files": files}
    if path is not None:
        rec["image"] = path
    if opts.rle:
        rec["annotations"] = mask_annotations(mask, opts.classes)
    if opts.quality:
        rec["quality"] = image_quality(image_id, mask, result, before, opts)
    return rec


def cam_low(result: LabelResult) -> np.ndarray:
    """The stride-4 maps of a CAM file: the predictor's own (PyTorch) or, for exported graphs (which output
    full-size CAMs only), the full-size maps resized bilinearly and max-normalised."""
    if result.low is not None:
        return result.low
    from wsclip.constants import CAM_EPS, CAM_STRIDE
    from wsclip.label.cam_labeler import strided_size

    high = torch.from_numpy(result.cams)
    size = strided_size(high.shape[-2:], CAM_STRIDE)
    if not len(high):
        return np.zeros((0, *size), np.float32)
    low = torch.nn.functional.interpolate(high[None], size=size, mode="bilinear", align_corners=False)[0]
    return (low / (low.amax(dim=(1, 2), keepdim=True) + CAM_EPS)).numpy()


def image_quality(image_id: str, mask: np.ndarray, result: LabelResult, before, opts: OutputOptions) -> dict:
    """The record's "quality" entry; with opts.gt, the IoU against <gt>/<id>.png when that file exists."""
    from wsclip.io import read_mask
    from wsclip.label.quality import assess

    gt = None
    if opts.gt is not None and (Path(opts.gt) / f"{image_id}.png").is_file():
        gt = read_mask(Path(opts.gt) / f"{image_id}.png")
    return assess(mask, result.keys, result.cams, before, gt=gt, num_classes=len(opts.classes) + 1)


def label_window(labeler, items: Sequence[tuple], want_cams: bool, on_result=None) -> tuple[list[tuple], list[dict]]:
    """Run the labeler on one window of decoded items (index, id, image, labels, error).

    Returns ([(id, image, result)], [error records]); `on_result(id, image, result)` gets each image
    as soon as its batch is done. A failure of the whole window (e.g. labels missing) raises; a bad
    image only fails itself.
    """
    good = [it for it in items if it[4] is None]
    errors = [error_record(it[1], it[4]) for it in items if it[4] is not None]
    if not good:
        return [], errors
    hand = None if on_result is None else (lambda i, r: on_result(good[i][1], good[i][2], r))
    results = labeler.label_batch([it[2] for it in good], [it[3] for it in good], want_cams=want_cams, on_result=hand)
    return [(it[1], it[2], r) for it, r in zip(good, results)], errors


def load_item(source: ImageSource, i: int, raw_jpeg: bool = False) -> tuple:
    """(index, id, image or JPEG bytes, labels, error message or None) of input i."""
    image_id = source.ids[i]
    try:
        with stage("read"):
            if raw_jpeg and (p := source.path(i)) is not None and p.suffix.lower() in (".jpg", ".jpeg"):
                from wsclip.io import open_image, plain_jpeg

                image = p.read_bytes()  # for the GPU decoder, unless it needs open_image (CMYK, EXIF, huge, broken)
                image = image if plain_jpeg(image) else open_image(p)
            else:
                image = source.load(i)
        return i, image_id, image, source.label(i), None
    except (WsclipError, OSError) as exc:
        return i, image_id, None, None, str(exc)


class _Items(torch.utils.data.Dataset):
    def __init__(self, source: ImageSource, order: Sequence[int], raw_jpeg: bool):
        self.source, self.order, self.raw_jpeg = source, list(order), raw_jpeg

    def __len__(self):
        return len(self.order)

    def __getitem__(self, n):
        return load_item(self.source, self.order[n], self.raw_jpeg)


def _identity(x):
    return x


def gpu_decode(items: list[tuple], device: torch.device) -> list[tuple]:  # pragma: no cover - needs CUDA
    """Decode the JPEG bytes among `items` on the GPU (torchvision nvJPEG) in one call; others pass through.

    If the batched call fails (a corrupt file, or no nvJPEG in this torchvision), each image is decoded
    on its own, on the GPU or else with PIL; an image neither can decode becomes an error item.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    from wsclip.io import decode_image_bytes

    idx = [n for n, it in enumerate(items) if isinstance(it[2], (bytes, bytearray))]
    if not idx:
        return items
    items = list(items)
    datas = [torch.frombuffer(bytearray(items[n][2]), dtype=torch.uint8) for n in idx]
    try:
        decoded = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        decoded = []
        for n, d in zip(idx, datas):
            try:
                decoded.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                try:
                    decoded.append(decode_image_bytes(bytes(items[n][2])))
                except WsclipError as exc:
                    decoded.append(exc)
    for n, im in zip(idx, decoded):
        i, image_id, _, lab, _ = items[n]
        items[n] = (i, image_id, None, None, str(im)) if isinstance(im, Exception) else (i, image_id, im, lab, None)
    return items


# ============================================================================ the run
@dataclass
class LabelRunConfig:
    """`wsclip label` settings besides the labeler's."""

    out: Path
    window: int | None = None         # images per window (default 4 batches)
    workers: int | None = None        # DataLoader decode processes (None: `plan_workers`; 0: a reader thread)
    post_workers: int | None = None   # refinement / encoding workers (None: `plan_workers`; 0: the main thread)
    on_error: str = "skip"
    cams: bool = False
    overlays: bool = False
    rle: bool = False
    decode: str = "auto"
    restart: bool = False
    gt: Path | None = None            # ground-truth masks: per-image IoU in the manifest


def _settings(cfg: LabelerConfig, run: LabelRunConfig, window: int, source: ImageSource, decoder: str) -> dict:
    """What the outputs depend on; a resumed run must match it.

    `decoder`: "pil" or "nvjpeg" (GPU JPEG decoding differs from PIL's by a few levels per pixel,
    so a run is never resumed with the other one).
    """
    from wsclip.io import file_sha256

    lab = asdict(cfg)
    lab.pop("device", None)
    lab.pop("threads", None)
    for key in ("model", "irn", "clip"):
        if lab.get(key):
            lab[key] = {"path": str(lab[key]), "sha256": file_sha256(lab[key]) if Path(lab[key]).is_file() else None}
    lab["scales"] = list(lab["scales"])
    out = {"labeler": lab, "window": window, "cams": run.cams, "overlays": run.overlays, "rle": run.rle,
           "labels": "given" if source.has_labels else "predicted", "decoder": decoder}
    if run.gt is not None:  # only when given: folders labelled before --gt existed keep resuming
        out["gt"] = str(Path(run.gt).resolve())
    return out


def label_job(labeler_cfg: LabelerConfig, run: LabelRunConfig, window: int, source: ImageSource, decoder: str,
              on_image=None) -> Job:
    """The `wsclip.jobs.Job` of a label run (local or Ray): lock, settings check, manifest of `run.out`."""
    return Job("label", run.out, _settings(labeler_cfg, run, window, source, decoder), restart=run.restart,
               on_error=run.on_error, config_file=CONFIG_FILE, desc="label", on_item=on_image)


def plan_windows(source: ImageSource, window: int, done: set[str]) -> list[range]:
    """The windows of the input order that hold an image not finished yet."""
    return [w for w in windows(len(source), window) if any(source.ids[i] not in done for i in w)]


def plan_workers(run: LabelRunConfig, device: torch.device, crf: bool) -> tuple[int, int]:
    """(decode processes, refinement/encoding workers): the thread budget of a run.

    On the CPU the network's threads already use every core; decode processes and an encoding
    pool beside them oversubscribe the cores (every oversubscribed OpenMP region waits for its
    slowest thread). So decoding runs in one reader thread of this process (PIL and zlib release
    the GIL: it overlaps compute without an extra process) and encoding in one thread (its fsync
    waits overlap too); a CRF pool gets one process. On CUDA the CPU is free for them: 2 decode
    processes and 2 workers. Values given in `run` are kept.
    """
    cpu = device.type == "cpu"
    workers = run.workers if run.workers is not None else (0 if cpu else 2)
    post = run.post_workers if run.post_workers is not None else (1 if cpu else 2)
    return max(0, int(workers)), max(0, int(post))


def _read_ahead(source: ImageSource, order: Sequence[int], raw_jpeg: bool, ahead: int) -> Iterator[tuple]:
    """load_item over `order` in one reader thread, up to `ahead` items in advance (overlaps decoding)."""
    todo = iter(order)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsclip-read") as reader:
        pending = deque(reader.submit(load_item, source, i, raw_jpeg) for i in islice(todo, max(1, ahead)))
        while pending:
            item = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(reader.submit(load_item, source, nxt, raw_jpeg))
            yield item


def _make_pool(n: int, crf: bool) -> Executor | None:
    if n <= 0:
        return None
    if crf:  # pydensecrf holds the GIL: processes
        from wsclip.refine.crf import crf_pool

        return crf_pool(n, spawn=True)
    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="wsclip-post")


def write_reports(job: Job, source: ImageSource, rle: bool, classes: Sequence[str], **summary) -> dict:
    """errors.json, summary.json and (with --rle) annotations.json of a label run; returns the summary."""
    from wsclip.io import atomic_write_json

    seconds = job.seconds
    summary = job.finish(labelled=job.counts["done"], **summary,
                         images_per_s=round(job.counts["done"] / seconds, 3) if seconds > 0 else None)
    atomic_write_json(job.out / CLASSES_FILE, list(classes))
    if rle:
        images, anns = [], []
        for n, image_id in enumerate(source.ids):
            rec = job.manifest.records.get(image_id)
            if not rec or rec.get("status") != "ok":
                continue
            path = source.path(n)
            file_name = image_id + path.suffix if path is not None else image_id  # the image's file, as COCO means
            images.append({"id": n + 1, "file_name": file_name, "height": rec["size"][0], "width": rec["size"][1],
                           **({"wsclip_quality": rec["quality"]["score"]} if rec.get("quality") else {})})
            for a in rec.get("annotations", []):
                anns.append({"id": len(anns) + 1, "image_id": n + 1, "category_id": a["category_id"],
                             "segmentation": a["segmentation"], "area": a["area"], "bbox": a["bbox"], "iscrowd": 0})
        cats = [{"id": k + 1, "name": c} for k, c in enumerate(classes)]
        atomic_write_json(job.out / "annotations.json", {"images": images, "annotations": anns, "categories": cats})
    return summary


def label_images(labeler_cfg: LabelerConfig, inputs, run: LabelRunConfig, split: str | None = None,
                 labels=None, limit: int | None = None, labeler=None, on_image=None) -> dict:
    """Label every input image into `run.out` (resumable); returns the run summary.

    `inputs`: anything `open_source` takes, or an ImageSource. `labeler`: an already loaded
    labeler for `labeler_cfg` (else it is loaded here).
    """
    from wsclip.serve.labelers import load_labeler

    if run.on_error not in ON_ERROR:
        raise WsclipError(f"--on-error must be one of {', '.join(ON_ERROR)}, got '{run.on_error}'")
    if run.decode not in DECODERS:
        raise WsclipError(f"--decode must be one of {', '.join(DECODERS)}, got '{run.decode}'")
    source = inputs if isinstance(inputs, ImageSource) else open_source(inputs, split, limit=limit)  # cheap checks first
    labeler = labeler or load_labeler(labeler_cfg)
    source = attach_labels(source, labels, labeler.classes)
    if labeler.needs_labels and not source.has_labels and labeler.predictor is None:
        raise WsclipError(f"the {labeler.method} method needs image-level labels and {inputs} has none: pass "
                          "--labels FILE, or --predict cam / --predict clip --clip FILE")
    window = int(run.window or 4 * labeler.batch_size)
    if run.decode == "gpu" and labeler.device.type != "cuda":
        raise WsclipError("--decode gpu needs a CUDA device (--device cuda)")
    with label_job(labeler_cfg, run, window, source, _decoder(labeler, run), on_image) as job:
        return _run(labeler, source, run, job, window)


def _decoder(labeler, run: LabelRunConfig) -> str:
    """"nvjpeg" (JPEG decoded on the labeler's GPU) or "pil" (decoded by the DataLoader workers)."""
    return "nvjpeg" if labeler.device.type == "cuda" and run.decode in ("auto", "gpu") else "pil"


def _run(labeler, source: ImageSource, run: LabelRunConfig, job: Job, window: int) -> dict:
    """Label the unfinished windows; every image's record reaches the manifest as soon as its files are written."""
    done = job.finished()
    wins = plan_windows(source, window, done)
    job.start(source.ids)
    opts = OutputOptions(out=job.out, cams=run.cams, overlays=run.overlays, rle=run.rle, classes=labeler.classes,
                         crf=labeler.refine == "crf", gt=run.gt)
    if run.gt is not None and not Path(run.gt).is_dir():
        raise MissingFileError(f"ground-truth folder not found: {run.gt} (give a folder of <id>.png masks)")
    gpu_jpeg = _decoder(labeler, run) == "nvjpeg"
    order = [i for w in wins for i in w]
    workers, post_workers = plan_workers(run, labeler.device, opts.crf)
    if workers > 0:
        loader = torch.utils.data.DataLoader(
            _Items(source, order, gpu_jpeg), batch_size=None, shuffle=False, num_workers=workers,
            collate_fn=_identity, worker_init_fn=die_with_parent, persistent_workers=False,
            prefetch_factor=2 * window // workers + 1)
    else:
        loader = _read_ahead(source, order, gpu_jpeg, ahead=window)
    pool = _make_pool(post_workers, opts.crf)
    limit = max(2 * window, 4 * max(1, post_workers))
    try:
        it = iter(loader)
        for w in wins:
            items = [next(it) for _ in w]
            if gpu_jpeg:
                items = gpu_decode(items, labeler.device)

            def hand_over(image_id, image, result):  # as soon as its batch is done: encoding overlaps the next one
                if image_id in done:
                    return
                image = host_image(image) if opts.crf or opts.overlays else None  # only these need the pixels
                if pool is None:
                    try:
                        rec = finish_image(image_id, image, result, opts, source.file_of(image_id))
                    except (WsclipError, OSError) as exc:
                        rec = error_record(image_id, str(exc))
                    job.record(rec)
                else:
                    job.submit(pool, image_id, finish_image, image_id, image, result, opts, source.file_of(image_id))

            _, errs = label_window(labeler, items, opts.wants_cams, on_result=hand_over)
            for rec in errs:
                if rec["id"] not in done:
                    job.record(rec)
            job.drain(keep=limit)
            if job.first_failure and run.on_error == "fail":
                break
        job.drain(keep=0)
    finally:
        if not isinstance(loader, torch.utils.data.DataLoader):
            loader.close()  # the reader thread stops
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)  # running items finish and write their records
    job.raise_failure()
    return write_reports(job, source, run.rle, labeler.classes, labeler=labeler.describe())


def format_summary(summary: dict) -> str:
    """A few lines for the terminal."""
    lines = [f"labelled {summary['labelled']} images ({summary['skipped_done']} already done, "
             f"{summary['total']} total) in {summary['seconds']:.1f} s"
             + (f" = {summary['images_per_s']:.2f} images/s" if summary.get("images_per_s") else "")]
    if summary["errors"]:
        lines.append(f"{summary['errors']} images skipped (see errors.json): {', '.join(summary['error_ids'][:5])}"
                     + (" ..." if summary["errors"] > 5 else ""))
    return "\n".join(lines)
