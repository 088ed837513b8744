"""`wsclip doctor`: what this machine can run, and which wsclip features that enables."""

from __future__ import annotations

import importlib
import platform


def _version(module: str):
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return getattr(mod, "__version__", "installed")


def collect() -> dict:
    """Gather versions, devices and providers as a plain dict."""
    import torch

    from wsclip import __version__

    report: dict = {
        "wsclip": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "gpus": [],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            report["gpus"].append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                                   "capability": f"{p.major}.{p.minor}"})
    for name, mod in (("open_clip", "open_clip"), ("triton", "triton"), ("onnx", "onnx"),
                      ("onnxruntime", "onnxruntime"), ("tensorrt", "tensorrt"),
                      ("pydensecrf2", "pydensecrf.densecrf"), ("ray", "ray"),
                      ("fastapi", "fastapi"), ("uvicorn", "uvicorn"),
                      ("prometheus_client", "prometheus_client"), ("transformers", "transformers")):
        report[name] = _version(mod)
    if report["onnxruntime"]:
        import onnxruntime

        report["onnxruntime_providers"] = onnxruntime.get_available_providers()
    report["warnings"] = warnings_for(report, _distributions(("onnxruntime", "onnxruntime-gpu")))
    report["features"] = features(report)
    return report


def _distributions(names) -> list[str]:
    """Which of these PyPI distributions are installed."""
    from importlib import metadata

    found = []
    for name in names:
        try:
            metadata.version(name)
            found.append(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def warnings_for(r: dict, dists: list[str]) -> list[str]:
    """Set-up problems worth a line: both ONNX Runtime builds installed (they share one module)."""
    out = []
    if {"onnxruntime", "onnxruntime-gpu"} <= set(dists):
        has_cuda = "CUDAExecutionProvider" in r.get("onnxruntime_providers", [])
        out.append("both onnxruntime and onnxruntime-gpu are installed and share one module"
                   + ("" if has_cuda else ", and the CPU build won (no CUDA provider)")
                   + ": `pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu`")
    return out


def features(r: dict) -> dict:
    """Map the available packages onto wsclip features (True = usable here)."""
    gpu = bool(r["cuda_available"])
    return {
        "training and labeling (PyTorch)": True,
        "CLIP loading (open_clip)": bool(r["open_clip"]),
        "Triton kernels compiled on GPU": gpu and bool(r["triton"]),
        "Triton kernels in the CPU interpreter (tests)": bool(r["triton"]),
        "ONNX export": bool(r["onnx"]),
        "ONNX Runtime CPU": bool(r["onnxruntime"]),
        "ONNX Runtime CUDA": "CUDAExecutionProvider" in r.get("onnxruntime_providers", []),
        "TensorRT engines": gpu and bool(r["tensorrt"]),
        "dense CRF": bool(r["pydensecrf2"]),
        "HTTP server": bool(r["fastapi"] and r["uvicorn"] and r["prometheus_client"]),
        "Ray scale-out": bool(r["ray"]),
        "QA-CLIMS corpus (BLIP VQA)": bool(r["transformers"]),
    }


def format_report(r: dict) -> str:
    lines = [f"wsclip {r['wsclip']}  python {r['python']}  {r['platform']}",
             f"torch {r['torch']}  CUDA available: {r['cuda_available']} (CUDA {r['cuda_version']})"]
    for g in r["gpus"]:
        lines.append(f"  GPU: {g['name']}, {g['memory_gib']} GiB, sm {g['capability']}")
    lines.append("packages:")
    for k in ("open_clip", "triton", "onnx", "onnxruntime", "tensorrt", "pydensecrf2", "ray",
              "fastapi", "uvicorn", "prometheus_client", "transformers"):
        lines.append(f"  {k:<18} {r[k] or 'not installed'}")
    if r.get("onnxruntime_providers"):
        lines.append(f"  onnxruntime providers: {', '.join(r['onnxruntime_providers'])}")
    lines.append("features:")
    for k, ok in r["features"].items():
        lines.append(f"  [{'x' if ok else ' '}] {k}")
    lines += [f"warning: {w}" for w in r.get("warnings", [])]
    return "\n".join(lines)
