"""TensorRT step of the device check: camnet export -> readiness -> engine -> parity (part of gpu_check.sh).

    python benchmarks/gpu_trt.py --out DIR [--dry-run]

Exports a randomly initialised CAM labeler (ResNet-50, dynamic batch and size; tiny backbone in the
dry run) to ONNX, runs the checks that need no TensorRT (`check_build`: opset, operators, types,
profile against the dynamic axes, the trtexec command) for fp32 and fp16, and, when TensorRT
imports and a GPU is present, builds the fp16 and fp32 engines and runs `wsclip export check` on them
against PyTorch (14 real VOC images from tests/data). Without TensorRT it exits 77 (SKIP) after the
CPU checks; any problem found exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wsclip.export.onnx import export_onnx  # noqa: E402
from wsclip.export.tensorrt import build_engine, check_build  # noqa: E402
from wsclip.models.camnet import build_camnet, save_camnet  # noqa: E402
from wsclip.vocab import VOC_CLASSES  # noqa: E402

SKIP_RC = 77


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true", help="tiny backbone, CPU checks only")
    args = p.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    ckpt = out / "camnet.safetensors"
    save_camnet(ckpt, build_camnet("tiny" if args.dry_run else "resnet50", len(VOC_CLASSES)), VOC_CLASSES)
    onnx_path = out / "camnet.onnx"
    export_onnx("camnet", ckpt, onnx_path, batch=2, hw=(64, 64) if args.dry_run else (512, 512))
    report = {"onnx": str(onnx_path), "checks": {}, "engines": {}}
    bad = False
    for prec in ("fp32", "fp16"):
        rep = check_build(onnx_path, out / f"camnet.{prec}.engine", precision=prec)
        report["checks"][prec] = rep
        bad |= bool(rep["problems"])
        print(f"{'PASS' if not rep['problems'] else 'FAIL'} readiness {prec}: opset {rep['opset']}, "
              f"{len(rep['ops'])} operator types, problems: {rep['problems'] or 'none'}")
        print("  " + " ".join(rep["trtexec"]))
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        (out / "tensorrt.json").write_text(json.dumps(report, indent=1))
        print("TensorRT is not importable here: graphs checked, no engine built (carry the tensorrt wheels to run it)")
        return 1 if bad else SKIP_RC
    if args.dry_run or not torch.cuda.is_available():
        (out / "tensorrt.json").write_text(json.dumps(report, indent=1))
        return 1 if bad else SKIP_RC
    from wsclip.export.parity import check_parity

    images = ROOT / "tests" / "data" / "voc12_val14" / "JPEGImages"
    for prec, tol in (("fp32", 1e-3), ("fp16", 1e-2)):
        engine = out / f"camnet.{prec}.engine"
        meta = build_engine(onnx_path, engine, precision=prec, opt_batch=8, max_batch=16, opt_hw="512x512",
                            max_hw="512x512", timing_cache=out / "trt.cache")
        par = check_parity(engine, ckpt, images=images if images.is_dir() else None, n_random=4, batch=4,
                           tolerance=tol, min_agreement=1.0 if prec == "fp32" else 0.99, device="cuda")
        report["engines"][prec] = {"tensorrt": meta["tensorrt"], "passed": par.passed, "summary": par.summary()}
        bad |= not par.passed
        print(f"{'PASS' if par.passed else 'FAIL'} engine {prec} ({meta['tensorrt']['version']}, "
              f"{meta['tensorrt']['gpu']}): {par.summary()}")
    (out / "tensorrt.json").write_text(json.dumps(report, indent=1, default=str))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
