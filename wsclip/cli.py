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


# ============================================================================ eval
def _add_eval(sub):
    p = sub.add_parser("eval", help="mIoU of predicted masks against ground truth (dataset-level confusion matrix)")
    p.add_argument("--pred", required=True, type=Path, help="folder of predicted PNG masks (<id>.png)")
    p.add_argument("--gt", required=True, type=Path, help="folder of ground-truth PNG masks (<id>.png)")
    p.add_argument("--split", type=Path, help="text file of ids to evaluate (default: every mask in --gt)")
    p.add_argument("--dataset", default="voc", help="class names for the table: voc, coco, or a file with one name per line")
    p.add_argument("--num-classes", type=int, help="number of classes including background (default from --dataset)")
    p.add_argument("--json", type=Path, help="also write the result as JSON here")
    p.set_defaults(func=_run_eval)


def _run_eval(args):
    from wsclip.eval.evaluate import evaluate_folders, resolve_class_names

    names = resolve_class_names(args.dataset, args.num_classes)
    cm, n = evaluate_folders(args.pred, args.gt, num_classes=len(names), split=args.split)
    print(cm.table(names))
    print(f"images: {n}")
    if args.json:
        from wsclip.io import atomic_write_json

        atomic_write_json(args.json, {"images": n, **cm.to_dict(names)})


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
