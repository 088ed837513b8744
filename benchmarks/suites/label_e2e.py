"""label-e2e: the batch labeler (`wsclip label`) from JPEG files to PNG masks, against a serial loop."""

from __future__ import annotations

import json
import os
import shutil

import torch

from wsclip.bench.suite import Skip, SuiteContext, SuiteResult

NAME = "label-e2e"
DESCRIPTION = ("JPEG files to palette PNG masks with a CAM network and image-level labels, at each image count. "
               "wsclip: `wsclip label` (decoding overlapped with compute in a reader thread on the CPU, DataLoader "
               "workers on CUDA; batched network; PNG encoding in a worker thread; manifest, atomic writes), with "
               "the eager fp32 network and with `--backend auto` (on the CPU the fastest variant whose masks match "
               "eager fp32). Baseline: the usual serial loop, one image at a time (decode, network at batch 1, "
               "argmax, write PNG) with the eager fp32 network, at the same torch thread count. Masks are compared "
               "before timing.")

SETUPS = {
    "gpu": dict(backbone="resnet50", counts=(112,), side=None, batch=16, scales=(1.0, 0.5, 1.5, 2.0), flip=True),
    # CPU: full VOC images at 4 to 200 (the VOC sample repeated); at 100+ images one timed run per variant
    "cpu": dict(backbone="resnet50", counts=(4, 14, 42, 200), side=None, batch=4, scales=(1.0,), flip=False),
    "cpu_quick": dict(backbone="resnet50", counts=(4,), side=224, batch=2, scales=(1.0,), flip=False),
    "tiny": dict(backbone="tiny", counts=(4,), side=64, batch=2, scales=(1.0,), flip=False),
}


def _inputs(ctx: SuiteContext, n: int, side: int | None):
    """n JPEG files (the VOC sample images, repeated under new names when n > 14; re-encoded at `side` px
    on the long side when given) and a labels JSON {id: [VOC indices 1..20]}."""
    from PIL import Image

    src = ctx.root / "tests" / "data" / "voc12_val14"
    if not (src / "labels.json").is_file():
        raise Skip(f"the VOC sample images are missing ({src})")
    table = json.loads((src / "labels.json").read_text())
    ids = sorted(table)
    folder = ctx.tmp / f"jpeg_{n}"
    folder.mkdir(parents=True, exist_ok=True)
    labels = {}
    for i in range(n):
        sid = ids[i % len(ids)]
        name = f"{i:04d}_{sid}"
        dst = folder / f"{name}.jpg"
        if side:
            with Image.open(src / "JPEGImages" / f"{sid}.jpg") as im:
                scale = side / max(im.size)
                im.convert("RGB").resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                                         Image.BICUBIC).save(dst, quality=90)
        else:
            shutil.copyfile(src / "JPEGImages" / f"{sid}.jpg", dst)
        labels[name] = table[sid]
    labels_path = ctx.tmp / f"labels_{n}.json"
    labels_path.write_text(json.dumps(labels))
    return folder, labels_path, sorted(labels)


WSCLIP_EAGER = "wsclip label, eager fp32"
WSCLIP_AUTO = "wsclip label, --backend auto"
SERIAL = "serial loop, batch 1, eager fp32"


def run(ctx: SuiteContext, res: SuiteResult) -> None:
    try:
        from wsclip.serve.batch import LabelRunConfig, label_images
        from wsclip.serve.labelers import LabelerConfig, load_labeler
    except ImportError as exc:
        raise Skip(f"wsclip's batch labeler is not available: {exc}") from None
    from benchmarks.baselines.serial_labeler import label_serially
    from wsclip.io import read_image, read_mask
    from wsclip.models.camnet import CAMNet, save_camnet
    from wsclip.vocab import VOC_CLASSES

    s = ctx.pick(gpu=SETUPS["gpu"], cpu=SETUPS["cpu"], cpu_quick=SETUPS["cpu_quick"], tiny=SETUPS["tiny"])
    torch.manual_seed(0)
    ckpt = ctx.tmp / "camnet.safetensors"
    save_camnet(ckpt, CAMNet(s["backbone"], len(VOC_CLASSES)), VOC_CLASSES)
    cfg = LabelerConfig(model=str(ckpt), device=str(ctx.device), batch_size=s["batch"], scales=tuple(s["scales"]),
                        flip=s["flip"], backend="eager")
    labelers = {WSCLIP_EAGER: (cfg, load_labeler(cfg))}
    if not ctx.gpu:  # on CUDA auto is eager (bf16 only with --amp): the same row
        auto = cfg.replace(backend="auto")
        labelers[WSCLIP_AUTO] = (auto, load_labeler(auto))
    serial_labeler = labelers[WSCLIP_EAGER][1]
    res.setup.update({"counts": list(s["counts"]), "backbone": s["backbone"], "batch": s["batch"],
                      "scales": list(s["scales"]), "flip": s["flip"], "torch_threads": torch.get_num_threads(),
                      "weights": "random (speed does not depend on them)"})
    if not ctx.gpu and not ctx.tiny:
        res.setup["cpu"] = ("full VOC images" if not s["side"] else f"reduced: images re-encoded at {s['side']} px") \
            + f", one scale; serial loop and wsclip at the same torch threads: {torch.get_num_threads()}"
    saved = os.environ.get("WSCLIP_NO_PROGRESS")
    os.environ["WSCLIP_NO_PROGRESS"] = "1"
    try:
        for n in s["counts"]:
            folder, labels_path, ids = _inputs(ctx, n, s["side"])
            sizes = sorted({tuple(read_image(folder / f"{i}.jpg").shape[:2]) for i in ids[:14]})
            case = (f"{n} JPEGs ({sizes[0][0]}x{sizes[0][1]}{'...' if len(sizes) > 1 else ''}), CAM net "
                    f"{s['backbone']}, scales {','.join(str(x) for x in s['scales'])}{' + flip' if s['flip'] else ''}")
            y_table = json.loads(labels_path.read_text())
            out_s = ctx.tmp / f"out_serial_{n}"

            def wsclip_run(name, n=n, folder=folder, labels_path=labels_path):
                lcfg, lab = labelers[name]
                run_cfg = LabelRunConfig(out=ctx.tmp / f"out_{len(name)}_{n}", restart=True)
                summary = label_images(lcfg, str(folder), run_cfg, labels=str(labels_path), labeler=lab)
                if summary["labelled"] != n:
                    raise RuntimeError(f"wsclip label wrote {summary['labelled']} of {n} masks: {summary}")
                res.setup.setdefault("labeler", {})[name] = summary["labeler"]

            def serial_run(folder=folder, ids=ids, y_table=y_table, out_s=out_s):
                label_serially(serial_labeler, folder, ids, y_table, out_s, len(VOC_CLASSES))

            serial_run()  # warm-up, and the reference masks
            runs = []
            for name in labelers:
                wsclip_run(name)  # warm-up (on the CPU, auto's one-time probe happens here)
                same = total = 0
                for i in ids:
                    a = read_mask(ctx.tmp / f"out_{len(name)}_{n}" / f"{i}.png")
                    b = read_mask(out_s / f"{i}.png")
                    same += int((a == b).sum())
                    total += a.size
                agree = same / total
                variant = labelers[name][1].variant
                tol = 1e-3 if variant in ("eager", "channels-last", None) else 1e-2
                if res.check(case, f"masks: serial loop vs {name} [{variant}] (pixel agreement)",
                             max_abs_err=1 - agree, tolerance=tol, detail=f"{100 * agree:.4f}% of {total} pixels agree"):
                    runs.append((name, "wsclip", lambda name=name: wsclip_run(name)))
                else:
                    res.skip(case, name, "wsclip", "not timed: its masks differ from the serial loop's")
            runs.append((SERIAL, "baseline", serial_run))
            for variant, role, fn in runs:
                reps = 1 if n >= 100 and not ctx.gpu else ctx.reps  # minutes per run on a CPU: one is enough
                timing = ctx.meter.measure(fn, reps=reps, warmup=0, budget_s=ctx.budget_s)  # warmed up above
                extra = {"backend_variant": labelers[variant][1].variant} if variant in labelers else {}
                res.timed(case, variant, role, timing, items=n, batch=s["batch"] if role == "wsclip" else 1, **extra)
                ctx.log(f"{case}: {variant}: {n / timing.median_s:.3g} img/s")
            for name in labelers:
                res.compare(case, name, SERIAL)
    finally:
        if saved is None:
            os.environ.pop("WSCLIP_NO_PROGRESS", None)
        else:
            os.environ["WSCLIP_NO_PROGRESS"] = saved
