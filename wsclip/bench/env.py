"""Environment capture for benchmark results: device, driver, library versions, threads, load, command line."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

# report name -> distribution name (read from package metadata: no slow imports)
_LIBS = {"triton": "triton", "onnxruntime": "onnxruntime", "onnxruntime-gpu": "onnxruntime-gpu", "onnx": "onnx",
         "open_clip": "open_clip_torch", "tensorrt": "tensorrt", "numpy": "numpy", "torchvision": "torchvision",
         "scipy": "scipy"}


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _git_commit(root: Path) -> str | None:
    """HEAD of the checkout the harness runs from (read-only `git rev-parse`)."""
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def device_label(device: torch.device) -> str:
    """A short human name: the GPU's name, or '<N>-core CPU (<model>)'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{usable_cores()}-core CPU ({cpu_name()})"


def capture_environment(device: torch.device, argv: list[str] | None = None, root: Path | None = None) -> dict:
    """Everything a reader needs to reproduce or judge a run's figures."""
    from wsclip import __version__

    env = {
        "device_type": device.type,
        "device": device_label(device),
        "cpu": cpu_name(),
        "cpu_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "wsclip": __version__,
        "versions": {name: _version(dist) for name, dist in _LIBS.items()},
        "command": shlex.join(argv if argv is not None else [Path(sys.argv[0]).name, *sys.argv[1:]]),
        "git_commit": _git_commit(root) if root is not None else None,
    }
    env["onnxruntime_providers"] = None
    if env["versions"]["onnxruntime"] or env["versions"]["onnxruntime-gpu"]:
        try:
            import onnxruntime

            env["onnxruntime_providers"] = list(onnxruntime.get_available_providers())
        except Exception:  # noqa: BLE001 - a broken install: no providers
            pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "gpu": props.name,
            "gpu_memory_GB": round(props.total_memory / 1e9, 1),
            "compute_capability": f"{props.major}.{props.minor}",
            "driver": _nvidia_driver(),
            "cudnn": torch.backends.cudnn.version(),
        })
    return env
