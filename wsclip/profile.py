"""`wsclip profile`: where a labeler's time goes, stage by stage, on every installed backend.

    result = profile(ProfileConfig(labeler=LabelerConfig(model="cam.safetensors"), n=16, batch_sizes=(1, 4)))
    print(format_profile(result))

Each (backend, batch size) run labels N images in steps of `batch` images, one step at a time
and nothing overlapped, through the same code `wsclip label` runs: `load_item` (read/decode),
the labeler's `label_batch` (host-to-device, forward, GradCAM backward, CAA, argmax/postprocess,
device-to-host), `finish_image` (CRF, encode/write). Those functions mark their stages
(`wsclip.stages`); here a recorder times them (CUDA events on a GPU, read after one synchronize
per step), so every step's stages add up to its end-to-end time up to the loop's own overhead,
reported as "other". `wsclip label` overlaps read and encode with compute; this profile shows
what each costs. Backends: eager, channels-last, bf16, compile (PyTorch variants of the
checkpoint, `wsclip.label.backends`), onnxruntime (the checkpoint exported to a temporary .onnx)
and tensorrt (an engine built from it; needs TensorRT and a GPU); CLIP-ES runs eager (fp32) and
bf16 (its GradCAM needs autograd, which ONNX and TensorRT graphs do not have).
"""

from __future__ import annotations

import contextlib
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from wsclip.errors import WsclipError
from wsclip.stages import DESCRIPTIONS, STAGES, StageRecorder

ALL_BACKENDS = ("eager", "channels-last", "bf16", "compile", "onnxruntime", "tensorrt")
CLIP_ES_ONLY = {"compile": "CLIP-ES's GradCAM backward runs in eager autograd; torch.compile is not used for it",
                "onnxruntime": "CLIP-ES needs autograd through the last ViT block (GradCAM): an ONNX graph has none",
                "tensorrt": "CLIP-ES needs autograd through the last ViT block (GradCAM): a TensorRT engine has none",
                "channels-last": "CLIP-ES is a ViT: no convolutions but the patch embedding, NHWC changes nothing"}


@dataclass
class ProfileConfig:
    """What to profile. `labeler`: a `wsclip.serve.labelers.LabelerConfig` (its batch_size and backend are
    replaced per run). `images`: anything `wsclip label --images` takes, or None for random JPEGs of `size`."""

    labeler: object
    images: str | None = None
    split: str | None = None
    labels: str | None = None
    n: int = 16
    batch_sizes: tuple[int, ...] = (1, 4)
    backends: tuple[str, ...] = ("all",)
    size: tuple[int, int] = (320, 320)
    warmup: int = 1
    trace: Path | None = None
    seed: int = 0
    extra: dict = field(default_factory=dict)


def parse_size(text: str) -> tuple[int, int]:
    """'320x240' -> (320, 240) (height x width); '320' -> (320, 320)."""
    try:
        parts = [int(p) for p in str(text).lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise WsclipError(f"--size must be HxW in pixels (e.g. 320x320), got '{text}'")
    return parts[0], parts[1]


def _method(cfg) -> str:
    from wsclip.serve.labelers import detect_method

    if cfg.method != "auto":
        return cfg.method
    return detect_method(cfg.model) if cfg.model else "clip-es"


def _installed(name: str) -> str | None:
    """None when backend `name` can run here, else why not."""
    import importlib.util

    if name == "onnxruntime" and importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed (pip install 'wsclip[export]')"
    if name == "tensorrt":
        if importlib.util.find_spec("tensorrt") is None:
            return "TensorRT is not installed (pip install 'wsclip[trt]')"
        if not torch.cuda.is_available():
            return "TensorRT needs an NVIDIA GPU"
    return None


def plan_backends(cfg: ProfileConfig, method: str, device: torch.device) -> tuple[list[str], dict[str, str]]:
    """(backends to run, {backend: why skipped}) for the config's backend list ('all' = every installed one)."""
    from wsclip.label.backends import cpu_has_bf16
    from wsclip.registry import ENGINE_SUFFIXES

    asked = list(ALL_BACKENDS) if "all" in cfg.backends else list(cfg.backends)
    unknown = [b for b in asked if b not in ALL_BACKENDS + ("auto",)]
    if unknown:
        raise WsclipError(f"unknown backend(s) {', '.join(unknown)}: use all, auto or {', '.join(ALL_BACKENDS)}")
    model = Path(cfg.labeler.model) if cfg.labeler.model else None
    exported = model is not None and (model.suffix == ".onnx" or model.suffix in ENGINE_SUFFIXES)
    run, skip = [], {}
    for b in asked:
        why = _installed(b)
        if method == "clip-es" and b in CLIP_ES_ONLY:
            why = CLIP_ES_ONLY[b]
        elif exported and b not in ("onnxruntime", "tensorrt"):
            why = f"{model.name} is an exported graph: it runs on {'ONNX Runtime' if model.suffix == '.onnx' else 'TensorRT'}"
        elif exported and b != ("onnxruntime" if model.suffix == ".onnx" else "tensorrt"):
            why = f"{model.name} is {'an ONNX file' if model.suffix == '.onnx' else 'a TensorRT engine'}"
        elif b == "bf16" and device.type == "cpu" and not cpu_has_bf16():
            why = "this CPU has no bf16 instructions (oneDNN would emulate them, far slower than fp32)"
        elif b == "tensorrt" and not exported and why is None and device.type != "cuda":
            why = "TensorRT needs --device cuda"
        if why:
            skip[b] = why
        else:
            run.append(b)
    return run, skip


# ============================================================================ inputs
def _synthetic_source(tmp: Path, n: int, size, classes, seed: int):
    """n random JPEGs of `size` with 1-2 random classes each (smooth noise: realistic JPEG sizes)."""
    from PIL import Image

    from wsclip.serve.batch import ImageSource

    rng = np.random.default_rng(seed)
    folder = tmp / "images"
    folder.mkdir(parents=True, exist_ok=True)
    paths, labels = [], {}
    h, w = size
    for i in range(n):
        small = rng.integers(0, 256, (max(1, h // 16), max(1, w // 16), 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        p = folder / f"img{i:04d}.jpg"
        img.save(p, quality=90)
        paths.append(p)
        y = np.zeros(len(classes), np.float32)
        y[rng.choice(len(classes), size=min(len(classes), int(rng.integers(1, 3))), replace=False)] = 1
        labels[p.stem] = y
    return ImageSource(ids=[p.stem for p in paths], paths=paths, labels=labels, classes=tuple(classes))


def _source(cfg: ProfileConfig, classes, tmp: Path):
    from wsclip.serve.batch import attach_labels, open_source

    if cfg.images is None:
        return _synthetic_source(tmp, cfg.n, cfg.size, classes, cfg.seed)
    src = open_source(cfg.images, cfg.split)
    return attach_labels(src, cfg.labels, classes)


# ============================================================================ backends
def _labeler_for(cfg: ProfileConfig, backend: str, batch: int, tmp: Path, method: str):
    """A labeler running `backend`, built the way `wsclip label` builds it."""
    from wsclip.serve.labelers import load_labeler

    lc = replace(cfg.labeler, batch_size=batch)
    if backend in ("onnxruntime", "tensorrt") and Path(lc.model).suffix not in (".onnx", ".engine", ".plan", ".trt"):
        lc = replace(lc, model=str(_export(lc, backend, tmp, method)), backend="auto")
    elif backend not in ("onnxruntime", "tensorrt"):
        lc = replace(lc, backend=backend)
    return load_labeler(lc)


def _export(lc, backend: str, tmp: Path, method: str) -> Path:
    from wsclip.export.onnx import export_onnx

    onnx_path = tmp / f"{method}.onnx"
    opts = {"scales": tuple(lc.scales), "flip": lc.flip}
    if method == "cam" and lc.bg_threshold is not None:
        opts["bg_threshold"] = lc.bg_threshold
    export_onnx({"cam": "camnet", "seg": "seg"}[method], lc.model, onnx_path, overwrite=False, **opts)
    if backend == "onnxruntime":
        return onnx_path
    from wsclip.export.tensorrt import build_engine  # pragma: no cover - needs TensorRT and a GPU

    engine = tmp / f"{method}.engine"
    if not engine.is_file():
        build_engine(onnx_path, engine, precision="fp16")
    return engine


# ============================================================================ the measurement
def _percentiles(values) -> dict:
    a = np.asarray(values, dtype=np.float64) * 1e3
    if not a.size:
        return {"p50_ms": 0.0, "p95_ms": 0.0, "p99_ms": 0.0, "mean_ms": 0.0}
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(labeler, source, idx, opts, device, recorder) -> tuple[float, dict]:
    """One batch, start to end, with its stages recorded: (seconds, {stage: seconds})."""
    from wsclip.serve.batch import finish_image, label_window, load_item

    _sync(device)
    t0 = time.perf_counter()
    with recorder.active(), torch.profiler.record_function("wsclip.step"):
        items = [load_item(source, i) for i in idx]
        labelled, errors = label_window(labeler, items, want_cams=opts.wants_cams)
        if errors:
            raise WsclipError(f"{errors[0]['id']}: {errors[0]['error']}")
        for image_id, image, result in labelled:
            finish_image(image_id, image, result, opts, source.file_of(image_id))
    _sync(device)
    return time.perf_counter() - t0, recorder.collect()


def _run_one(labeler, source, order, batch, opts, device, warmup, annotate) -> dict:
    from wsclip.bench.timing import Meter

    steps = [order[s:s + batch] for s in range(0, len(order), batch)]
    rec = StageRecorder(annotate=annotate)
    for idx in steps[:max(0, warmup)]:  # first calls: kernel selection, compilation, the auto probe
        _step(labeler, source, idx, opts, device, rec)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    totals, per_stage = [], []

    def timed():
        for idx in steps:
            seconds, stages = _step(labeler, source, idx, opts, device, rec)
            totals.append(seconds)
            per_stage.append(stages)

    timing = Meter(torch.device("cpu")).measure(timed, reps=1, warmup=0, track_memory=True)
    names = [s for s in STAGES if any(s in st for st in per_stage)]
    names += sorted({k for st in per_stage for k in st} - set(names))
    total = sum(totals)
    stages = {}
    for name in names:
        vals = [st.get(name, 0.0) for st in per_stage]
        stages[name] = {**_percentiles(vals), "total_s": sum(vals), "share": sum(vals) / total if total else 0.0}
    other = [t - sum(st.values()) for t, st in zip(totals, per_stage)]
    stages["other"] = {**_percentiles(other), "total_s": sum(other), "share": sum(other) / total if total else 0.0}
    n_images = len(order)
    out = {"batch": batch, "images": n_images, "steps": len(steps), "stages": stages,
           "end_to_end": {**_percentiles(totals), "total_s": total},
           "latency_per_image_ms": 1e3 * total / n_images if n_images else None,
           "throughput_images_per_s": n_images / total if total else None,
           "stage_sum_over_end_to_end": sum(s["total_s"] for k, s in stages.items() if k != "other") / total
           if total else None,
           "peak_host_rss_above_start_MB": timing.peak_mem_MB,
           "peak_process_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "peak_cuda_MB": torch.cuda.max_memory_allocated(device) / 1e6 if device.type == "cuda" else None,
           "variant": getattr(labeler, "variant", None), "backend_impl": labeler.backend}
    out["bottleneck"] = bottleneck(out)
    return out


def bottleneck(run: dict) -> str:
    """One sentence naming the stage that bounds this run and what the rest costs."""
    stages = {k: v for k, v in run["stages"].items() if k != "other"}
    if not stages:
        return "no stage was recorded"
    top = max(stages, key=lambda k: stages[k]["share"])
    rest = sorted((k for k in stages if k != top), key=lambda k: -stages[k]["share"])[:2]
    extra = ", ".join(f"{DESCRIPTIONS.get(k, k)} {100 * stages[k]['share']:.0f}%" for k in rest)
    return (f"{DESCRIPTIONS.get(top, top)} bounds this run: {100 * stages[top]['share']:.0f}% of the end-to-end time "
            f"(p50 {stages[top]['p50_ms']:.1f} ms per batch of {run['batch']})"
            + (f"; next: {extra}" if extra else "") + ".")


def profile(cfg: ProfileConfig) -> dict:
    """Profile every planned (backend, batch size); returns the JSON-ready result (see `format_profile`)."""
    from wsclip.serve.batch import OutputOptions
    from wsclip.train.loop import resolve_device

    if cfg.n < 1:
        raise WsclipError(f"--n must be at least 1 image, got {cfg.n}")
    if not cfg.batch_sizes or min(cfg.batch_sizes) < 1:
        raise WsclipError(f"--batch-sizes must be positive integers, got {cfg.batch_sizes}")
    device = resolve_device(cfg.labeler.device)
    method = _method(cfg.labeler)
    backends, skipped = plan_backends(cfg, method, device)
    if not backends:
        raise WsclipError("no backend to profile here: " + "; ".join(f"{b}: {r}" for b, r in skipped.items()))
    result = {"method": method, "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "images": cfg.images or f"{cfg.n} random JPEGs {cfg.size[0]}x{cfg.size[1]}", "n": cfg.n,
              "runs": [], "skipped": [{"backend": b, "reason": r} for b, r in skipped.items()]}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    tmp = Path(tempfile.mkdtemp(prefix="wsclip-profile-"))
    prof = None
    try:
        source = None
        with contextlib.ExitStack() as stack:
            if cfg.trace is not None:
                acts = [torch.profiler.ProfilerActivity.CPU]
                if device.type == "cuda":
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                prof = stack.enter_context(torch.profiler.profile(activities=acts))
            for backend in backends:
                for batch in cfg.batch_sizes:
                    try:
                        labeler = _labeler_for(cfg, backend, batch, tmp, method)
                    except (WsclipError, RuntimeError, ImportError) as exc:
                        result["skipped"].append({"backend": backend, "batch": batch,
                                                  "reason": f"could not build it: {exc}"[:300]})
                        break
                    if source is None:
                        source = _source(cfg, labeler.classes, tmp)
                        if not len(source):
                            raise WsclipError(f"no images in {cfg.images}")
                    order = [i % len(source) for i in range(cfg.n)]
                    out_dir = tmp / "out" / f"{backend}_{batch}"
                    opts = OutputOptions(out=out_dir, classes=labeler.classes, crf=labeler.refine == "crf")
                    with torch.profiler.record_function(f"wsclip.profile.{backend}.batch{batch}"):
                        run = _run_one(labeler, source, order, batch, opts, device, cfg.warmup, cfg.trace is not None)
                    run["backend"] = backend
                    result["runs"].append(run)
                    del labeler
        if prof is not None:
            cfg.trace.parent.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(cfg.trace))
            result["trace"] = str(cfg.trace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def format_profile(result: dict) -> str:
    """The terminal report: one stage table per (backend, batch size), then what was skipped."""
    lines = [f"wsclip profile: {result['method']} on {result.get('gpu', result['device'])} "
             f"({result['threads']} torch threads), {result['images']}"]
    for run in result["runs"]:
        var = f" [{run['variant']}]" if run.get("variant") and run["variant"] != run["backend"] else ""
        lines.append("")
        lines.append(f"backend {run['backend']}{var}, batch {run['batch']}: {run['images']} images in "
                     f"{run['steps']} steps")
        lines.append(f"  {'stage':<22}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'share':>8}")
        for name, s in run["stages"].items():
            lines.append(f"  {DESCRIPTIONS.get(name, name):<22}{s['p50_ms']:>10.1f}{s['p95_ms']:>10.1f}"
                         f"{s['p99_ms']:>10.1f}{100 * s['share']:>7.1f}%")
        e = run["end_to_end"]
        lines.append(f"  {'end-to-end (batch)':<22}{e['p50_ms']:>10.1f}{e['p95_ms']:>10.1f}{e['p99_ms']:>10.1f}"
                     f"{'100.0%':>8}")
        mem = f"peak host RSS +{run['peak_host_rss_above_start_MB'] or 0:.0f} MB over the run " \
              f"(process peak {run['peak_process_rss_MB']:.0f} MB)"
        if run.get("peak_cuda_MB") is not None:
            mem += f", CUDA peak {run['peak_cuda_MB']:.0f} MB"
        lines.append(f"  throughput {run['throughput_images_per_s']:.3g} images/s, "
                     f"{run['latency_per_image_ms']:.1f} ms per image; {mem}")
        lines.append(f"  bottleneck: {run['bottleneck']}")
    for s in result["skipped"]:
        lines.append(f"skipped {s['backend']}{' batch ' + str(s['batch']) if 'batch' in s else ''}: {s['reason']}")
    if result.get("trace"):
        lines.append(f"trace: {result['trace']} (chrome://tracing or ui.perfetto.dev; ranges wsclip.<stage>)")
    return "\n".join(lines)
