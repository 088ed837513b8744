"""The resumable job runner under every dataset-walking job (cam, label, pseudo, segment, refine, IRN seeds, qa-corpus).

    with Job("cam", out, settings, restart=False, on_error="skip") as job:
        for image_id in job.start(ids):            # the ids not finished yet; starts the progress bar
            outputs = ...                          # write them atomically (wsclip.io.atomic_path)
            job.done(image_id)                     # one manifest line, flushed and fsynced
        summary = job.finish()

Files in the output folder:

    manifest.jsonl     one JSON line per finished (or failed) item, appended, flushed and fsynced as
                       the item finishes: a kill loses at most the items in flight
    <job>_config.json  the settings the outputs were made with; a resume with other settings is
                       refused (`restart=True` / --restart redoes everything with the new ones)
    errors.json        the items that failed and why (on_error="skip": the run goes on)
    summary.json       counts and time of the last run

The manifest itself is the lock (flock on an open descriptor): a second run on the same folder
is refused, and the kernel drops the lock when the process dies, even by SIGKILL, so a stale lock
never blocks. An item counts as finished when its last record is ok and its output files exist.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Sequence

from wsclip.errors import WsclipError

MANIFEST = "manifest.jsonl"
ON_ERROR = ("skip", "fail")
INTERRUPTED = ("interrupted: finished work is kept (each job's manifest.jsonl, training checkpoints); "
               "re-run the same command to resume")


_HELD: dict[str, int] = {}  # manifests this process has locked -> the locked descriptor
_HELD_LOCK = threading.Lock()


def _drop_inherited_locks() -> None:
    """In a forked child (DataLoader worker, process pool): close the descriptors that hold the parent's
    job locks, so an orphan outliving a SIGKILLed parent for a moment never keeps the folder locked."""
    for fd in _HELD.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


class ItemFailed(WsclipError):
    """An item failed under on_error="fail" (its record is written; finished outputs are kept)."""


# ============================================================================ manifest
class Manifest:
    """Append-only JSON-lines record of finished items (the last record of an id wins).

    A run killed mid-line leaves a partial last line: reading drops it and truncates the file to
    its last complete line, so later appends stay valid JSON lines. `repair=False` (readers such as
    `wsclip review`, which may run beside a labelling run) only drops it.
    """

    def __init__(self, path, repair: bool = True):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        self._lock = threading.Lock()
        if self.path.is_file():
            self._load(repair)

    def _load(self, repair: bool = True) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data) and repair:  # partial tail from a killed run
            with open(self.path, "r+b") as f:
                f.truncate(end)
        data = data[:end]
        for line in data.decode("utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "id" in rec:
                self.records[str(rec["id"])] = rec

    def finished(self, out_dir: Path, outputs: Callable[[str], Sequence[str]] | None = None) -> set[str]:
        """Ids whose last record is ok and whose output files exist (default `<id>.png`)."""
        outputs = outputs or (lambda i: [f"{i}.png"])
        out_dir = Path(out_dir)
        return {i for i, r in self.records.items()
                if r.get("status") == "ok" and all((out_dir / f).is_file() for f in outputs(i))}

    def append(self, records: Iterable[dict]) -> None:
        """Append records as one write, flushed and fsynced (thread-safe)."""
        records = list(records)
        if not records:
            return
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        with self._lock:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            for r in records:
                self.records[str(r["id"])] = r

    def clear(self) -> None:
        with self._lock:
            with open(self.path, "w", encoding="utf-8"):
                pass
            self.records.clear()


def error_record(item_id: str, message: str) -> dict:
    return {"id": item_id, "status": "error", "error": message}


# ============================================================================ the job
class Job:
    """One resumable run of a job over an output folder: lock, settings check, manifest, errors, progress.

    name: the job ("cam", "label", ...; names its settings file). settings: a JSON-able dict of
    everything the outputs depend on. outputs(id): the files (relative to `out`) an item writes,
    all of which must exist for it to count as finished (default `<id><suffix>`). on_item(id):
    called after each finished item (tests use it to interrupt).
    """

    def __init__(self, name: str, out, settings: dict, *, restart: bool = False, on_error: str = "skip",
                 suffix: str = ".png", outputs: Callable[[str], Sequence[str]] | None = None,
                 config_file: str | None = None, desc: str | None = None, unit: str = "img",
                 on_item: Callable[[str], None] | None = None, what: str | None = None):
        if on_error not in ON_ERROR:
            raise WsclipError(f"--on-error must be one of {', '.join(ON_ERROR)}, got '{on_error}'")
        self.name, self.out = name, Path(out)
        self.settings = json.loads(json.dumps(settings, default=str))  # what a JSON round trip gives back
        self.restart, self.on_error = restart, on_error
        self.outputs = outputs or (lambda i: [f"{i}{suffix}"])
        self.config_path = self.out / (config_file or f"{name.replace(' ', '-')}_config.json")
        self.desc, self.unit, self.on_item = desc or name, unit, on_item
        self.what = what or f"{name} outputs"
        self.manifest: Manifest | None = None
        self.counts = {"done": 0, "errors": 0}
        self.first_failure: str | None = None
        self.total = self.skipped = 0
        self._lockfile = None
        self._bar = None
        self._count_lock = threading.Lock()
        self._inflight: deque = deque()
        self._t0 = time.perf_counter()

    # ------------------------------------------------------------------ open / close
    def __enter__(self) -> "Job":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        """Lock the folder, drop stale temporary files, check the settings against earlier outputs."""
        import fcntl

        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / MANIFEST
        key = str(path.resolve())
        busy = WsclipError(f"another wsclip job is writing to {self.out}; wait for it or pick another --out")
        with _HELD_LOCK:
            if key in _HELD:  # one process, two jobs on one folder
                raise busy
            lock = open(path, "a")
            try:
                # flock (not lockf): closing another descriptor of the file does not drop it, and the kernel
                # drops it when the process dies, even by SIGKILL (forked children close their copy at once)
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.close()
                raise busy from None
            _HELD[key] = lock.fileno()
        self._lockfile, self._lock_key = lock, key
        try:
            for tmp in self.out.rglob(".*.tmp*"):
                if tmp.is_file():
                    tmp.unlink()
            self.manifest = Manifest(path)
            self._check_settings()
        except BaseException:
            self.close()
            raise

    def _check_settings(self) -> None:
        from wsclip.io import atomic_write_json

        if self.restart:
            self.manifest.clear()
        elif self.manifest.records and self.config_path.is_file():
            try:
                old = json.loads(self.config_path.read_text())
            except json.JSONDecodeError:
                old = None
            if old != self.settings:
                old = old if isinstance(old, dict) else {}
                diff = sorted(k for k in set(self.settings) | set(old) if old.get(k) != self.settings.get(k))
                raise WsclipError(f"{self.out} holds {self.what} made with other settings "
                                  f"({', '.join(diff) or 'unreadable settings file'}): pick another --out, "
                                  "or pass --restart to redo everything there with the new settings")
        atomic_write_json(self.config_path, self.settings)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._lockfile is not None:
            import fcntl

            with _HELD_LOCK:
                _HELD.pop(self._lock_key, None)
            fcntl.flock(self._lockfile, fcntl.LOCK_UN)  # also for forked children sharing the descriptor
            self._lockfile.close()
            self._lockfile = None

    # ------------------------------------------------------------------ items
    def finished(self) -> set[str]:
        return self.manifest.finished(self.out, self.outputs)

    def start(self, ids: Sequence[str]) -> list[str]:
        """The ids still to do (in order) and a progress bar over them."""
        from wsclip.progress import progress

        done = self.finished()
        todo = [i for i in ids if i not in done]
        self.total, self.skipped = len(ids), len(ids) - len(todo)
        self._bar = progress(total=len(todo), desc=self.desc, unit=self.unit)
        self._t0 = time.perf_counter()
        return todo

    def done(self, item_id: str, **fields) -> None:
        """Record a finished item (its outputs are on disk)."""
        self.record({"id": item_id, "status": "ok", **fields})

    def fail(self, item_id: str, message: str) -> None:
        """Record a failed item; under on_error="fail" raise ItemFailed."""
        self.record(error_record(item_id, message))
        if self.on_error == "fail":
            self.raise_failure()

    def record(self, rec: dict, fatal: bool = True) -> None:
        """Write one record (ok or error) and count it. An error with fatal=False (a bad input image, an
        item an upstream job skipped) never stops the run, whatever on_error says."""
        self.write(rec)
        self.account(rec, fatal)

    def write(self, rec: dict) -> None:
        """Make one record durable (manifest line, fsynced); thread-safe, so pool callbacks call it."""
        self.manifest.append([rec])

    def account(self, rec: dict, fatal: bool = True) -> None:
        """Count a written record: progress bar, first failure, on_item (call from the job's own thread)."""
        ok = rec.get("status") == "ok"
        with self._count_lock:
            self.counts["done" if ok else "errors"] += 1
            if not ok and fatal and self.first_failure is None:
                self.first_failure = f"{rec['id']}: {rec.get('error', '')}"
            if self._bar is not None:
                self._bar.update(1)
                if self.counts["errors"]:
                    self._bar.set_postfix(errors=self.counts["errors"])
        if not ok and (self.on_error == "skip" or not fatal):
            print(f"wsclip {self.name}: skipped {rec['id']}: {rec.get('error', '')}", file=sys.stderr)
        if ok and self.on_item is not None:
            self.on_item(rec["id"])

    @contextlib.contextmanager
    def item(self, item_id: str, defer: bool = False, **fields):
        """Work on one item: on success its ok record is written (unless `defer`: the block hands the
        item to `submit`, whose callback records it once its outputs are written); a WsclipError or
        OSError inside becomes its error record (the run goes on; under on_error="fail" it propagates)."""
        extra = dict(fields)
        try:
            yield extra  # the caller may add fields to the item's record
        except (WsclipError, OSError) as exc:
            self.record(error_record(item_id, str(exc)))
            if self.on_error == "fail":
                raise  # the item's own error, with its own type
            return
        if not defer:
            self.done(item_id, **extra)

    def submit(self, pool, item_id: str, fn: Callable, *args) -> None:
        """Run fn(*args) for one item in `pool`; its record is written the moment it finishes.

        fn returns the item's record (a dict with "id" and "status"), a dict of fields for its ok record,
        or anything else for a plain ok record; an exception becomes its error record. Call `drain` to
        count finished items.
        """
        fut, box = pool.submit(fn, *args), []

        def written(f) -> None:  # runs as the future finishes, so the manifest line is never delayed
            if f.cancelled():
                return
            exc = f.exception()
            if exc is not None:
                why = str(exc) if isinstance(exc, (WsclipError, OSError)) else f"{type(exc).__name__}: {exc}"
                rec = error_record(item_id, why)
            else:
                r = f.result()
                if isinstance(r, dict) and "status" in r and r.get("id") == item_id:
                    rec = r  # the item's own record
                else:  # a plain dict: fields of its ok record
                    rec = {"id": item_id, "status": "ok", **(r if isinstance(r, dict) else {})}
            self.write(rec)
            box.append(rec)

        fut.add_done_callback(written)
        self._inflight.append((fut, box))

    def drain(self, keep: int = 0) -> None:
        """Count the finished pool items at the head; wait until at most `keep` are in flight."""
        while self._inflight and (len(self._inflight) > keep or self._inflight[0][0].done()):
            fut, box = self._inflight.popleft()
            fut.exception()  # waits for it
            while not box:  # its callback runs right after it completes
                time.sleep(0.001)
            self.account(box[0])

    def raise_failure(self) -> None:
        """Stop the run (on_error="fail") when an item failed."""
        if self.first_failure is not None and self.on_error == "fail":
            raise ItemFailed(f"{self.first_failure} (--on-error fail; finished outputs are kept, a re-run resumes)")

    # ------------------------------------------------------------------ end
    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._t0

    def errors(self) -> list[dict]:
        return [{"id": i, "error": r.get("error", "")} for i, r in self.manifest.records.items()
                if r.get("status") == "error"]

    def finish(self, **extra) -> dict:
        """Write errors.json and summary.json; return the summary."""
        from wsclip.io import atomic_write_json, write_errors

        errors = self.errors()
        seconds = self.seconds
        summary = {"job": self.name, "total": self.total, "done": self.counts["done"], "skipped_done": self.skipped,
                   "errors": len(errors), "seconds": round(seconds, 3),
                   "items_per_s": round(self.counts["done"] / seconds, 3) if seconds > 0 else None,
                   "error_ids": sorted(e["id"] for e in errors)[:100], **extra}
        write_errors(self.out, [(e["id"], e["error"]) for e in errors])
        atomic_write_json(self.out / "summary.json", summary)
        return summary


    def result(self, **extra) -> dict:
        """finish(), then the counts every dataset job returns: {"written", "skipped", "failed": [(id, why)], "total"}."""
        summary = self.finish(**extra)
        return {"written": summary["done"], "skipped": summary["skipped_done"],
                "failed": [(e["id"], e["error"]) for e in self.errors()], "total": summary["total"]}


class _Items:
    """DataLoader side of a job: load(dataset, i) for each index; a WsclipError or OSError becomes
    {"id", "error"}, so one bad image fails itself only."""

    def __init__(self, dataset, indices, load: Callable):
        self.dataset, self.indices, self.load = dataset, list(indices), load

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, n: int) -> dict:
        i = self.indices[n]
        try:
            return self.load(self.dataset, i)
        except (WsclipError, OSError) as exc:
            return {"id": self.dataset.ids[i], "error": str(exc)}


def _no_collate(x):
    return x


def load_items(job: Job, dataset, todo: Sequence[str], load: Callable, num_workers: int = 0, **kw):
    """Yield load(dataset, i) for the dataset images in `todo` (input order), decoded in DataLoader workers;
    items that fail to load are recorded as errors and not yielded."""
    import torch

    want = set(todo)
    order = [i for i, image_id in enumerate(dataset.ids) if image_id in want]
    from wsclip.workers import die_with_parent

    loader = torch.utils.data.DataLoader(_Items(dataset, order, load), batch_size=None, shuffle=False,
                                         num_workers=num_workers, collate_fn=_no_collate,
                                         worker_init_fn=die_with_parent if num_workers else None, **kw)
    for item in loader:
        if "error" in item:
            job.fail(item["id"], item["error"])
        else:
            yield item


def file_fingerprint(path) -> dict | None:
    """{"path", "sha256"} of a model file a job reads (None for None); a resume checks the hash."""
    if path is None:
        return None
    from wsclip.io import file_sha256

    p = Path(path)
    return {"path": str(p), "sha256": file_sha256(p) if p.is_file() else None}


def format_summary(summary: dict, verb: str = "wrote", what: str = "items") -> str:
    """A few lines for the terminal."""
    done = summary.get("done", summary.get("labelled", 0))
    lines = [f"{verb} {done} {what} ({summary['skipped_done']} already done, {summary['total']} total)"
             f" in {summary['seconds']:.1f} s"]
    if summary["errors"]:
        ids = summary["error_ids"]
        lines.append(f"{summary['errors']} failed (see errors.json): {', '.join(ids[:5])}"
                     + (" ..." if summary["errors"] > 5 else ""))
    return "\n".join(lines)
