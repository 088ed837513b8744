"""`wsclip label` and `wsclip serve`: the labeler flags (LabelerConfig, CLIP-ES options) and the two jobs."""

from __future__ import annotations

import json
from pathlib import Path

from wsclip.errors import WsclipError
from wsclip.commands import group as _group
from wsclip.commands.maps import _clip_es_args, _clip_es_options


# ============================================================================ label / serve
def _labeler_args(p, profile: bool = False):
    """The labeler flags of `label`, `serve` and `profile`: generated from LabelerConfig's fields (one edit
    adds an option to all three), plus --config (a YAML LabelerConfig) and the CLIP-ES options of `wsclip cam`.
    `profile` takes lists instead of --batch-size and --backend (--batch-sizes, --backends)."""
    from wsclip.config import add_config_args
    from wsclip.serve.labelers import LabelerConfig

    add_config_args(p, LabelerConfig, skip=("batch_size", "backend") if profile else ())
    _clip_es_args(p)


def _labeler_config(args):
    """LabelerConfig from the flags (defaults < --config YAML < flags); CLIP-ES options when CLIP-ES runs."""
    import dataclasses

    from wsclip.config import config_from_args
    from wsclip.serve.labelers import LabelerConfig

    cfg = config_from_args(LabelerConfig, args)
    if cfg.method == "clip-es" or (cfg.model is None and cfg.clip):
        cfg = dataclasses.replace(cfg, options={**cfg.options, **_clip_es_options(args), "precision": args.precision})
    return cfg


def _add_label(sub):
    p = sub.add_parser("label", help="label many images (folder, glob, list file, VOC/COCO split) into palette PNG "
                                     "masks; pipelined, resumable; --ray scales out")
    p.add_argument("--images", required=True, help="a folder, a glob ('photos/**/*.jpg'), a list file of paths, "
                                                   "or a dataset (voc:DIR, coco:DIR, folder:DIR, synth:)")
    p.add_argument("--split", help="dataset split (voc/coco), or a list file of ids for a folder dataset")
    p.add_argument("--labels", help="image-level labels file (JSON or CSV); else the dataset's, else predicted")
    p.add_argument("--out", required=True, type=Path, help="output folder (<id>.png, manifest.jsonl; re-running resumes)")
    _labeler_args(p)
    p.add_argument("--cams", action="store_true", help="also write cams/<id>.npz (the `wsclip cam` format)")
    p.add_argument("--overlays", action="store_true", help="also write overlays/<id>.png")
    p.add_argument("--rle", action="store_true", help="also write annotations.json (COCO-style RLE)")
    p.add_argument("--gt", type=Path, help="folder of ground-truth <id>.png masks: per-image IoU in the manifest")
    p.add_argument("--review-first", type=int, metavar="N",
                   help="after the run, list the N masks with the worst quality score (`wsclip review` shows them)")
    p.add_argument("--window", type=int, help="images labelled together (default 4 batches); fixes batch composition")
    p.add_argument("--workers", type=int, help="DataLoader processes decoding images (default: 0 on the CPU, "
                                               "where one reader thread overlaps decoding with compute; 2 on CUDA)")
    p.add_argument("--post-workers", type=int, help="refinement / encoding workers (0: main thread; default 1 on "
                                                    "the CPU, 2 on CUDA)")
    p.add_argument("--decode", choices=("auto", "cpu", "gpu"), default="auto", help="auto: nvJPEG on CUDA, else PIL")
    p.add_argument("--on-error", choices=("skip", "fail"), default="skip", help="a bad image: skip it (errors.json) or stop")
    p.add_argument("--limit", type=int, help="only the first N images")
    p.add_argument("--restart", action="store_true", help="relabel everything, ignoring earlier outputs in --out")
    p.add_argument("--ray", action="store_true", help="run on Ray Data (extra [ray]): one labeler per actor")
    p.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--concurrency", type=int, default=1, help="[ray] labeler actors")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="[ray] GPUs per actor (1 on GPU nodes)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="[ray] CPUs per actor")
    p.add_argument("--ray-cpus", type=int, help="[ray] CPUs of the local Ray (default: all)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_run_label)


def _run_label(args):
    from wsclip.serve.batch import LabelRunConfig, format_summary

    cfg = _labeler_config(args)
    run = LabelRunConfig(out=args.out, window=args.window, workers=args.workers, post_workers=args.post_workers,
                         on_error=args.on_error, cams=args.cams, overlays=args.overlays, rle=args.rle,
                         decode=args.decode, restart=args.restart, gt=args.gt)
    if args.ray:
        from wsclip.serve.ray_job import label_images_ray

        summary = label_images_ray(cfg, args.images, run, split=args.split, labels=args.labels, limit=args.limit,
                                   concurrency=args.concurrency, gpus_per_actor=args.gpus_per_actor,
                                   cpus_per_actor=args.cpus_per_actor, address=args.ray_address, num_cpus=args.ray_cpus)
    else:
        from wsclip.serve.batch import label_images

        summary = label_images(cfg, args.images, run, split=args.split, labels=args.labels, limit=args.limit)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    if args.review_first:
        from wsclip.serve.folder import LabeledFolder

        print(LabeledFolder(args.out).worst_table(args.review_first))
    return 1 if summary["errors"] and args.on_error == "fail" else 0


def _add_profile(sub):
    p = sub.add_parser("profile", help="per-stage latency (p50/p95/p99, share), throughput, peak memory and the "
                                       "bottleneck of a labeler on every installed backend; --trace for Perfetto")
    _labeler_args(p, profile=True)
    p.add_argument("--images", help="images as `wsclip label` takes them (default: random JPEGs of --size)")
    p.add_argument("--split", help="dataset split (voc/coco)")
    p.add_argument("--labels", help="image-level labels file (JSON or CSV); else the dataset's, else predicted")
    p.add_argument("--n", type=int, default=16, help="images per run (the inputs repeat when there are fewer)")
    p.add_argument("--batch-sizes", default="1,4", help="comma-separated batch sizes (default 1,4)")
    p.add_argument("--backends", default="all",
                   help="comma-separated: all (every installed one), auto, eager, channels-last, bf16, compile, "
                        "onnxruntime, tensorrt")
    p.add_argument("--size", default="320x320", help="HxW of the random images when --images is not given")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches first (kernel selection, compilation)")
    p.add_argument("--trace", type=Path, help="write a Chrome/Perfetto trace (torch.profiler, ranges wsclip.<stage>)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_run_profile)


def _run_profile(args):
    from wsclip.profile import ProfileConfig, format_profile, parse_size, profile

    try:
        batches = tuple(int(b) for b in args.batch_sizes.split(",") if b.strip())
    except ValueError:
        raise WsclipError(f"--batch-sizes must be comma-separated integers, got '{args.batch_sizes}'") from None
    cfg = ProfileConfig(labeler=_labeler_config(args), images=args.images, split=args.split, labels=args.labels,
                        n=args.n, batch_sizes=batches,
                        backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()),
                        size=parse_size(args.size), warmup=args.warmup, trace=args.trace)
    if cfg.labeler.threads and cfg.labeler.device in ("auto", "cpu"):
        import torch

        torch.set_num_threads(int(cfg.labeler.threads))
    result = profile(cfg)
    print(json.dumps(result, indent=2) if args.json else format_profile(result))
    return 0


def _add_serve(sub):
    p = sub.add_parser("serve", help="HTTP labeling server (extra [serve]): POST /v1/label, /health, /metrics")
    _labeler_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: a free one, printed at start)")
    p.add_argument("--max-batch-size", type=int, default=8, help="largest dynamic batch")
    p.add_argument("--max-queue-delay-ms", type=float, default=5.0, help="how long a request waits for others to batch with")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body")
    p.add_argument("--max-pixels", type=int, default=36_000_000, help="largest image (width x height)")
    p.add_argument("--max-batch-items", type=int, default=32, help="images per /v1/label/batch request")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a request may wait for its result")
    p.add_argument("--read-timeout", type=float, default=30.0, help="seconds to receive a request body (then 408)")
    p.add_argument("--token-file", type=Path, help="file holding a bearer token to require (or env WSCLIP_SERVE_TOKEN)")
    p.add_argument("--review", type=Path, metavar="OUT_DIR",
                   help="also serve the review page of this labelled folder under /review (see `wsclip review`)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="server log level (default info)")
    p.set_defaults(func=_run_serve)


def _token(args) -> str | None:
    """The bearer token of a server: --token-file, else env WSCLIP_SERVE_TOKEN, else none."""
    import os

    token = os.environ.get("WSCLIP_SERVE_TOKEN") or None
    if args.token_file is not None:
        if not args.token_file.is_file():
            raise WsclipError(f"token file not found: {args.token_file}")
        token = args.token_file.read_text().strip() or None
        if token is None:
            raise WsclipError(f"token file {args.token_file} is empty")
    return token


def _run_serve(args):
    from wsclip.serve.server import ServeConfig, serve

    token = _token(args)
    cfg = ServeConfig(host=args.host, port=args.port, max_batch_size=args.max_batch_size,
                      max_queue_delay_ms=args.max_queue_delay_ms, max_queue=args.max_queue,
                      max_body_bytes=int(args.max_body_mb * 2**20), max_pixels=args.max_pixels,
                      max_batch_items=args.max_batch_items, request_timeout_s=args.timeout,
                      read_timeout_s=args.read_timeout, token=token, review=args.review)
    lab = _labeler_config(args)
    return serve(lab.replace(batch_size=max(lab.batch_size, args.max_batch_size)), cfg, log_level=args.log_level)


# ============================================================================ review and mask exports
def _folder_args(p):
    p.add_argument("folder", type=Path, help="a `wsclip label` (or `wsclip pseudo`) output folder")
    p.add_argument("--images", help="the images it was labelled from, as given to `wsclip label --images` "
                                    "(default: the paths its manifest records)")
    p.add_argument("--split", help="split of --images when it is a dataset")
    p.add_argument("--classes", help="class names: voc, coco or a file, one a line (default: the folder's classes.json)")


def _open_folder(args, gt=None):
    from wsclip.serve.folder import LabeledFolder

    return LabeledFolder(args.folder, images=args.images, split=args.split, classes=args.classes, gt=gt)


def _add_review(sub):
    p = sub.add_parser("review", help="a local web page to check a labelled folder, worst quality score first; "
                                      "accept / reject marks go to <folder>/review.json (the exports honour them)")
    _folder_args(p)
    p.add_argument("--gt", type=Path, help="folder of ground-truth <id>.png masks: per-class IoU on the page")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: a free one, printed at start)")
    p.add_argument("--token-file", type=Path, help="file holding a bearer token to require (or env WSCLIP_SERVE_TOKEN)")
    p.add_argument("--list", type=int, metavar="N", help="print the N worst masks and exit (no server)")
    p.set_defaults(func=_run_review)


def _run_review(args):
    folder = _open_folder(args, gt=args.gt)
    if args.list is not None:
        print(folder.worst_table(args.list))
        return 0
    from wsclip.serve.review import serve_review

    return serve_review(folder, args.host, args.port, _token(args))


def _add_export_masks(sub):
    from wsclip.commands.deploy import _EXPORT_HELP
    from wsclip.export.masks import FORMATS

    g = _group(sub, "export", _EXPORT_HELP)
    p = g.add_parser("masks", help="a labelled folder as COCO RLE JSON, Label Studio tasks, a CVAT mask zip or a "
                                   "FiftyOne COCO dataset; images rejected in `wsclip review` are left out")
    _folder_args(p)
    p.add_argument("--format", required=True, choices=FORMATS, help="coco (.json), labelstudio (.json + "
                   ".labeling_config.xml), cvat (.zip, Segmentation mask 1.1), fiftyone (a folder)")
    p.add_argument("--out", required=True, type=Path, help="output file (folder for fiftyone)")
    p.add_argument("--instances", action="store_true", help="coco: one annotation per connected region "
                                                            "(default: one per class mask)")
    p.add_argument("--only-accepted", action="store_true", help="only images accepted in `wsclip review`")
    p.add_argument("--url-prefix", default="", help="labelstudio: prefix of each task's image URL "
                                                    "(e.g. /data/local-files/?d=photos/)")
    p.add_argument("--ignore", choices=("label", "background"), default="label",
                   help="cvat: ignore (255) pixels as a declared 'ignore' label (default) or as background")
    p.set_defaults(func=_run_export_masks)


def _run_export_masks(args):
    from wsclip.export.masks import export_masks

    info = export_masks(_open_folder(args), args.out, args.format, instances=args.instances,
                        only_accepted=args.only_accepted, url_prefix=args.url_prefix, ignore=args.ignore)
    print(f"wrote {info['images']} images to {info['out']} ({args.format}); "
          f"{info['left_out']} left out by the review marks")
