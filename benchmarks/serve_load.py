"""Load benchmark of the labeling server against the batch labeler, measured in the same run.

1. Offline: `wsclip label` (wsclip.serve.batch.label_images) over the images -> images/s.
2. Online: the server (`wsclip serve` in a subprocess by default, or in this process) on loopback,
   driven by a bounded closed-loop load generator: `--concurrency` requests in flight at most,
   `--requests` in total (raw JPEG bodies, labels from the images' labels file when there is one)
   -> throughput, p50/p95/p99 latency, status counts, the server's batch-size histogram.

    .venv/bin/python benchmarks/serve_load.py [--model CKPT] [--images DIR] [--requests 200] [--concurrency 8]
                                              [--device cpu|cuda] [--tiny] [--out FILE]

Without --model a tiny random CAM network is made (a CPU plumbing check: its masks mean nothing,
its speed says little about a ResNet-50). Writes JSON to benchmarks/results/serve_load*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VOC14 = ROOT / "tests" / "data" / "voc12_val14"


def _random_camnet(folder: Path) -> Path:
    import torch

    from wsclip.models.camnet import build_camnet, save_camnet
    from wsclip.vocab import VOC_CLASSES

    torch.manual_seed(0)
    path = folder / "camnet_tiny_random.safetensors"
    save_camnet(path, build_camnet("tiny", len(VOC_CLASSES)), VOC_CLASSES)
    return path


def offline(model: Path, images: str, split: str | None, device: str, batch_size: int, workers: int, out: Path,
            limit: int | None) -> dict:
    """The batch labeler's throughput over the images (model loading excluded)."""
    from wsclip.serve.batch import LabelRunConfig, label_images
    from wsclip.serve.labelers import LabelerConfig, load_labeler

    cfg = LabelerConfig(model=str(model), device=device, batch_size=batch_size)
    lab = load_labeler(cfg)
    lab.warmup((64, 64))
    run = LabelRunConfig(out=out, workers=workers, post_workers=2, restart=True)
    s = label_images(cfg, images, run, split=split, limit=limit, labeler=lab)
    return {"images": s["labelled"], "seconds": s["seconds"], "images_per_s": s["images_per_s"]}


def _percentile(xs, q):
    import numpy as np

    return float(np.percentile(np.asarray(xs), q)) if xs else None


async def _load(url: str, bodies: list[tuple[bytes, str | None]], requests: int, concurrency: int,
                timeout: float) -> dict:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    lat, codes = [], {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        async def one(n):
            body, labels = bodies[n % len(bodies)]
            async with sem:
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/label", content=body, headers={"content-type": "image/jpeg"},
                                          params={"labels": labels} if labels else None)
                    code = r.status_code
                except httpx.HTTPError as exc:
                    code = type(exc).__name__
                dt = time.perf_counter() - t0
            codes[code] = codes.get(code, 0) + 1
            if code == 200:
                lat.append(dt)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(n) for n in range(requests)))
        wall = time.perf_counter() - t0
        metrics = (await client.get("/metrics")).text
    return {"wall_s": wall, "latencies": lat, "codes": codes, "metrics": metrics}


def _batch_histogram(metrics: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(metrics):
        if fam.name == "wsclip_batch_size":
            buckets = {s.labels["le"]: s.value for s in fam.samples if s.name.endswith("_bucket")}
            total = next((s.value for s in fam.samples if s.name.endswith("_count")), 0)
            ssum = next((s.value for s in fam.samples if s.name.endswith("_sum")), 0)
            return {"batches": total, "mean_batch": (ssum / total) if total else None, "cumulative_buckets": buckets}
    return {}


def _bodies(images: Path, limit: int | None) -> list[tuple[bytes, str | None]]:
    files = sorted(p for p in (images / "JPEGImages" if (images / "JPEGImages").is_dir() else images).glob("*.jpg"))
    labels = {}
    if (images / "labels.json").is_file():
        labels = json.loads((images / "labels.json").read_text())
    files = files[:limit] if limit else files
    return [(p.read_bytes(), ",".join(str(v) for v in labels.get(p.stem, [])) or None) for p in files]


def _start_server(model: Path, device: str, args) -> tuple[object, str]:
    flags = ["--model", str(model), "--device", device, "--port", "0", "--max-batch-size", str(args.max_batch_size),
             "--max-queue-delay-ms", str(args.max_queue_delay_ms), "--max-queue", str(max(64, 2 * args.concurrency)),
             "--batch-size", str(args.batch_size), "--log-level", "warning"]
    if args.server == "inprocess":
        from wsclip.serve.labelers import LabelerConfig
        from wsclip.serve.server import BackgroundServer, ServeConfig, create_app

        cfg = ServeConfig(port=0, max_batch_size=args.max_batch_size, max_queue_delay_ms=args.max_queue_delay_ms,
                          max_queue=max(64, 2 * args.concurrency))
        srv = BackgroundServer(create_app(LabelerConfig(model=str(model), device=device,
                                                        batch_size=args.max_batch_size), cfg), cfg)
        return srv, srv.url
    from wsclip.serve.launch import start_server_process

    return start_server_process(flags, ready_within=300)


def _stop(server) -> None:
    if isinstance(server, subprocess.Popen):
        import signal

        server.send_signal(signal.SIGTERM)
        server.wait(60)
    else:
        server.stop()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="CAM or seg network (default: a tiny random CAM network)")
    p.add_argument("--images", type=Path, default=VOC14, help="a VOC-layout folder or a folder of JPEGs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at most (closed loop)")
    p.add_argument("--batch-size", type=int, default=8, help="offline batch size")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    p.add_argument("--workers", type=int, default=2, help="offline decode workers")
    p.add_argument("--server", choices=("subprocess", "inprocess"), default="subprocess")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--tiny", action="store_true", help="a few requests on a few images (tests)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.tiny:
        args.requests, args.concurrency, args.workers = min(args.requests, 6), min(args.concurrency, 2), 0

    import torch

    from wsclip.io import atomic_write_json

    limit = 3 if args.tiny else None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or _random_camnet(tmp)
        is_voc = (args.images / "JPEGImages").is_dir()
        spec = f"voc:{args.images}" if is_voc else str(args.images)
        split = "val" if is_voc and (args.images / "val.txt").is_file() else None
        off = offline(model, spec, split, args.device, args.batch_size, args.workers, tmp / "offline", limit)
        bodies = _bodies(args.images, limit)
        server, url = _start_server(model, args.device, args)
        try:
            load = asyncio.run(_load(url, bodies, args.requests, args.concurrency, args.timeout))
        finally:
            _stop(server)
    ok = load["codes"].get(200, 0)
    online_ips = ok / load["wall_s"] if load["wall_s"] > 0 else None
    res = {
        "mode": "tiny" if args.tiny else "full",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": args.device,
                    "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
                    "torch": torch.__version__},
        "model": str(args.model) if args.model else "tiny random CAM network",
        "images": len(bodies), "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "offline": off,
        "online": {"requests": args.requests, "concurrency": args.concurrency, "server": args.server,
                   "max_batch_size": args.max_batch_size, "max_queue_delay_ms": args.max_queue_delay_ms,
                   "wall_s": round(load["wall_s"], 3), "ok": ok, "status_counts": {str(k): v for k, v in load["codes"].items()},
                   "images_per_s": round(online_ips, 3) if online_ips else None,
                   "latency_s": {f"p{q}": _percentile(load["latencies"], q) for q in (50, 95, 99)},
                   "batching": _batch_histogram(load["metrics"])},
    }
    res["online_vs_offline"] = (round(online_ips / off["images_per_s"], 3)
                                if online_ips and off.get("images_per_s") else None)
    out = args.out or ROOT / "benchmarks" / "results" / f"serve_load{'_tiny' if args.tiny else ''}.json"
    atomic_write_json(out, res)
    o = res["online"]
    print(f"offline: {off['images_per_s']} images/s ({off['images']} images)")
    print(f"online:  {o['images_per_s']} images/s, p50 {o['latency_s']['p50']}, p95 {o['latency_s']['p95']}, "
          f"p99 {o['latency_s']['p99']} s, statuses {o['status_counts']}, mean batch "
          f"{(o['batching'] or {}).get('mean_batch')}")
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
