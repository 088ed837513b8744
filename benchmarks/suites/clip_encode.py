"""clip-encode: the CLIP image encoder across backends, against plain eager fp32 PyTorch in the same run."""

from __future__ import annotations

import copy

import torch

from benchmarks.suites import _models
from wsclip.bench.suite import SuiteContext, SuiteResult
from wsclip.bench.timing import Rotation, rel_err

NAME = "clip-encode"
DESCRIPTION = ("CLIP image tower (random weights of the real architecture) per backend: eager fp32 (baseline), "
               "eager bf16, channels-last, torch.compile with and without CUDA graphs, ONNX Runtime and "
               "TensorRT where present; images/s per batch size, latency at batch 1 and MFU against the "
               "measured matmul ceiling (FLOPs counted from the architecture). Every backend's embeddings are "
               "compared with eager fp32 on the same images before it is timed.")

BASELINE = "eager fp32"
# (architecture, input size)
CASES = {
    "gpu": [("ViT-B-32", 224), ("ViT-B-16", 224), ("RN50", 224), ("ViT-B-16", 448)],
    "cpu": [("ViT-B-32", 224), ("ViT-B-16", 224), ("RN50", 224), ("ViT-B-16", 448)],
    "cpu_quick": [("ViT-B-32", 224)],
    "tiny": [("tiny-vit", 32), ("tiny-rn", 64)],
}
BATCHES = {"gpu": [1, 8, 32, 128, 256], "gpu_quick": [1, 32, 256], "cpu": [1, 4], "cpu_quick": [1, 2],
           "tiny": [1, 2]}
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 1e-2}


def _backends(ctx: SuiteContext) -> list[tuple[str, str, str]]:
    """(variant, kind, precision) in the order they run."""
    low = "bf16"
    rows = [(BASELINE, "eager", "fp32"), (f"eager {low}", "eager", low)]
    rows.append((f"channels-last {'bf16' if ctx.gpu else 'fp32'}", "channels_last", "bf16" if ctx.gpu else "fp32"))
    p = "bf16" if ctx.gpu else "fp32"
    rows += [(f"torch.compile {p}", "compile", p), (f"torch.compile + CUDA graphs {p}", "compile_graphs", p),
             ("ONNX Runtime fp32", "ort", "fp32"), ("TensorRT fp16", "trt", "fp16")]
    return rows


def _skip_reason(ctx: SuiteContext, kind: str) -> str | None:
    """Why a backend cannot run here (None: it can)."""
    if kind == "compile_graphs" and not ctx.gpu:
        return "CUDA graphs need a GPU"
    if kind in ("compile", "compile_graphs") and ctx.tiny:
        return "--tiny skips torch.compile (compiling takes minutes on a CPU)"
    if kind in ("compile", "ort") and ctx.mode == "quick" and not ctx.gpu:
        return "--quick on a CPU skips it (export/compilation alone takes minutes here); run without --quick"
    if kind == "trt":
        if not ctx.gpu:
            return "TensorRT needs an NVIDIA GPU"
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return "tensorrt is not installed (extra [trt])"
    if kind == "ort" and ctx.gpu:
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return "onnxruntime-gpu is not installed (CPU onnxruntime only)"
    return None


def _export(ctx: SuiteContext, clip, cfg: dict, name: str, max_batch: int, trt: bool):
    """ONNX (and TensorRT) artefacts of this image tower, written the way users make them (wsclip.export)."""
    from wsclip.export.onnx import export_onnx
    from wsclip.models.clip import save_clip

    folder = ctx.tmp / f"{name}_{cfg['vision_cfg']['image_size']}"
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / "clip.safetensors"
    save_clip(ckpt, clip.model, cfg, name=name)
    onnx_path = folder / "image.onnx"
    export_onnx("clip-image", ckpt, onnx_path, batch=2)
    engine = None
    if trt:
        from wsclip.export.tensorrt import build_engine

        engine = folder / "image.engine"
        build_engine(onnx_path, engine, precision="fp16", min_batch=1, opt_batch=max_batch, max_batch=max_batch)
    return onnx_path, engine


def run(ctx: SuiteContext, res: SuiteResult) -> None:
    _models.require_open_clip()
    cases = ctx.pick(gpu=CASES["gpu"], cpu=CASES["cpu"], cpu_quick=CASES["cpu_quick"], tiny=CASES["tiny"])
    batches = ctx.pick(**BATCHES)
    res.setup.update({"cases": [f"{a}@{s}" for a, s in cases], "batches": batches,
                      "weights": "random (speed does not depend on them)",
                      "input sets": ctx.input_sets})
    if not ctx.gpu and not ctx.tiny:
        res.setup["cpu"] = (f"reduced: batches {', '.join(map(str, batches))}"
                            + (", ViT-B/32 only, no export/compile" if ctx.quick else "")
                            + f"; torch threads: {torch.get_num_threads()}")
    for arch, size in cases:
        _run_case(ctx, res, arch, size, batches)


def _run_case(ctx: SuiteContext, res: SuiteResult, arch: str, size: int, batches: list[int]) -> None:
    cfg = _models.clip_config(arch, image_size=size if not arch.startswith("tiny") else None)
    cfg["text_cfg"] = dict(_models.TINY_TEXT)  # only the image tower runs: a small text tower saves time and memory
    case = f"{arch}@{size}"
    gflop = _models.image_gflop(cfg)
    res.setup.setdefault("gflop_per_image", {})[case] = round(gflop, 3)
    if arch == "ViT-B-16" and size == 224:
        res.setup["gflop_check"] = f"ViT-B/16 counted {gflop:.2f} GFLOP (METHODS.md: 35.13)"
    dev = ctx.device
    max_b = max(batches)
    models = {}
    ref_clip = _models.random_clip(cfg, arch, dev, "fp32", seed=0)
    g = torch.Generator().manual_seed(1)
    check_x = torch.rand(2, 3, size, size, generator=g).to(dev)
    with torch.inference_mode():
        ref_out = ref_clip.encode_image(ref_clip.preprocess_tensor(check_x))
    ort = trt = None
    for variant, kind, prec in _backends(ctx):
        reason = _skip_reason(ctx, kind)
        if reason:
            res.skip(case, variant, "baseline" if variant == BASELINE else "wsclip", reason)
            continue
        role = "baseline" if variant == BASELINE else "wsclip"
        try:
            if kind not in ("ort", "trt"):
                fn_for = _prepare(ctx, kind, prec, cfg, arch, ref_clip, models)
            else:
                if ort is None:
                    ort, trt = _export(ctx, ref_clip, cfg, arch, max_b, trt=_skip_reason(ctx, "trt") is None)
                fn_for = _artefact_fn(ctx, kind, ort if kind == "ort" else trt)
        except Exception as exc:  # noqa: BLE001 - a backend that fails here is reported, the others run
            res.skip(case, variant, role, f"{type(exc).__name__}: {str(exc)[:300]}", status="error")
            continue
        ok = True
        if variant != BASELINE:
            with torch.inference_mode():
                out = fn_for(check_x)()
            ok = res.check(case, f"{variant}: embeddings vs eager fp32", rel_err=rel_err(out.float(), ref_out),
                           tolerance=TOLERANCE[prec])
        if not ok:
            res.skip(case, variant, role, "outputs differ from eager fp32 beyond tolerance: not timed", status="error")
            continue
        ceiling_name = f"matmul_{prec}_GFLOPs"
        if ceiling_name not in ctx.ceilings:  # CPU runs measure the fp32 ceiling only
            ceiling_name = "matmul_fp32_GFLOPs"
        for b in batches:
            if not ctx.gpu and ctx.mode == "quick" and (kind != "eager" or prec != "fp32") and b > 1:
                continue  # quick CPU runs: only eager fp32 gets the batch sweep
            sets = Rotation([torch.rand(b, 3, size, size, generator=g).to(dev) for _ in range(ctx.input_sets)])
            fns = {id(x): fn_for(x) for x in sets.sets}

            def call():
                return fns[id(sets.next())]()

            # on a CPU the check above ran this eager backend once already (same weights and code, batch 2);
            # compiled and exported backends always warm up (a new batch size recompiles or re-plans)
            warm = 0 if (not ctx.gpu and kind in ("eager", "channels_last") and variant != BASELINE
                         and b == batches[0]) else ctx.warmup
            with torch.inference_mode():
                timing = ctx.meter.measure(call, reps=ctx.reps, warmup=warm, budget_s=ctx.budget_s,
                                           track_memory=True)
            res.timed(case, variant, role, timing, items=b, batch=b, gflop_per_item=gflop,
                      ceiling=ctx.ceilings.get(ceiling_name), ceiling_name=ceiling_name,
                      peak_mem_MB=timing.peak_mem_MB)
            ctx.log(f"{case} {variant} b{b}: {b / timing.median_s:.3g} img/s")
    # speed-ups at the largest batch each variant ran, against eager fp32 at the same batch
    for row in [r for r in res.results if r["case"] == case and r["status"] == "ok" and r["variant"] != BASELINE]:
        base = next((r for r in res.results if r["case"] == case and r["variant"] == BASELINE
                     and r["status"] == "ok" and r["batch"] == row["batch"]), None)
        same_variant = [r["batch"] for r in res.results if r["case"] == case and r["variant"] == row["variant"]
                        and r["status"] == "ok"]
        if base is not None and row["batch"] == max(same_variant):
            res.comparisons.append({"case": f"{case} batch {row['batch']}", "metric": "throughput",
                                    "fast": row["variant"], "baseline": BASELINE,
                                    "ratio": row["throughput"] / base["throughput"]})
    models.clear()


def _prepare(ctx, kind, prec, cfg, arch, ref_clip, models):
    """fn_for(x01) -> a callable returning embeddings, for an eager / channels-last / compiled backend."""
    dev = ctx.device
    clip = ref_clip if prec == "fp32" else _models.random_clip(cfg, arch, dev, prec, seed=0)
    if prec != "fp32":  # the reference's weights, rounded
        clip.model.load_state_dict(ref_clip.model.state_dict())
    visual = clip.model.visual
    fmt = torch.contiguous_format
    if kind == "channels_last":
        visual = copy.deepcopy(visual).to(memory_format=torch.channels_last)
        fmt = torch.channels_last
    elif kind in ("compile", "compile_graphs"):
        # default inductor mode (no CUDA graphs) vs reduce-overhead (CUDA graphs); one graph per batch size
        visual = torch.compile(visual, mode="reduce-overhead" if kind == "compile_graphs" else None, dynamic=False)
    dtype = clip.dtype
    mean = torch.tensor(clip.mean, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(clip.std, device=dev).view(1, 3, 1, 1)

    def fn_for(x01):
        px = ((x01 - mean) / std).to(dtype).contiguous(memory_format=fmt)

        def call():
            return torch.nn.functional.normalize(visual(px).float(), dim=-1)
        return call
    models[kind + prec] = clip
    return fn_for


def _artefact_fn(ctx, kind, path):
    if kind == "ort":
        from wsclip.export.ort import OrtRunner

        runner = OrtRunner(path, device=str(ctx.device), threads=torch.get_num_threads())
    else:
        from wsclip.export.tensorrt import TrtRunner

        runner = TrtRunner(path, device=ctx.device.index or 0)

    def fn_for(x01):
        arr = x01 if ctx.gpu else x01.cpu().numpy()

        def call():
            return runner.run_torch(arr)["embeddings"].to(ctx.device)
        return call
    return fn_for
