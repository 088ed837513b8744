"""The `wsclip` command: one subcommand per job. Thin: parse flags, call the stage, print.

Each job is a pair: `_add_<job>(sub)` declares its flags, `_run_<job>(args)` calls the
stage (imports happen there, so `wsclip --help` stays fast). User mistakes raise
`WsclipError`; main() prints them as one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from wsclip import __version__
from wsclip.errors import WsclipError


# ============================================================================ doctor
def _add_doctor(sub):
    p = sub.add_parser("doctor", help="report what this machine can run (torch, CUDA, triton, ORT, TensorRT, CRF, ray)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_run_doctor)


def _run_doctor(args):
    from wsclip.doctor import collect, format_report

    report = collect()
    print(json.dumps(report, indent=2) if args.json else format_report(report))


def _compat_arg(p):
    p.add_argument("--compat", choices=("wsclip", "official"), default="wsclip",
                   help="official: every behaviour of the public code (docs/compat.md); default wsclip's")


# ============================================================================ eval
def _add_eval(sub):
    p = sub.add_parser("eval", help="mIoU of predicted masks against ground truth (dataset-level confusion matrix)")
    p.add_argument("--pred", required=True, type=Path, help="folder of predicted PNG masks (<id>.png)")
    p.add_argument("--gt", required=True, type=Path, help="folder of ground-truth PNG masks (<id>.png)")
    p.add_argument("--split", type=Path, help="text file of ids to evaluate (default: every mask in --gt)")
    p.add_argument("--dataset", default="voc", help="class names for the table: voc, coco, or a file with one name per line")
    p.add_argument("--num-classes", type=int, help="number of classes including background (default from --dataset)")
    p.add_argument("--json", type=Path, help="also write the result as JSON here")
    p.add_argument("--pred-ignore", choices=("background", "miss", "ignore"),
                   help="predicted 255 counts as: background (CLIMS/IRN evaluation, the default), miss, or is left out")
    _compat_arg(p)
    p.set_defaults(func=_run_eval)


def _run_eval(args):
    from wsclip.eval.evaluate import evaluate_folders, resolve_class_names

    names = resolve_class_names(args.dataset, args.num_classes)
    cm, n = evaluate_folders(args.pred, args.gt, num_classes=len(names), split=args.split,
                             pred_ignore=args.pred_ignore, compat=args.compat)
    print(cm.table(names))
    print(f"images: {n}")
    if args.json:
        from wsclip.io import atomic_write_json

        atomic_write_json(args.json, {"images": n, **cm.to_dict(names)})


# ============================================================================ command groups
def _group(sub, name, help):
    """Nested subparsers of the command group `name` (`wsclip train <what>`), created on first use."""
    if name in sub.choices:
        return sub.choices[name]._wsclip_subparsers
    p = sub.add_parser(name, help=help)
    p.set_defaults(group_parser=p)
    p._wsclip_subparsers = p.add_subparsers(dest=f"{name}_command", metavar="<what>")
    return p._wsclip_subparsers


# ============================================================================ synth
def _add_synth(sub):
    p = sub.add_parser("synth", help="write the synthetic world (procedural multi-label scenes) as a VOC-layout folder")
    p.add_argument("--out", required=True, type=Path, help="output folder (re-running resumes)")
    p.add_argument("--train", type=int, default=2000, help="number of train images")
    p.add_argument("--val", type=int, default=200, help="number of val images")
    p.add_argument("--seed", type=int, default=0, help="world seed: the same seed writes the same scenes (default 0)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128, the demo's world)")
    p.add_argument("--format", choices=("jpg", "png"), default="jpg", help="image files: JPEG quality 95 or lossless PNG")
    p.set_defaults(func=_run_synth)


def _run_synth(args):
    from wsclip.data.synth import write_voc_layout

    out = write_voc_layout(args.out, args.train, args.val, seed=args.seed, size=args.size, image_format=args.format)
    print(f"wrote {args.train} train + {args.val} val synth images to {out}")


# ============================================================================ train tiny-clip
def _add_train_tiny_clip(sub):
    g = _group(sub, "train", "train a model (see `wsclip train <what> --help`)")
    p = g.add_parser("tiny-clip", help="train a tiny open_clip CLIP on the synthetic world (CPU, minutes)")
    p.add_argument("--out", required=True, type=Path, help="output .safetensors (a .json sidecar is written beside it)")
    p.add_argument("--steps", type=int, help="optimisation steps (default 400; 150 with --quick)")
    p.add_argument("--batch-size", type=int, help="scenes per step, 4 views each (default 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, cosine after warm-up; default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the world, the model init and the data order (default 0)")
    p.add_argument("--arch", choices=("vit", "rn"), default="vit",
                   help="vit: ViT image tower (CLIP-ES needs it); rn: ResNet tower, learns objects faster (CLIMS)")
    p.add_argument("--quick", action="store_true", help="a short, lower-quality run")
    p.add_argument("--eval-n", type=int, default=200, help="val scenes for the zero-shot report (0: skip)")
    p.add_argument("--no-resume", action="store_true", help="ignore a saved partial training state")
    p.set_defaults(func=_run_train_tiny_clip)


def _run_train_tiny_clip(args):
    from wsclip.train.tiny_clip import TinyClipConfig, train_tiny_clip

    kw = dict(seed=args.seed, lr=args.lr, arch=args.arch)
    cfg = TinyClipConfig.quick(**kw) if args.quick else TinyClipConfig(**kw)
    if args.steps is not None:
        cfg.steps = args.steps
    if args.batch_size is not None:
        cfg.batch_size = args.batch_size
    summary = train_tiny_clip(args.out, cfg, resume=not args.no_resume, eval_n=args.eval_n)
    print(json.dumps(summary, indent=2))
    print(f"saved {args.out}")


# ============================================================================ train cam / train clims
def _rank0() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _add_train_cam(sub):
    from wsclip.config import CamConfig, add_config_args

    g = _group(sub, "train", "train a model (see `wsclip train <what> --help`)")
    p = g.add_parser("cam", help="baseline CAM network: GAP + multilabel soft-margin, frozen BN (CLIMS starts from it)")
    add_config_args(p, CamConfig)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.set_defaults(func=_run_train_cam)


def _run_train_cam(args):
    from wsclip.config import CamConfig, config_from_args
    from wsclip.train.baseline_cam import train_cam
    from wsclip.train.loop import shutdown_distributed

    cfg = config_from_args(CamConfig, args)
    try:
        path = train_cam(cfg, resume=args.resume)
    finally:
        shutdown_distributed()
    if _rank0():
        print(f"saved {path}")


def _add_train_clims(sub):
    from wsclip.config import ClimsConfig, add_config_args

    g = _group(sub, "train", "train a model (see `wsclip train <what> --help`)")
    p = g.add_parser("clims", help="CLIMS: train the CAM network against a frozen CLIP (OTM, BTM, CBS, REG); "
                                   "multi-GPU with torchrun")
    add_config_args(p, ClimsConfig)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.set_defaults(func=_run_train_clims)


def _run_train_clims(args):
    from wsclip.config import ClimsConfig, config_from_args
    from wsclip.train.clims import train_clims
    from wsclip.train.loop import shutdown_distributed

    cfg = config_from_args(ClimsConfig, args)
    try:
        path = train_clims(cfg, resume=args.resume)
    finally:
        shutdown_distributed()
    if _rank0():
        print(f"saved {path}")


# ============================================================================ train qa-clims / train irn / qa-corpus
def _add_train_qa_clims(sub):
    from wsclip.config import QaClimsConfig, add_config_args

    g = _group(sub, "train", "train a model (see `wsclip train <what> --help`)")
    p = g.add_parser("qa-clims", help="QA-CLIMS: train the CAM network against a frozen CLIP with VQA-answer texts "
                                      "(FRC, BRC, REG); needs a corpus from `wsclip qa-corpus`")
    add_config_args(p, QaClimsConfig)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.set_defaults(func=_run_train_qa_clims)


def _run_train_qa_clims(args):
    from wsclip.config import QaClimsConfig, config_from_args
    from wsclip.train.loop import shutdown_distributed
    from wsclip.train.qa_clims import train_qa_clims

    cfg = config_from_args(QaClimsConfig, args)
    try:
        path = train_qa_clims(cfg, resume=args.resume)
    finally:
        shutdown_distributed()
    if _rank0():
        print(f"saved {path}")


def _add_train_irn(sub):
    from wsclip.config import IrnConfig, add_config_args

    g = _group(sub, "train", "train a model (see `wsclip train <what> --help`)")
    p = g.add_parser("irn", help="IRN boundary network from CAM seeds (frozen backbone); its boundary map "
                                 "drives the random-walk refinement")
    add_config_args(p, IrnConfig, skip=("head_lr_mult", "sync_bn"))
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.set_defaults(func=_run_train_irn)


def _run_train_irn(args):
    import logging

    from wsclip.config import IrnConfig, config_from_args
    from wsclip.train.irn import train_irn
    from wsclip.train.loop import shutdown_distributed

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = config_from_args(IrnConfig, args)
    try:
        path = train_irn(cfg, resume=args.resume)
    finally:
        shutdown_distributed()
    if _rank0():
        print(f"saved {path}")


def _add_qa_corpus(sub):
    p = sub.add_parser("qa-corpus", help="ask a local BLIP VQA model the QA-CLIMS questions about every "
                                         "(image, class) and write the corpus JSON (resumes; extra [vqa])")
    p.add_argument("--data", required=True, help="dataset: a path or voc:/coco:/folder:/synth: spec")
    p.add_argument("--split", default="train_aug", help="split (default train_aug)")
    p.add_argument("--model", required=True, help="folder of a Hugging Face BLIP VQA model (save_pretrained layout)")
    p.add_argument("--out", required=True, type=Path, help="corpus JSON to write (re-running resumes it)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--images-per-batch", type=int, default=4, help="images whose questions are answered together")
    p.add_argument("--num-beams", type=int, default=3, help="beam search width (BLIP VQA: 3)")
    p.add_argument("--max-new-tokens", type=int, default=10, help="longest answer in tokens")
    p.add_argument("--save-every", type=int, default=50, help="rewrite the output every N images")
    p.add_argument("--limit", type=int, help="only the first N images of the split")
    p.set_defaults(func=_run_qa_corpus)


def _run_qa_corpus(args):
    from wsclip.data import open_dataset
    from wsclip.train.loop import resolve_device
    from wsclip.train.qa_corpus import build_corpus

    kw = {} if str(args.data).startswith("synth:") else {"masks": False}
    ds = open_dataset(args.data, split=args.split, **kw)
    corpus = build_corpus(ds, args.model, args.out, device=str(resolve_device(args.device)),
                          images_per_batch=args.images_per_batch, num_beams=args.num_beams,
                          max_new_tokens=args.max_new_tokens, save_every=args.save_every, limit=args.limit)
    print(f"wrote {len(corpus)} (image, class) entries for {len(corpus.images)} images to {args.out}")


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
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto",
                   help="[clip-es] CAA kernels: auto = Triton on CUDA, PyTorch elsewhere")
    p.add_argument("--logit-scale", type=float, help="[clip-es] softmax logit scale (default: the checkpoint's)")
    p.add_argument("--clip-act", choices=("quick_gelu", "gelu"),
                   help="[clip-es] CLIP activation when the file cannot tell (OpenAI weights: quick_gelu)")
    _compat_arg(p)
    p.add_argument("--compute", choices=("auto", "fp32", "bf16"),
                   help="[clip-es] ViT blocks before the last: auto = bf16 on CPUs that run it natively when its "
                        "maps match fp32 (a fixed probe image), else fp32; --compat official: fp32)")
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
                        device=args.device, num_workers=args.workers, amp=args.amp)
        print(f"wrote {res['written']} CAM files to {args.out} ({res['skipped']} already done, {len(res['failed'])} "
              f"skipped into errors.json, {res['total']} images)")
        return
    if args.method == "clip-es":
        from wsclip.label.clip_es import ClipEsConfig, make_clip_es_cams

        if args.clip is None:
            raise WsclipError("--method clip-es needs --clip (a CLIP ViT checkpoint, e.g. ViT-B-16.pt)")
        cfg = ClipEsConfig(caa=not args.no_caa, box_threshold=args.box_threshold, template=args.template,
                           batch_size=args.batch_size, pooling=args.pooling, caa_layers=args.caa_layers,
                           box_compat=args.box_compat or None, backend=args.backend, compat=args.compat,
                           logit_scale=args.logit_scale, clip_act=args.clip_act, compute=args.compute)
        res = make_clip_es_cams(args.clip, args.data, args.out, split=args.split, cfg=cfg, device=args.device,
                                precision=args.precision, num_workers=args.workers)
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



# ============================================================================ train seg / segment
def _add_train_seg(sub):
    from wsclip.config import add_config_args
    from wsclip.train.seg import SegConfig

    g = _group(sub, "train", "train a model (see `wsclip train <what> --help`)")
    p = g.add_parser("seg", help="DeepLab segmentation network on pseudo masks (255 ignored); multi-GPU with torchrun")
    add_config_args(p, SegConfig, skip=("resize_long",))
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.set_defaults(func=_run_train_seg)


def _run_train_seg(args):
    from wsclip.config import config_from_args
    from wsclip.train.loop import shutdown_distributed
    from wsclip.train.seg import SegConfig, train_seg

    cfg = config_from_args(SegConfig, args)
    try:
        path = train_seg(cfg, resume=args.resume)
    finally:
        shutdown_distributed()
    if _rank0():
        print(f"saved {path}")


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
    p.set_defaults(func=_run_segment)


def _run_segment(args):
    from wsclip.label.segment import parse_scales, segment

    res = segment(args.checkpoint, args.images, args.out, split=args.split, scales=parse_scales(args.scales),
                  flip=not args.no_flip, crf=args.crf, crf_workers=args.crf_workers, device=args.device,
                  num_workers=args.workers, amp=args.amp)
    print(f"wrote {res['written']} masks to {args.out} ({res['skipped']} already done, {len(res['failed'])} skipped "
          f"into errors.json, {res['total']} images)")

# ============================================================================ export onnx / check / trt
_EXPORT_HELP = ("export models for deployment (ONNX, TensorRT engines, parity checks) and labelled masks (COCO, "
                "Label Studio, CVAT, FiftyOne); see `wsclip export <what> --help`")


def _add_export_onnx(sub):
    g = _group(sub, "export", _EXPORT_HELP)
    p = g.add_parser("onnx", help="export a model to ONNX (+ <out>.json sidecar); checks the graph with onnx's checker")
    p.add_argument("--model", required=True, choices=("camnet", "clip-image", "clip-text", "seg"),
                   help="camnet: CAM labeler (normalise + CAM net + upsample + class selection); clip-image / clip-text: "
                        "CLIP encoders; seg: segmentation labeler")
    p.add_argument("--checkpoint", required=True, type=Path, help="the model file (CAM net, CLIP, or seg checkpoint)")
    p.add_argument("--out", required=True, type=Path, help="output .onnx")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (17 or newer; default 17)")
    p.add_argument("--dynamic-hw", action=argparse.BooleanOptionalAction, default=None,
                   help="dynamic image height/width (default: on for camnet and seg, off for CLIP)")
    p.add_argument("--batch", type=int, default=2, help="batch size to trace with (the batch axis is always dynamic)")
    p.add_argument("--size", help="H or HxW to trace with; the fixed input size without --dynamic-hw")
    p.add_argument("--input-dtype", choices=("uint8", "float32"), help="image input: uint8 (default) or float in [0, 1]")
    p.add_argument("--bg-threshold", type=float, help="camnet: background score for the mask argmax (default 0.15)")
    p.add_argument("--scales", help="camnet/seg: comma-separated test scales fused in the graph (default 1.0)")
    p.add_argument("--flip", action="store_true", help="camnet/seg: add horizontally flipped views")
    p.add_argument("--exporter", choices=("legacy", "dynamo"), default="legacy",
                   help="torch.onnx exporter: legacy (TorchScript, default) or dynamo (needs onnxscript)")
    p.set_defaults(func=_run_export_onnx)


def _run_export_onnx(args):
    from wsclip.export.onnx import export_onnx
    from wsclip.export.tensorrt import parse_hw

    options = {}
    if args.bg_threshold is not None:
        options["bg_threshold"] = args.bg_threshold
    if args.scales:
        options["scales"] = tuple(float(s) for s in args.scales.split(","))
    if args.flip:
        options["flip"] = True
    if "bg_threshold" in options and args.model != "camnet":
        raise WsclipError("--bg-threshold applies to --model camnet only")
    if options and args.model not in ("camnet", "seg"):
        raise WsclipError("--scales and --flip apply to --model camnet and seg only")
    meta = export_onnx(args.model, args.checkpoint, args.out, opset=args.opset, batch=args.batch,
                       hw=parse_hw(args.size), dynamic_hw=args.dynamic_hw, input_dtype=args.input_dtype,
                       exporter=args.exporter, **options)
    ins = ", ".join(f"{i['name']} {i['dtype']}{tuple(i['shape'])}" for i in meta["inputs"])
    print(f"wrote {args.out} (opset {meta['opset']}, inputs: {ins}) and {args.out.name}.json")


def _add_export_check(sub):
    g = _group(sub, "export", _EXPORT_HELP)
    p = g.add_parser("check", help="compare an exported .onnx or engine with the PyTorch model (exit 1 above tolerance)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--onnx", type=Path, help="an .onnx file written by `wsclip export onnx`")
    src.add_argument("--engine", type=Path, help="a TensorRT engine written by `wsclip export trt`")
    p.add_argument("--checkpoint", type=Path, help="the source checkpoint (default: the path in the sidecar)")
    p.add_argument("--images", help="a folder of real images (or a dataset folder: its labels select classes)")
    p.add_argument("--limit", type=int, help="use at most this many real images")
    p.add_argument("--random", type=int, default=2, help="number of random input batches (default 2)")
    p.add_argument("--batch", type=int, default=4, help="batch size for the real images")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max relative error of float outputs (default 1e-4)")
    p.add_argument("--min-agreement", type=float, default=1.0,
                   help="min fraction of mask pixels that agree, near-ties (top two scores within the "
                        "tolerance) apart (default 1.0)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cpu for .onnx, cuda for engines)")
    p.add_argument("--json", type=Path, help="also write the report as JSON here")
    p.set_defaults(func=_run_export_check)


def _run_export_check(args):
    from wsclip.export.parity import check_parity

    artefact = args.onnx or args.engine
    device = args.device or ("cuda" if args.engine else "cpu")
    report = check_parity(artefact, args.checkpoint, images=args.images, n_random=args.random, batch=args.batch,
                          tolerance=args.tolerance, min_agreement=args.min_agreement, device=device, limit=args.limit)
    print(report.summary())
    if args.json:
        from wsclip.io import atomic_write_json

        atomic_write_json(args.json, report.to_dict())
    return 0 if report.passed else 1


def _add_export_trt(sub):
    g = _group(sub, "export", _EXPORT_HELP)
    p = g.add_parser("trt", help="build a TensorRT engine from a wsclip .onnx (extra [trt]; needs an NVIDIA GPU)")
    p.add_argument("--onnx", required=True, type=Path, help="an fp32 .onnx written by `wsclip export onnx`")
    p.add_argument("--out", required=True, type=Path, help="output engine (.engine / .plan), with a .json sidecar")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_const", dest="precision", const="fp16",
                      help="fp16 (the default), LayerNorm / softmax / reductions kept in fp32")
    prec.add_argument("--fp32", action="store_const", dest="precision", const="fp32", help="fp32 (TF32 off)")
    prec.add_argument("--int8", action="store_const", dest="precision", const="int8",
                      help="int8 Q/DQ calibrated on --calib-images")
    prec.add_argument("--fp8", action="store_const", dest="precision", const="fp8",
                      help="fp8 (E4M3) Q/DQ; compute capability 8.9+ (Ada, Hopper)")
    p.add_argument("--calib-images", help="folder of images for int8/fp8 calibration")
    p.add_argument("--calib-cache", type=Path, help="calibration cache (reused when present; default beside --out)")
    p.add_argument("--calib-count", type=int, default=64, help="images used for calibration (default 64)")
    p.add_argument("--calib-method", choices=("minmax", "entropy", "percentile"), default="minmax",
                   help="int8 calibration (default minmax)")
    p.add_argument("--min-batch", type=int, default=1, help="smallest batch of the optimisation profile")
    p.add_argument("--opt-batch", type=int, default=8, help="batch the engine is tuned for")
    p.add_argument("--max-batch", type=int, default=32, help="largest batch of the optimisation profile")
    p.add_argument("--min-hw", help="HxW, models with dynamic size (default: min(opt, 256))")
    p.add_argument("--opt-hw", help="HxW the engine is tuned for (default 512x512)")
    p.add_argument("--max-hw", help="HxW (default: the opt size)")
    p.add_argument("--timing-cache", type=Path, help="TensorRT timing cache file (read if present, then updated)")
    p.add_argument("--workspace-gib", type=float, default=4.0, help="TensorRT builder workspace in GiB (default 4)")
    p.add_argument("--device", type=int, default=0, help="CUDA device index")
    p.add_argument("--check-only", action="store_true",
                   help="no TensorRT or GPU needed: check the graph TensorRT 10 would parse (opset, operators, "
                        "types, profile against the dynamic axes) and print the equivalent trtexec command")
    p.set_defaults(func=_run_export_trt, precision=None)


def _run_export_trt(args):
    from wsclip.export.tensorrt import build_engine, check_build

    if args.check_only:
        report = check_build(args.onnx, args.out, precision=args.precision or "fp16", calib_images=args.calib_images,
                             min_batch=args.min_batch, opt_batch=args.opt_batch, max_batch=args.max_batch,
                             min_hw=args.min_hw, opt_hw=args.opt_hw, max_hw=args.max_hw,
                             timing_cache=args.timing_cache, workspace_gib=args.workspace_gib)
        for problem in report["problems"]:
            print(f"problem: {problem}")
        print(" ".join(report["trtexec"]))
        print(f"{report['graph']}: {'ready for TensorRT 10' if not report['problems'] else 'NOT ready'} "
              f"(opset {report['opset']}, {len(report['ops'])} operator types; not built: no TensorRT run here)")
        return 0 if not report["problems"] else 1
    meta = build_engine(args.onnx, args.out, precision=args.precision or "fp16", calib_images=args.calib_images,
                        calib_cache=args.calib_cache, calib_count=args.calib_count, calib_method=args.calib_method,
                        min_batch=args.min_batch, opt_batch=args.opt_batch, max_batch=args.max_batch,
                        min_hw=args.min_hw, opt_hw=args.opt_hw, max_hw=args.max_hw, timing_cache=args.timing_cache,
                        workspace_gib=args.workspace_gib, device=args.device)
    t = meta["tensorrt"]
    print(f"wrote {args.out} ({meta['precision']}, TensorRT {t['version']}, {t['gpu']} sm {t['compute_capability']})")


# ============================================================================ label / serve
def _labeler_args(p, profile: bool = False):
    """Flags that build a labeler (wsclip.serve.labelers.LabelerConfig), shared by `label`, `serve` and
    `profile` (which takes lists: --batch-sizes and --backends instead of --batch-size and --backend)."""
    p.add_argument("--model", help="CAM or segmentation network: checkpoint (.safetensors), .onnx or TensorRT engine")
    p.add_argument("--method", choices=("auto", "cam", "seg", "clip-es"), default="auto",
                   help="auto: from the model file; clip-es needs --clip")
    p.add_argument("--refine", choices=("none", "crf", "irn"), default="none",
                   help="crf: dense CRF (extra [crf]); irn: random walk on an IRN boundary map (--irn)")
    p.add_argument("--irn", help="IRN boundary checkpoint for --refine irn")
    p.add_argument("--predict", choices=("auto", "cam", "clip", "none"), default="auto",
                   help="how missing image-level labels are predicted: the CAM network's class scores or CLIP zero-shot")
    p.add_argument("--clip", help="CLIP file for --predict clip and --method clip-es")
    p.add_argument("--classes", help="[clip-es] class list: voc, coco or a file with one name per line (default voc)")
    p.add_argument("--label-threshold", type=float, help="score threshold of predicted labels (0.5 cam, 0.25 clip)")
    p.add_argument("--bg-threshold", type=float, help="CAM background threshold (default the model's, 0.15)")
    p.add_argument("--scales", default="1.0", help="comma-separated test scales (CAM/seg PyTorch backend)")
    p.add_argument("--flip", action="store_true", help="add horizontal-flip views")
    if not profile:
        p.add_argument("--batch-size", type=int, default=8, help="largest batch the network runs")
        p.add_argument("--backend", choices=("auto", "eager", "channels-last", "bf16", "compile"), default="auto",
                       help="how a PyTorch checkpoint runs: auto = on the CPU the fastest variant whose outputs "
                            "match eager fp32 (measured once, remembered); eager on CUDA (bf16 with --amp). "
                            "ONNX Runtime / TensorRT: pass a .onnx / engine as --model")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (PyTorch backend)")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch / ONNX Runtime")
    p.add_argument("--clip-act", choices=("quick_gelu", "gelu"),
                   help="CLIP activation when the file cannot tell (OpenAI weights: quick_gelu)")
    _compat_arg(p)


def _labeler_config(args):
    from wsclip.serve.labelers import LabelerConfig

    try:
        scales = tuple(float(s) for s in args.scales.split(",") if s.strip())
    except ValueError:
        raise WsclipError(f"--scales must be comma-separated numbers, got '{args.scales}'") from None
    if not scales or min(scales) <= 0:
        raise WsclipError(f"--scales must be positive numbers, got '{args.scales}'")
    return LabelerConfig(model=args.model, method=args.method, device=args.device,
                         batch_size=getattr(args, "batch_size", 8), refine=args.refine, irn=args.irn,
                         predict=args.predict, clip=args.clip, label_threshold=args.label_threshold,
                         bg_threshold=args.bg_threshold, scales=scales, flip=args.flip, amp=args.amp,
                         backend=getattr(args, "backend", "auto"), threads=args.threads, classes=args.classes,
                         compat=getattr(args, "compat", "wsclip"), clip_act=getattr(args, "clip_act", None))


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
    if args.threads and cfg.labeler.device in ("auto", "cpu"):
        import torch

        torch.set_num_threads(int(args.threads))
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
    p.add_argument("--on-error", choices=("skip", "fail"), default="fail",
                   help="a corrupt or mismatched CAM file: report it and skip the image, or stop (default)")
    _compat_arg(p)


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
                            irn=getattr(args, "irn", None), edges_dir=getattr(args, "edges", None), device=args.device)
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
    p.set_defaults(func=_run_refine_caa)


def _run_refine_caa(args):
    from wsclip.label.clip_es import ClipEsConfig, caa_refine_cam_files

    res = caa_refine_cam_files(args.clip, args.data, args.cams, args.out, split=args.split, key=args.key,
                               cfg=ClipEsConfig(box_threshold=args.box_threshold), device=args.device,
                               precision=args.precision)
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
    from wsclip.train.loop import resolve_device
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


# ============================================================================ bench
def _add_bench(sub):
    p = sub.add_parser("bench", help="throughput benchmarks: wsclip's paths against public-structure baselines "
                                     "measured in the same run (JSON under benchmarks/results/); `bench report` "
                                     "renders BENCHMARKS.md")
    p.add_argument("--suites", help="comma-separated suites (default: all; --list names them)")
    p.add_argument("--quick", action="store_true", help="fewer cases and repetitions (under two minutes on a CPU)")
    p.add_argument("--tiny", action="store_true", help="toy sizes (overrides --quick): checks that the harness "
                                                       "runs; tests use it")
    p.add_argument("--out", type=Path, help="folder for the run's JSON file (default ./benchmarks/results)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--label", help="the machine in words for the report (default '<N>-core CPU' or the GPU's name)")
    p.add_argument("--budget", type=float, help="seconds one measurement may spend repeating (default: 60 full, "
                                                "4 quick, 2 tiny)")
    p.add_argument("--list", action="store_true", help="list the suites and exit")
    p.set_defaults(func=_run_bench)
    bsub = p.add_subparsers(dest="bench_command", metavar="[report]")
    r = bsub.add_parser("report", help="render BENCHMARKS.md tables and PNG plots from the run files")
    r.add_argument("--results", type=Path, help="folder of run files (default ./benchmarks/results)")
    r.add_argument("--markdown", type=Path, help="file whose bench section is rewritten (default ./BENCHMARKS.md)")
    r.add_argument("--no-plots", action="store_true", help="tables only")
    r.add_argument("--include-tiny", action="store_true", help="also show --tiny runs (their figures mean nothing)")
    r.set_defaults(func=_run_bench_report)


def _run_bench(args):
    from wsclip.bench.runner import format_run, load_suites, run_benchmarks

    if args.list:
        for name, mod in load_suites().items():
            doc = getattr(mod, "DESCRIPTION", "") if not isinstance(mod, Exception) else f"(cannot import: {mod})"
            print(f"{name:<16} {doc}")
        return 0
    suites = [s.strip() for s in args.suites.split(",") if s.strip()] if args.suites else None
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    command = ["wsclip", "bench"] + [f"--{mode}"] * (mode != "full")  # what ran, rebuilt from the parsed flags
    for flag in ("suites", "device", "threads", "out", "label", "budget"):
        if getattr(args, flag) is not None:
            command += [f"--{flag}", str(getattr(args, flag))]
    path, run = run_benchmarks(suites, mode=mode, device=args.device, out_dir=args.out, threads=args.threads,
                               label=args.label, argv=command, budget_s=args.budget)
    print(format_run(run))
    print(f"wrote {path}")
    return 1 if any(s["status"] == "error" for s in run["suites"].values()) else 0


def _run_bench_report(args):
    from wsclip.bench.report import write_report
    from wsclip.bench.runner import DEFAULT_MARKDOWN, DEFAULT_RESULTS

    results = args.results or DEFAULT_RESULTS  # the current folder's, never the installed package's
    markdown = args.markdown or DEFAULT_MARKDOWN
    done = write_report(results, markdown, plots=not args.no_plots, include_tiny=args.include_tiny)
    for bad in done["invalid"]:
        print(f"ignored (does not follow the schema): {bad}", file=sys.stderr)
    print(f"rendered {done['runs']} runs ({', '.join(done['machines']) or 'none'}) from {Path(results).resolve()} "
          f"into {Path(done['markdown']).resolve()}; "
          f"{len(done['plots'])} plots")


# ============================================================================ demo
def _add_demo(sub):
    p = sub.add_parser("demo", help="the pipeline end to end on a synthetic world: tiny CLIP, baseline CAM, CLIMS "
                                    "loss ablation, CLIP-ES, refinement; prints the mIoU table (minutes on a CPU)")
    p.add_argument("--out", type=Path, help="output folder (re-running resumes; default demo_out, "
                                           "runs/synth_ablation with --full)")
    p.add_argument("--cache", type=Path, help="tiny CLIP cache folder (default $WSCLIP_CACHE or ~/.cache/wsclip)")
    p.add_argument("--full", action="store_true", help="the full ablation (larger world, longer training, IRN random walk)")
    p.add_argument("--fresh", action="store_true", help="delete the results of an earlier run in --out first")
    p.add_argument("--seed", type=int, help="world and training seed (default 0)")
    p.add_argument("--train", type=int, dest="n_train", help="train scenes")
    p.add_argument("--val", type=int, dest="n_val", help="val scenes")
    p.add_argument("--clip-steps", type=int, help="training steps of the ResNet tiny CLIP that CLIMS uses")
    p.add_argument("--clip-es-steps", type=int, help="training steps of the ViT tiny CLIP that CLIP-ES uses")
    p.add_argument("--cam-steps", type=int, help="baseline CAM training steps")
    p.add_argument("--clims-steps", type=int, help="CLIMS training steps per loss variant")
    p.add_argument("--scratch-steps", type=int,
                   help="steps of the extra CLIMS run (all terms) from random weights (0: skip it)")
    p.add_argument("--variants", nargs="+", help="CLIMS loss variants (default: OTM OTM+BTM OTM+BTM+REG OTM+BTM+REG+CBS)")
    p.add_argument("--no-clip-es", action="store_true", help="skip CLIP-ES")
    p.add_argument("--no-crf", action="store_true", help="pseudo masks without the dense CRF")
    p.add_argument("--irn", action=argparse.BooleanOptionalAction, default=None,
                   help="train an IRN boundary network and add random-walk pseudo masks (on with --full)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=_run_demo)


def _run_demo(args):
    from wsclip.demo import DemoConfig, print_summary, run_demo

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    given = {k: getattr(args, k) for k in ("seed", "n_train", "n_val", "clip_steps", "clip_es_steps", "cam_steps",
                                                  "clims_steps", "scratch_steps", "irn")
             if getattr(args, k) is not None}
    if args.variants:
        given["variants"] = tuple(args.variants)
    given.update(clip_es=not args.no_clip_es, crf=not args.no_crf)
    if args.out is not None:
        given["out"] = str(args.out)
    if args.cache is not None:
        given["cache_dir"] = str(args.cache)
    cfg = DemoConfig.full(**given) if args.full else DemoConfig.demo(**given)
    print_summary(run_demo(cfg, fresh=args.fresh), cfg.out)


# ============================================================================ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsclip",
        description="Weakly supervised semantic segmentation with CLIP: train CAM networks, "
        "label images, refine, export and serve.",
    )
    parser.add_argument("--version", action="version", version=f"wsclip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for add in (
        _add_doctor,
        _add_eval,
        _add_synth,
        _add_train_tiny_clip,
        _add_train_cam,
        _add_train_clims,
        _add_train_qa_clims,
        _add_train_irn,
        _add_qa_corpus,
        _add_cam,
        _add_eval_cam,
        _add_train_seg,
        _add_segment,
        _add_export_onnx,
        _add_export_check,
        _add_export_trt,
        _add_export_masks,
        _add_label,
        _add_profile,
        _add_serve,
        _add_review,
        _add_pseudo,
        _add_refine_crf,
        _add_refine_rw,
        _add_refine_caa,
        _add_prompts_select,
        _add_bench,
        _add_demo,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        # a command group without its subcommand, or no command at all
        (getattr(args, "group_parser", None) or parser).print_help()
        return 2
    try:
        rc = args.func(args)
    except WsclipError as exc:
        print(f"wsclip {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished outputs are kept and a re-run resumes", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
