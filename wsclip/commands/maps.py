"""`wsclip cam`, `eval-cam`, `segment`, `pseudo`, `refine *`, `prompts select`: CAM files and masks of a dataset."""

from __future__ import annotations

from pathlib import Path

from wsclip.errors import WsclipError
from wsclip.commands import compat_arg
from wsclip.commands import group as _group


def _clip_es_args(p):
    """The CLIP-ES options (wsclip.label.clip_es.ClipEsConfig), shared by `cam`, `label` and `serve`."""
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32", help="[clip-es] CLIP weights")
    p.add_argument("--no-caa", action="store_true", help="[clip-es] plain GradCAM maps, no CAA refinement")
    p.add_argument("--box-threshold", type=float, help="[clip-es] CAA box threshold (default 0.4; 0.7 for COCO)")
    p.add_argument("--template", help="[clip-es] prompt template with {} (default 'a clean origami {}.')")
    p.add_argument("--pooling", choices=("tokens", "mean"), default="tokens",
                   help="[clip-es] image embedding: tokens = ln_post per patch token, then mean (public code); "
                        "mean = ln_post of the mean token (the METHODS.md wording)")
    p.add_argument("--caa-layers", type=int, help="[clip-es] last blocks whose attention CAA averages (default 8 of 12)")
    p.add_argument("--box-compat", action="store_true",
                   help="[clip-es] the public code's box masks (uint8 threshold, exclusive far box edges)")
    p.add_argument("--caa-backend", choices=("auto", "triton", "torch"), default="auto",
                   help="[clip-es] CAA kernels: auto = Triton on CUDA, PyTorch elsewhere")
    p.add_argument("--compute", choices=("auto", "fp32", "bf16"),
                   help="[clip-es] ViT blocks before the last: auto = bf16 on CPUs that run it natively when its "
                        "maps match fp32 (a fixed probe image), else fp32; --compat official: fp32")
    p.add_argument("--logit-scale", type=float, help="[clip-es] softmax logit scale (default: the checkpoint's)")


def _clip_es_options(args) -> dict:
    """ClipEsConfig fields from the `_clip_es_args` flags."""
    return {"caa": not args.no_caa, "box_threshold": args.box_threshold, "template": args.template,
            "pooling": args.pooling, "caa_layers": args.caa_layers, "box_compat": args.box_compat or None,
            "caa_backend": args.caa_backend, "logit_scale": args.logit_scale, "compute": args.compute}


def _job_args(p, on_error: str = "skip"):
    """The flags every resumable dataset job shares (`wsclip.jobs`)."""
    p.add_argument("--restart", action="store_true",
                   help="redo every item in --out with these settings (a resume with other settings is refused)")
    p.add_argument("--on-error", choices=("skip", "fail"), default=on_error,
                   help=f"a bad item: record it in errors.json and go on (skip), or stop (fail); default {on_error}")


# ============================================================================ cam / eval-cam
def _add_cam(sub):
    p = sub.add_parser("cam", help="class activation maps for a dataset: one <id>.npz per image (resumes)")
    p.add_argument("--method", choices=("clims", "clip-es"), default="clims",
                   help="clims: a trained CAM network (CLIMS or baseline); clip-es: training-free CLIP-ES")
    p.add_argument("--data", required=True, help="dataset: a path or voc:/coco:/folder:/synth: spec")
    p.add_argument("--split", default="train", help="split to label (default train)")
    p.add_argument("--out", required=True, type=Path, help="output folder of <id>.npz files")
    p.add_argument("--checkpoint", type=Path, help="[clims] CAM network checkpoint (camnet.safetensors)")
    p.add_argument("--scales", default="1.0,0.5,1.5,2.0", help="[clims] comma-separated scales (each with its flip)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    p.add_argument("--clip", type=Path, help="[clip-es] CLIP ViT checkpoint (e.g. ViT-B-16.pt or a .safetensors with sidecar)")
    p.add_argument("--batch-size", type=int, default=8, help="[clip-es] images per forward (same rounded size)")
    _clip_es_args(p)
    p.add_argument("--clip-act", choices=("quick_gelu", "gelu"),
                   help="[clip-es] CLIP activation when the file cannot tell (OpenAI weights: quick_gelu)")
    compat_arg(p)
    _job_args(p)
    p.set_defaults(func=_run_cam)


def _run_cam(args):
    from wsclip.errors import WsclipError

    if args.method == "clims":
        from wsclip.label.clims_cam import make_cams

        if args.checkpoint is None:
            raise WsclipError("--method clims needs --checkpoint (the output of `wsclip train cam` or `wsclip train clims`)")
        try:
            scales = [float(s) for s in args.scales.split(",") if s.strip()]
        except ValueError:
            raise WsclipError(f"--scales must be comma-separated numbers, got '{args.scales}'") from None
        res = make_cams(args.checkpoint, args.data, args.out, split=args.split, scales=scales,
                        device=args.device, num_workers=args.workers, amp=args.amp, restart=args.restart,
                        on_error=args.on_error, compat=args.compat)
        print(f"wrote {res['written']} CAM files to {args.out} ({res['skipped']} already done, {len(res['failed'])} "
              f"skipped into errors.json, {res['total']} images)")
        return
    if args.method == "clip-es":
        from wsclip.label.clip_es import ClipEsConfig, make_clip_es_cams

        if args.clip is None:
            raise WsclipError("--method clip-es needs --clip (a CLIP ViT checkpoint, e.g. ViT-B-16.pt)")
        cfg = ClipEsConfig(batch_size=args.batch_size, **_clip_es_options(args), compat=args.compat,
                           clip_act=args.clip_act)
        res = make_clip_es_cams(args.clip, args.data, args.out, split=args.split, cfg=cfg, device=args.device,
                                precision=args.precision, num_workers=args.workers, restart=args.restart,
                                on_error=args.on_error)
        print(f"wrote {res['written']} CAM files to {args.out} ({res['skipped']} already done, {len(res['failed'])} "
              f"skipped into errors.json, {res['total']} images)")
        return
    raise WsclipError(f"--method {args.method} is not available in this build")


def _add_eval_cam(sub):
    p = sub.add_parser("eval-cam", help="mIoU of CAM files against ground truth over a sweep of background thresholds")
    p.add_argument("--cams", required=True, type=Path, help="folder of <id>.npz CAM files")
    p.add_argument("--gt", required=True, type=Path, help="folder of ground-truth PNG masks (<id>.png)")
    p.add_argument("--thresholds", default="0.05:0.6:0.05", help="start:stop:step (stop included) or a list 0.1,0.15")
    p.add_argument("--split", type=Path, help="text file of ids to evaluate (default: every .npz in --cams)")
    p.add_argument("--dataset", default="voc", help="class names: voc, coco, or a file with one name per line")
    p.add_argument("--num-classes", type=int, help="number of classes including background (default from --dataset)")
    p.add_argument("--key", default="high_res", help="which map of the files to evaluate (high_res)")
    p.add_argument("--json", type=Path, help="also write {threshold: mIoU} and the best as JSON here")
    p.set_defaults(func=_run_eval_cam)


def _run_eval_cam(args):
    from wsclip.eval.evaluate import resolve_class_names
    from wsclip.label.clims_cam import evaluate_cams, parse_thresholds

    names = resolve_class_names(args.dataset, args.num_classes)
    thresholds = parse_thresholds(args.thresholds)
    cms = evaluate_cams(args.cams, args.gt, thresholds, num_classes=len(names), split=args.split, key=args.key)
    table = {t: cm.miou() for t, cm in cms.items()}
    best = max(table, key=table.get)
    print("threshold  mIoU")
    for t, v in table.items():
        print(f"{t:9.3f}  {100 * v:5.1f}{'  <- best' if t == best else ''}")
    print(cms[best].table(names))
    if args.json:
        from wsclip.io import atomic_write_json

        atomic_write_json(args.json, {"miou": {str(t): v for t, v in table.items()}, "best_threshold": best,
                                      "best": cms[best].to_dict(names)})



def _add_segment(sub):
    p = sub.add_parser("segment", help="label images with a trained segmentation network: <out>/<id>.png (resumes)")
    p.add_argument("--checkpoint", required=True, type=Path, help="seg.safetensors from `wsclip train seg`")
    p.add_argument("--images", required=True, help="a folder of images, or a dataset path/spec (voc:DIR, coco:DIR ...)")
    p.add_argument("--split", help="split of a dataset, or a list file of ids for a folder")
    p.add_argument("--out", required=True, type=Path, help="output folder of palette PNG masks")
    p.add_argument("--scales", default="0.5,0.75,1.0", help="comma-separated test scales (probabilities averaged)")
    p.add_argument("--no-flip", action="store_true", help="skip the horizontal-flip views")
    p.add_argument("--crf", action="store_true", help="refine with a dense CRF (needs the [crf] extra)")
    p.add_argument("--crf-workers", type=int, help="CRF processes (default: all cores)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes decoding images")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    _job_args(p)
    p.set_defaults(func=_run_segment)


def _run_segment(args):
    from wsclip.label.segment import parse_scales, segment

    res = segment(args.checkpoint, args.images, args.out, split=args.split, scales=parse_scales(args.scales),
                  flip=not args.no_flip, crf=args.crf, crf_workers=args.crf_workers, device=args.device,
                  num_workers=args.workers, amp=args.amp, restart=args.restart, on_error=args.on_error)
    print(f"wrote {res['written']} masks to {args.out} ({res['skipped']} already done, {len(res['failed'])} skipped "
          f"into errors.json, {res['total']} images)")

# ============================================================================ pseudo / refine / prompts (CLIP-ES, IRN, CRF)
def _pseudo_common_args(p, crf_default: bool = False):
    p.add_argument("--cams", required=True, type=Path, help="folder of <id>.npz CAM files (`wsclip cam` output)")
    p.add_argument("--out", required=True, type=Path, help="output folder of <id>.png palette masks (re-running resumes)")
    p.add_argument("--data", help="dataset (path or voc:/coco:/folder: spec): the images for --crf / --irn, and the ids")
    p.add_argument("--split", default="train", help="split of --data (default train)")
    p.add_argument("--key", default="high_res", help="maps to use from the CAM files (high_res_raw: CLIP-ES without CAA)")
    p.add_argument("--bg", choices=("power", "threshold"), default="power",
                   help="background score: (1 - max)^alpha (CLIP-ES) or a constant threshold")
    p.add_argument("--alpha", type=float, default=1.0, help="exponent of the power background (default 1)")
    p.add_argument("--bg-threshold", type=float, default=0.15, help="constant background score for --bg threshold")
    if not crf_default:
        p.add_argument("--crf", action="store_true", help="refine with a dense CRF (needs the [crf] extra)")
    p.add_argument("--crf-uint8-wrap", action="store_true",
                   help="CRF compatibility with the public CLIP-ES code: mean-subtracted image cast to uint8 (wraps)")
    p.add_argument("--confidence", type=float, help="pixels whose max score/posterior is below this become 255")
    p.add_argument("--cgl", action="store_true", help="CLIP-ES confidence-guided masks: --confidence 0.95")
    p.add_argument("--workers", type=int, help="CRF worker processes (default: all cores)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (random walk, IRN)")
    _job_args(p, on_error="fail")
    compat_arg(p)


def _rw_args(p):
    p.add_argument("--irn", type=Path, help="IRN random walk with this boundary network (`wsclip train irn` output)")
    p.add_argument("--edges", type=Path, help="IRN random walk with boundary maps <id>.npy/.npz (stride 4) from this folder")
    p.add_argument("--rw-beta", type=float, default=10.0, help="random-walk beta (default 10)")
    p.add_argument("--rw-exp-times", type=int, default=8, help="random-walk exp_times t: T^(2^t) (default 8)")
    p.add_argument("--rw-radius", type=int, default=5, help="random-walk radius (default 5)")
    p.add_argument("--rw-bg-threshold", type=float, default=0.20, help="random-walk background (0.20 VOC, 0.25 COCO)")


def _run_pseudo_masks(args, crf: bool):
    from wsclip.label.pseudo import PseudoConfig, make_pseudo_masks
    from wsclip.refine.crf import CRFParams

    confidence = 0.95 if args.cgl else args.confidence
    cfg = PseudoConfig(key=args.key, bg=args.bg, alpha=args.alpha, bg_threshold=args.bg_threshold, crf=crf,
                       crf_params=CRFParams(uint8_wrap=args.crf_uint8_wrap or None), confidence=confidence,
                       on_error=args.on_error, workers=args.workers, compat=args.compat,
                       **({"rw_beta": args.rw_beta, "rw_exp_times": args.rw_exp_times, "rw_radius": args.rw_radius,
                           "rw_bg_threshold": args.rw_bg_threshold} if hasattr(args, "rw_beta") else {}))
    res = make_pseudo_masks(args.cams, args.out, data=args.data, split=args.split, cfg=cfg,
                            irn=getattr(args, "irn", None), edges_dir=getattr(args, "edges", None), device=args.device,
                            restart=args.restart)
    print(f"wrote {res['written']} masks to {args.out} ({res['skipped']} already done, {len(res['failed'])} failed, "
          f"{res['total']} images)")
    for image_id, msg in res["failed"]:
        print(f"  failed {image_id}: {msg}")
    return 0  # skipped images were the user's choice (--on-error skip) and are listed above


def _add_pseudo(sub):
    p = sub.add_parser("pseudo", help="pseudo masks (palette PNGs) from CAM files: background, optional random walk, "
                                      "CRF and confidence filter (resumes)")
    _pseudo_common_args(p)
    _rw_args(p)
    p.set_defaults(func=_run_pseudo)


def _run_pseudo(args):
    return _run_pseudo_masks(args, crf=args.crf)


def _add_refine_crf(sub):
    g = _group(sub, "refine", "one refinement alone (see `wsclip refine <what> --help`)")
    p = g.add_parser("crf", help="dense CRF of CAM files with their images -> palette PNG masks")
    _pseudo_common_args(p, crf_default=True)
    p.set_defaults(func=_run_refine_crf)


def _run_refine_crf(args):
    if not args.data:
        raise WsclipError("wsclip refine crf needs the images: pass --data")
    return _run_pseudo_masks(args, crf=True)


def _add_refine_rw(sub):
    g = _group(sub, "refine", "one refinement alone (see `wsclip refine <what> --help`)")
    p = g.add_parser("rw", help="IRN random walk of CAM files with boundary maps -> palette PNG masks")
    _pseudo_common_args(p)
    _rw_args(p)
    p.set_defaults(func=_run_refine_rw)


def _run_refine_rw(args):
    if args.irn is None and args.edges is None:
        raise WsclipError("wsclip refine rw needs boundary maps: --irn CHECKPOINT or --edges FOLDER")
    return _run_pseudo_masks(args, crf=args.crf)


def _add_refine_caa(sub):
    g = _group(sub, "refine", "one refinement alone (see `wsclip refine <what> --help`)")
    p = g.add_parser("caa", help="CLIP-ES class-aware attention refinement of existing CAM files -> new CAM files")
    p.add_argument("--cams", required=True, type=Path, help="folder of <id>.npz CAM files")
    p.add_argument("--out", required=True, type=Path, help="output folder of refined <id>.npz files (resumes)")
    p.add_argument("--data", required=True, help="dataset (path or voc:/coco:/folder: spec) with the images")
    p.add_argument("--split", default="train", help="split of --data whose CAM files are refined (default train)")
    p.add_argument("--clip", required=True, type=Path, help="CLIP ViT checkpoint whose attention refines the maps")
    p.add_argument("--key", default="high_res", help="maps of the CAM files to refine (default high_res)")
    p.add_argument("--box-threshold", type=float, help="box threshold (default 0.4; 0.7 for COCO)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32", help="CLIP weights (default fp32)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _job_args(p)
    p.set_defaults(func=_run_refine_caa)


def _run_refine_caa(args):
    from wsclip.label.clip_es import ClipEsConfig, caa_refine_cam_files

    res = caa_refine_cam_files(args.clip, args.data, args.cams, args.out, split=args.split, key=args.key,
                               cfg=ClipEsConfig(box_threshold=args.box_threshold), device=args.device,
                               precision=args.precision, restart=args.restart, on_error=args.on_error)
    print(f"wrote {res['written']} refined CAM files to {args.out} ({res['skipped']} already done, {res['total']} images)")


def _add_prompts_select(sub):
    g = _group(sub, "prompts", "prompt tools (see `wsclip prompts <what> --help`)")
    p = g.add_parser("select", help="rank prompt templates by zero-shot sharpness (CLIP-ES prompt selection)")
    p.add_argument("--templates", required=True, type=Path, help="text file, one template with {} per line")
    p.add_argument("--images", required=True, nargs="+", type=Path, help="image files or folders")
    p.add_argument("--clip", required=True, type=Path, help="CLIP checkpoint")
    p.add_argument("--dataset", default="voc",
                   help="class names: voc or coco (CLIP-ES synonym-fused names) or a file with one name per line")
    p.add_argument("--limit", type=int, help="use at most this many images")
    p.add_argument("--batch-size", type=int, default=32, help="images per zero-shot forward (default 32)")
    p.add_argument("--top", type=int, help="print only the best N templates")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--json", type=Path, help="also write the ranking as JSON here")
    p.set_defaults(func=_run_prompts_select)


def _run_prompts_select(args):
    from wsclip.label.prompts import collect_images, format_ranking, rank_templates, read_templates
    from wsclip.models.clip import load_clip
    from wsclip.runtime import resolve_device
    from wsclip.vocab import CLIP_ES_COCO_NAMES, CLIP_ES_VOC_NAMES

    templates = read_templates(args.templates)
    images = collect_images(args.images, args.limit)
    if args.dataset in ("voc", "coco"):
        names = list(CLIP_ES_VOC_NAMES if args.dataset == "voc" else CLIP_ES_COCO_NAMES)
    else:
        from wsclip.data.base import read_class_list

        names = list(read_class_list(Path(args.dataset)))
    clip = load_clip(args.clip, device=resolve_device(args.device))
    ranking = rank_templates(clip, images, names, templates, batch_size=args.batch_size)
    print(format_ranking(ranking, args.top))
    print(f"images: {len(images)}, classes: {len(names)}, templates: {len(templates)}")
    if args.json:
        from wsclip.io import atomic_write_json

        atomic_write_json(args.json, {"images": len(images), "classes": names,
                                      "ranking": [{"template": t, "sharpness": s} for t, s in ranking]})
