"""A labelled output folder as the review page and the mask exports read it.

Two layouts: a `wsclip label` folder (manifest.jsonl with each image's record and quality score,
classes.json, optional cams/<id>.npz) or a `wsclip pseudo` folder (<id>.png masks and
quality.json). The review marks live in `review.json` beside them:

    {"version": 1, "marks": {"<id>": {"status": "accepted" | "rejected", "time": "<UTC ISO time>"}}}

written atomically (temporary file, then rename) under a lock (a thread lock and an flock on
.review.lock, so two tabs or two `wsclip review` processes never lose each other's marks), and a
crash never leaves half a file. Exports leave out rejected images.
"""

from __future__ import annotations

import json
import threading
import time
from functools import cached_property
from pathlib import Path
import numpy as np

from wsclip.errors import BadFileError, MissingFileError, WsclipError

__all__ = ["MARKS_FILE", "STATUSES", "LabeledFolder", "read_marks"]

MARKS_FILE = "review.json"
STATUSES = ("accepted", "rejected")
_LOCK = threading.Lock()  # one writer of review.json at a time in this process


def read_marks(root) -> dict[str, str]:
    """{id: "accepted" | "rejected"} from <root>/review.json ({} when absent); a corrupt file is an error."""
    path = Path(root) / MARKS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        marks = data["marks"]
        return {str(k): str(v["status"]) for k, v in marks.items() if v.get("status") in STATUSES}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise BadFileError(f"{path} is not a review marks file ({exc}); move it away to start the review again") from None


class LabeledFolder:
    """Read access to a labelled folder: ids, masks, photos, CAMs, quality, ground truth, review marks.

    images: an input spec as `wsclip label --images` takes it (for folders whose records do not name
    their photos, e.g. `wsclip pseudo` output); classes: names, 'voc'/'coco' or a class-list file
    (default: the folder's classes.json); gt: a folder of ground-truth <id>.png masks.
    """

    def __init__(self, root, images=None, split: str | None = None, classes=None, gt=None):
        from wsclip.serve.batch import CLASSES_FILE, MANIFEST, Manifest

        self.root = Path(root)
        if not self.root.is_dir():
            raise MissingFileError(f"labelled folder not found: {self.root}")
        self.gt = Path(gt) if gt is not None else None
        if self.gt is not None and not self.gt.is_dir():
            raise MissingFileError(f"ground-truth folder not found: {self.gt}")
        if (self.root / MANIFEST).is_file():
            recs = Manifest(self.root / MANIFEST, repair=False).records
            self.records = {i: r for i, r in recs.items() if r.get("status") == "ok" and (self.root / f"{i}.png").is_file()}
        else:
            self.records = self._pseudo_records()
        if not self.records:
            raise WsclipError(f"{self.root} holds no labelled masks (run `wsclip label` or `wsclip pseudo` into it)")
        self.ids = list(self.records)
        self._classes_arg = classes
        self._classes_file = self.root / CLASSES_FILE
        self._images_spec, self._split = images, split
        self._source = None
        self._iou: dict[str, dict] = {}  # per-image IoU against --gt (masks do not change while reviewed)

    def _pseudo_records(self) -> dict[str, dict]:
        from wsclip.label.pseudo import QUALITY_FILE

        quality = {}
        if (self.root / QUALITY_FILE).is_file():
            try:
                quality = json.loads((self.root / QUALITY_FILE).read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise BadFileError(f"{self.root / QUALITY_FILE} is not valid JSON") from None
        out = {}
        for p in sorted(self.root.glob("*.png")):
            rec = {"id": p.stem, "status": "ok"}
            if p.stem in quality:
                rec["quality"] = quality[p.stem]
            out[p.stem] = rec
        return out

    # ------------------------------------------------------------------ classes and files
    @cached_property
    def classes(self) -> tuple[str, ...]:
        """Class names (mask value k + 1 is classes[k])."""
        from wsclip.data.base import resolve_classes

        if self._classes_arg is not None:
            return resolve_classes(self._classes_arg)
        if self._classes_file.is_file():
            return tuple(json.loads(self._classes_file.read_text(encoding="utf-8")))
        raise WsclipError(f"{self.root} does not name its classes (no classes.json): pass --classes voc|coco|FILE")

    def mask(self, image_id: str) -> np.ndarray:
        from wsclip.io import read_mask

        return read_mask(self.root / f"{self._known(image_id)}.png")

    def _known(self, image_id: str) -> str:
        if image_id not in self.records:
            raise MissingFileError(f"no labelled image '{image_id}' in {self.root}")
        return image_id

    def image_path(self, image_id: str) -> Path | None:
        """The photo's file: the path the labelling run recorded, else the one the --images source gives."""
        rec = self.records[self._known(image_id)]
        if rec.get("image") and Path(rec["image"]).is_file():
            return Path(rec["image"])
        src = self.source()
        p = src.file_of(image_id) if src is not None else None
        return Path(p) if p is not None else None

    def source(self):
        """The --images source (an ImageSource; None when not given)."""
        if self._source is None and self._images_spec is not None:
            from wsclip.serve.batch import open_source

            self._source = open_source(self._images_spec, self._split)
        return self._source

    def image(self, image_id: str) -> np.ndarray:
        """RGB uint8 (H, W, 3) photo of an image."""
        from wsclip.io import read_image

        p = self.image_path(image_id)
        if p is not None:
            return read_image(p)
        src = self.source()
        if src is not None and src.index_of(image_id) is not None:
            return src.load(src.index_of(image_id))
        raise MissingFileError(f"no photo known for '{image_id}': pass the images the folder was labelled from "
                               "(--images, as given to `wsclip label`)")

    def cams(self, image_id: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(keys, maps (K, H, W) in [0, 1]) from cams/<id>.npz, or None when the run kept no CAMs."""
        p = self.root / "cams" / f"{self._known(image_id)}.npz"
        if not p.is_file():
            return None
        from wsclip.label.pseudo import read_cams

        z = read_cams(p)
        return z["keys"], z["cams"]

    def ground_truth(self, image_id: str) -> np.ndarray | None:
        if self.gt is None or not (self.gt / f"{image_id}.png").is_file():
            return None
        from wsclip.io import read_mask

        return read_mask(self.gt / f"{image_id}.png")

    def quality(self, image_id: str) -> dict:
        """The record's quality entry, with the per-class IoU against --gt added when given."""
        q = dict(self.records[self._known(image_id)].get("quality") or {})
        if self.gt is not None:
            if image_id not in self._iou:
                from wsclip.label.quality import image_iou

                gt = self.ground_truth(image_id)
                self._iou[image_id] = image_iou(self.mask(image_id), gt, len(self.classes) + 1) if gt is not None else {}
            q.update(self._iou[image_id])
        return q

    # ------------------------------------------------------------------ review marks
    def marks(self) -> dict[str, str]:
        return read_marks(self.root)

    def set_mark(self, image_id: str, status: str | None) -> dict[str, str]:
        """Mark an image accepted or rejected (None clears the mark); returns all marks. Atomic."""
        from wsclip.io import atomic_write_json

        self._known(image_id)
        if status is not None and status not in STATUSES:
            raise WsclipError(f"a mark is one of {', '.join(STATUSES)}, got '{status}'")
        import fcntl

        with _LOCK, open(self.root / ".review.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = self.root / MARKS_FILE
            data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"version": 1, "marks": {}}
            read_marks(self.root)  # refuse a corrupt file rather than overwrite it
            if status is None:
                data["marks"].pop(image_id, None)
            else:
                data["marks"][image_id] = {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            atomic_write_json(path, data)
        return self.marks()

    def kept_ids(self, only_accepted: bool = False) -> list[str]:
        """Ids the exports write: all but the rejected ones (only the accepted ones with only_accepted)."""
        marks = self.marks()
        if only_accepted:
            return [i for i in self.ids if marks.get(i) == "accepted"]
        return [i for i in self.ids if marks.get(i) != "rejected"]

    # ------------------------------------------------------------------ worst first
    def worst(self, n: int | None = None) -> list[dict]:
        from wsclip.label.quality import worst_first

        return worst_first(({"id": i, "quality": self.quality(i)} for i in self.ids), n)

    def worst_table(self, n: int) -> str:
        from wsclip.label.quality import format_worst

        rows = self.worst(n)
        if not rows:
            return "no quality scores in this folder (labelled before wsclip recorded them?)"
        return f"the {len(rows)} masks to review first (lowest quality score):\n" + format_worst(rows)

