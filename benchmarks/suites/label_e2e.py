"""label-e2e: the batch labeler (`wsclip label`) from JPEG files to PNG masks, against a serial loop."""

from __future__ import annotations

import json
import os
import shutil

import torch

from wsclip.bench.suite import Skip, SuiteContext, SuiteResult

NAME = "label-e2e"
DESCRIPTION = ("JPEG files to palette PNG masks with a CAM network and image-level labels. wsclip: `wsclip label` "
               "(decoding in DataLoader workers, batched network, PNG encoding in a worker pool, manifest, "
               "atomic writes). Baseline: the usual serial loop, one image at a time (decode, network at batch "
               "1, argmax, write PNG). Both use the same loaded network; masks are compared before timing.")

SETUPS = {
    "gpu": dict(backbone="resnet50", images=112, side=None, batch=16, scales=(1.0, 0.5, 1.5, 2.0), flip=True),
    "cpu": dict(backbone="resnet50", images=14, side=None, batch=4, scales=(1.0,), flip=False),
    "cpu_quick": dict(backbone="resnet50", images=4, side=224, batch=2, scales=(1.0,), flip=False),
    "tiny": dict(backbone="tiny", images=4, side=64, batch=2, scales=(1.0,), flip=False),
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
    folder = ctx.tmp / "jpeg"
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
    labels_path = ctx.tmp / "labels.json"
    labels_path.write_text(json.dumps(labels))
    return folder, labels_path, sorted(labels)


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
    folder, labels_path, ids = _inputs(ctx, s["images"], s["side"])
    torch.manual_seed(0)
    ckpt = ctx.tmp / "camnet.safetensors"
    save_camnet(ckpt, CAMNet(s["backbone"], len(VOC_CLASSES)), VOC_CLASSES)
    cfg = LabelerConfig(model=str(ckpt), device=str(ctx.device), batch_size=s["batch"], scales=tuple(s["scales"]),
                        flip=s["flip"])
    labeler = load_labeler(cfg)
    n = len(ids)
    sizes = sorted({tuple(read_image(folder / f"{i}.jpg").shape[:2]) for i in ids[:14]})
    case = (f"{n} JPEGs ({sizes[0][0]}x{sizes[0][1]}{'...' if len(sizes) > 1 else ''}), CAM net {s['backbone']}, "
            f"scales {','.join(str(x) for x in s['scales'])}{' + flip' if s['flip'] else ''}")
    workers = 2
    res.setup.update({"images": n, "backbone": s["backbone"], "batch": s["batch"], "scales": list(s["scales"]),
                      "flip": s["flip"], "decode_workers": workers, "png_workers": workers,
                      "weights": "random (speed does not depend on them)"})
    if not ctx.gpu and not ctx.tiny:
        res.setup["cpu"] = (f"reduced: {n} images" + (f" re-encoded at {s['side']} px" if s["side"] else "")
                            + f", one scale; torch threads: {torch.get_num_threads()}")

    out_w, out_s = ctx.tmp / "out_wsclip", ctx.tmp / "out_serial"
    y_table = json.loads(labels_path.read_text())

    def wsclip_run():
        run_cfg = LabelRunConfig(out=out_w, workers=workers, post_workers=workers, restart=True)
        summary = label_images(cfg, str(folder), run_cfg, labels=str(labels_path), labeler=labeler)
        if summary["labelled"] != n:
            raise RuntimeError(f"wsclip label wrote {summary['labelled']} of {n} masks: {summary}")

    def serial_run():
        label_serially(labeler, folder, ids, y_table, out_s, len(VOC_CLASSES))

    saved = os.environ.get("WSCLIP_NO_PROGRESS")
    os.environ["WSCLIP_NO_PROGRESS"] = "1"
    try:
        wsclip_run()
        serial_run()
        same = total = 0
        for i in ids:
            a, b = read_mask(out_w / f"{i}.png"), read_mask(out_s / f"{i}.png")
            same += int((a == b).sum())
            total += a.size
        agree = same / total
        ok = res.check(case, "masks: serial loop vs wsclip label (pixel agreement)", max_abs_err=1 - agree,
                       tolerance=1e-3, detail=f"{100 * agree:.4f}% of {total} pixels agree")
        runs = [("wsclip label (pipelined, batched)", "wsclip", wsclip_run)]
        if ok:
            runs.append(("serial loop, batch 1", "baseline", serial_run))
        else:
            res.skip(case, "serial loop, batch 1", "baseline", "not timed: its masks differ from wsclip's")
        for variant, role, fn in runs:
            timing = ctx.meter.measure(fn, reps=ctx.reps, warmup=0, budget_s=ctx.budget_s)  # warmed up above
            res.timed(case, variant, role, timing, items=n, batch=s["batch"] if role == "wsclip" else 1)
            ctx.log(f"{variant}: {n / timing.median_s:.3g} img/s")
    finally:
        if saved is None:
            os.environ.pop("WSCLIP_NO_PROGRESS", None)
        else:
            os.environ["WSCLIP_NO_PROGRESS"] = saved
    res.compare(case, "wsclip label (pipelined, batched)", "serial loop, batch 1")
