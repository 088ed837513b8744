"""CLIP-ES on the 14 real VOC images with a randomly initialised ViT-B/16 of the real architecture.

Saves the random ViT-B/16 once (work folder), runs `wsclip cam --method clip-es` on
tests/data/voc12_val14 (val split, their labels), then checks every CAM file: one map per
ground-truth class, the patch grid of the image rounded up to a multiple of 16 (513 -> 528 ->
33x33), full-resolution maps at the image's size, values in [0, 1]. Writes the timing and the
checks to benchmarks/results/clip_es_voc14.json. Random weights give meaningless maps: this
shows the real-size path runs and what it costs on this machine, not CAM quality.

    .venv/bin/python benchmarks/clip_es_voc14.py [--work runs/bench/clip_es_voc14] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOC14 = ROOT / "tests" / "data" / "voc12_val14"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench" / "clip_es_voc14", help="work folder")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--batch-size", type=int, default=2, help="images per forward (same rounded size)")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "clip_es_voc14.json")
    args = p.parse_args(argv)

    import numpy as np
    import open_clip
    import torch

    from wsclip.cli import main as wsclip
    from wsclip.io import atomic_write_json
    from wsclip.models.clip import save_clip

    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = args.work / "vit-b-16-random.safetensors"
    if not ckpt.is_file():
        torch.manual_seed(0)
        save_clip(ckpt, open_clip.create_model("ViT-B-16"), open_clip.get_model_config("ViT-B-16"), "ViT-B-16")
    out = args.work / "cams"
    if out.exists():
        for f in out.glob("*.npz"):
            f.unlink()
    t0 = time.perf_counter()
    rc = wsclip(["cam", "--method", "clip-es", "--clip", str(ckpt), "--data", f"voc:{VOC14}", "--split", "val",
                 "--out", str(out), "--device", args.device, "--workers", "0", "--batch-size", str(args.batch_size)])
    seconds = time.perf_counter() - t0
    if rc != 0:
        return rc

    from wsclip.data import open_dataset

    ds = open_dataset(f"voc:{VOC14}", split="val")
    checks = []
    for i, image_id in enumerate(ds.ids):
        h, w = ds.load_image(i).shape[:2]
        want_keys = np.flatnonzero(ds.label_vector(i).numpy() > 0.5)
        grid = (-(-h // 16), -(-w // 16))
        with np.load(out / f"{image_id}.npz") as z:
            keys, cam, high = z["keys"], z["cam"], z["high_res"].astype(np.float32)
        ok = (np.array_equal(keys, want_keys) and cam.shape == (len(keys), *grid)
              and high.shape == (len(keys), h, w) and float(high.min()) >= 0.0 and float(high.max()) <= 1.0 + 1e-3)
        checks.append({"id": image_id, "size": [h, w], "classes": len(keys), "grid": list(cam.shape[1:]), "ok": bool(ok)})
    record = {
        "benchmark": "clip_es_voc14", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": "python benchmarks/clip_es_voc14.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", "device": args.device,
        "torch": torch.__version__, "model": "ViT-B-16, random weights (real architecture)",
        "images": len(checks), "maps": int(sum(c["classes"] for c in checks)), "seconds": round(seconds, 1),
        "images_per_s": round(len(checks) / seconds, 3), "all_ok": all(c["ok"] for c in checks), "files": checks,
    }
    atomic_write_json(args.results, record)
    print(f"{len(checks)} images, {record['maps']} maps in {seconds:.1f} s ({record['images_per_s']} images/s); "
          f"checks {'passed' if record['all_ok'] else 'FAILED'}; wrote {args.results}")
    return 0 if record["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
