"""The `wsclip` command: one subcommand per job. Thin: parse flags, call the stage, print.

The jobs live in `wsclip.commands` (train, maps, serving, deploy), each a pair: `_add_<job>(sub)`
declares its flags, `_run_<job>(args)` calls the stage (imports happen there, so `wsclip --help`
stays fast). User mistakes raise `WsclipError`; main() prints them as one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from wsclip import __version__
from wsclip.commands import compat_arg, deploy, maps, serving, train
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
    compat_arg(p)
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
        train._add_synth,
        train._add_train_tiny_clip,
        train._add_train_cam,
        train._add_train_clims,
        train._add_train_qa_clims,
        train._add_train_irn,
        train._add_qa_corpus,
        maps._add_cam,
        maps._add_eval_cam,
        train._add_train_seg,
        maps._add_segment,
        deploy._add_export_onnx,
        deploy._add_export_check,
        deploy._add_export_trt,
        serving._add_export_masks,
        serving._add_label,
        serving._add_profile,
        serving._add_serve,
        serving._add_review,
        maps._add_pseudo,
        maps._add_refine_crf,
        maps._add_refine_rw,
        maps._add_refine_caa,
        maps._add_prompts_select,
        deploy._add_bench,
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
        from wsclip.jobs import INTERRUPTED

        print(INTERRUPTED, file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
