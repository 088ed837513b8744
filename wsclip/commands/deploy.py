"""`wsclip export onnx/check/trt` and `wsclip bench`: deployment and benchmarks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wsclip.errors import WsclipError
from wsclip.commands import group as _group


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
