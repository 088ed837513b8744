"""`wsclip label --ray`: the batch labeler as a Ray Data pipeline (extra `[ray]`).

The driver plans the same fixed windows as the local run and skips finished ones (manifest);
each remaining window is one row of a Ray dataset. `map_batches` sends rows to a pool of
actors (`--concurrency`, `--gpus-per-actor`), each holding one labeler: an actor decodes its
window's images with a thread pool, labels them in one `label_batch` call (so batch composition,
and therefore every mask byte, equals the local run's), writes the outputs atomically and
returns one manifest record per image. Only the driver appends to the manifest. Inputs and
--out must be visible at the same paths from every node (a shared filesystem).
"""

from __future__ import annotations

import json
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from wsclip.errors import WsclipError, require
from wsclip.serve.batch import (MANIFEST, LabelRunConfig, Manifest, OutputOptions, _prepare_out, _settings,
                                _write_reports, attach_labels, error_record, finish_image, label_window, load_item,
                                open_source, windows)
from wsclip.serve.labelers import LabelerConfig


class WindowLabeler:
    """A Ray actor: one labeler; labels whole windows and writes their outputs."""

    def __init__(self, cfg: LabelerConfig, source, opts: OutputOptions, threads: int = 2):
        from wsclip.serve.labelers import load_labeler

        self.labeler = load_labeler(cfg)
        self.source, self.opts = source, opts
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="wsclip-ray")

    def __call__(self, batch: dict) -> dict:
        records: list[dict] = []
        for start, stop, skip in zip(batch["start"], batch["stop"], batch["skip"]):
            skip = set(json.loads(str(skip)))
            items = list(self.pool.map(lambda i: load_item(self.source, i), range(int(start), int(stop))))
            labelled, errs = label_window(self.labeler, items, self.opts.wants_cams)
            records += [r for r in errs if r["id"] not in skip]
            futs = [(i, self.pool.submit(finish_image, i, im, r, self.opts, self.source.file_of(i)))
                    for i, im, r in labelled if i not in skip]
            del items, labelled
            for image_id, fut in futs:
                try:
                    records.append(fut.result())
                except Exception as exc:  # noqa: BLE001 - one image's encoding failure fails that image only
                    records.append(error_record(image_id, f"{type(exc).__name__}: {exc}"))
        return {"record": np.array([json.dumps(r) for r in records], dtype=object)}


def _drive(ray, rows, cfg, source, opts, concurrency, gpus_per_actor, cpus_per_actor, actor_threads, manifest,
           counts, bar, on_error) -> str | None:
    """Run the windows through the actor pool; append records as they come; returns the first error."""
    first_error = None
    if not rows:
        return None
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map_batches(WindowLabeler, batch_size=1, batch_format="numpy", concurrency=concurrency,
                        num_gpus=gpus_per_actor or None, num_cpus=cpus_per_actor,
                        fn_constructor_kwargs={"cfg": cfg, "source": source, "opts": opts, "threads": actor_threads})
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        recs = [json.loads(r) for r in batch["record"]]
        manifest.append(recs)
        for r in recs:
            counts["labelled" if r["status"] == "ok" else "errors"] += 1
            if r["status"] == "error" and first_error is None:
                first_error = f"{r['id']}: {r['error']}"
        bar.update(len(recs))
        if first_error and on_error == "fail":
            break
    return first_error


def label_images_ray(labeler_cfg: LabelerConfig, inputs, run: LabelRunConfig, split: str | None = None,
                     labels=None, limit: int | None = None, concurrency: int = 1, gpus_per_actor: float | None = None,
                     cpus_per_actor: float = 1.0, address: str | None = None, num_cpus: int | None = None,
                     actor_threads: int = 2) -> dict:
    """Label like `wsclip.serve.batch.label_images`, on a Ray cluster (or a local Ray started here)."""
    ray = require("ray", "ray", "wsclip label --ray")
    require("ray.data", "ray", "wsclip label --ray")
    from wsclip.progress import enabled, progress
    from wsclip.serve.labelers import load_labeler

    if run.on_error not in ("skip", "fail"):
        raise WsclipError(f"--on-error must be skip or fail, got '{run.on_error}'")
    if concurrency < 1:
        raise WsclipError(f"--concurrency must be at least 1, got {concurrency}")
    if str(labeler_cfg.device).startswith("cuda") and not gpus_per_actor:
        raise WsclipError("--device cuda with --ray needs --gpus-per-actor (e.g. 1): Ray gives actors no GPU otherwise")
    source = open_source(inputs, split, limit=limit)
    # the driver loads the labeler on the CPU once: it checks the files and gives the classes
    probe = load_labeler(labeler_cfg.replace(device="cpu"))
    source = attach_labels(source, labels, probe.classes)
    if probe.needs_labels and not source.has_labels and probe.predictor is None:
        raise WsclipError(f"the {probe.method} method needs image-level labels and {inputs} has none: pass "
                          "--labels FILE, or --predict cam / --predict clip --clip FILE")
    window = int(run.window or 4 * probe.batch_size)
    out = Path(run.out)
    lock = _prepare_out(out, _settings(labeler_cfg, run, window, source, "pil"), run.restart)  # actors decode with PIL
    started = False
    try:
        manifest = Manifest(out / MANIFEST)
        done = manifest.finished(out)
        rows = []
        for w in windows(len(source), window):
            ids = [source.ids[i] for i in w]
            if any(i not in done for i in ids):
                rows.append({"start": w.start, "stop": w.stop, "skip": json.dumps([i for i in ids if i in done])})
        todo = sum(len(range(r["start"], r["stop"])) - len(json.loads(r["skip"])) for r in rows)
        opts = OutputOptions(out=out, cams=run.cams, overlays=run.overlays, rle=run.rle, classes=probe.classes,
                             crf=probe.refine == "crf", gt=run.gt)
        if rows and not ray.is_initialized():
            ray.init(address=address, num_cpus=num_cpus if address is None else None, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
            started = True
        if rows:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                ray.data.DataContext.get_current().enable_progress_bars = enabled()
        counts = {"labelled": 0, "errors": 0}
        t0 = time.perf_counter()
        bar = progress(total=todo, desc="label (ray)", unit="img")
        try:
            with warnings.catch_warnings():  # Ray Data's own deprecation notices are nothing a user can act on
                warnings.simplefilter("ignore", DeprecationWarning)
                first_error = _drive(ray, rows, labeler_cfg, source, opts, concurrency, gpus_per_actor,
                                     cpus_per_actor, actor_threads, manifest, counts, bar, run.on_error)
        finally:
            bar.close()
        if first_error and run.on_error == "fail":
            raise WsclipError(f"image {first_error} (--on-error fail; finished outputs are kept, a re-run resumes)")
        seconds = time.perf_counter() - t0
        errors = sorted(i for i, r in manifest.records.items() if r.get("status") == "error")
        summary = {"total": len(source), "labelled": counts["labelled"], "skipped_done": len(source) - todo,
                   "errors": len(errors), "seconds": round(seconds, 3),
                   "images_per_s": round(counts["labelled"] / seconds, 3) if seconds > 0 else None,
                   "labeler": {**probe.describe(), "device": labeler_cfg.device, "ray_actors": concurrency},
                   "error_ids": errors[:100]}
        _write_reports(out, source, manifest, summary, run.rle, probe.classes)
        return summary
    finally:
        if started:
            ray.shutdown()
        lock.close()
