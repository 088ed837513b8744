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
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from wsclip.errors import WsclipError, require
from wsclip.jobs import Job, error_record
from wsclip.serve.batch import (LabelRunConfig, OutputOptions, attach_labels, finish_image, label_job, label_window,
                                load_item, open_source, plan_windows, write_reports)
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


def _drive(ray, rows, cfg, source, opts, concurrency, gpus_per_actor, cpus_per_actor, actor_threads,
           job: Job) -> None:
    """Run the windows through the actor pool; record each image as its window comes back."""
    if not rows:
        return
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map_batches(WindowLabeler, batch_size=1, batch_format="numpy", concurrency=concurrency,
                        num_gpus=gpus_per_actor or None, num_cpus=cpus_per_actor,
                        fn_constructor_kwargs={"cfg": cfg, "source": source, "opts": opts, "threads": actor_threads})
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for r in batch["record"]:
            job.record(json.loads(r))
        if job.first_failure and job.on_error == "fail":
            break


def label_images_ray(labeler_cfg: LabelerConfig, inputs, run: LabelRunConfig, split: str | None = None,
                     labels=None, limit: int | None = None, concurrency: int = 1, gpus_per_actor: float | None = None,
                     cpus_per_actor: float = 1.0, address: str | None = None, num_cpus: int | None = None,
                     actor_threads: int = 2) -> dict:
    """Label like `wsclip.serve.batch.label_images`, on a Ray cluster (or a local Ray started here)."""
    ray = require("ray", "ray", "wsclip label --ray")
    require("ray.data", "ray", "wsclip label --ray")
    from wsclip.progress import enabled
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
    started = False
    with label_job(labeler_cfg, run, window, source, "pil") as job:  # actors decode with PIL
        done = job.finished()
        rows = [{"start": w.start, "stop": w.stop, "skip": json.dumps([source.ids[i] for i in w if source.ids[i] in done])}
                for w in plan_windows(source, window, done)]
        job.start(source.ids)
        opts = OutputOptions(out=job.out, cams=run.cams, overlays=run.overlays, rle=run.rle, classes=probe.classes,
                             crf=probe.refine == "crf", gt=run.gt)
        try:
            if rows and not ray.is_initialized():
                ray.init(address=address, num_cpus=num_cpus if address is None else None, include_dashboard=False,
                         log_to_driver=False, configure_logging=False)
                started = True
            with warnings.catch_warnings():  # Ray Data's own deprecation notices are nothing a user can act on
                warnings.simplefilter("ignore", DeprecationWarning)
                if rows:
                    ray.data.DataContext.get_current().enable_progress_bars = enabled()
                _drive(ray, rows, labeler_cfg, source, opts, concurrency, gpus_per_actor, cpus_per_actor,
                       actor_threads, job)
        finally:
            if started:
                ray.shutdown()
        job.raise_failure()
        return write_reports(job, source, run.rle, probe.classes,
                             labeler={**probe.describe(), "device": labeler_cfg.device, "ray_actors": concurrency})
