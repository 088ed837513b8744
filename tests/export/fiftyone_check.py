"""Read a folder written by `wsclip export masks --format fiftyone` with FiftyOne's COCO importer code
and compare the masks with the labelled folder pixel for pixel.

    python fiftyone_check.py EXPORT_DIR LABELLED_FOLDER

Tries `fo.Dataset.from_dir(..., COCODetectionDataset, label_types="segmentations")` first; where
FiftyOne's database (MongoDB, downloaded by fiftyone-db at install) is missing, it parses with the
importer's own functions (fiftyone.utils.coco: load_coco_detection_annotations, COCOObject.to_detection),
which is what from_dir runs per sample. Prints JSON.
"""

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def _paste(shape, det):
    """A Detection's mask (cropped to its relative bbox) pasted into a full-size boolean image."""
    h, w = shape
    x, y, bw, bh = det.bounding_box
    x0, y0 = int(round(x * w)), int(round(y * h))
    m = np.asarray(det.mask).astype(bool)
    full = np.zeros(shape, bool)
    full[y0:y0 + m.shape[0], x0:x0 + m.shape[1]] = m
    return full


def main(export_dir: str, folder: str) -> int:
    import fiftyone.utils.coco as fouc

    labels = Path(export_dir) / "labels.json"
    out = {}
    try:
        import fiftyone as fo

        ds = fo.Dataset.from_dir(dataset_dir=export_dir, dataset_type=fo.types.COCODetectionDataset,
                                 label_types="segmentations")
        samples = {Path(s.filepath).relative_to(Path(export_dir).resolve() / "data").as_posix(): s.segmentations
                   for s in ds}
        out["loader"] = "fo.Dataset.from_dir"
    except Exception as exc:  # noqa: BLE001 - no database: the importer's parsing functions
        out["loader"] = f"fiftyone.utils.coco parsing (from_dir failed: {type(exc).__name__})"
        info, classes, _, images, anns = fouc.load_coco_detection_annotations(str(labels))
        samples = {}
        for img_id, img in images.items():
            dets = [o.to_detection((img["width"], img["height"]), classes, load_segmentation=True)
                    for o in anns.get(img_id, [])]
            samples[img["file_name"]] = dets
    coco = json.loads(labels.read_text())
    names = [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
    differing = 0
    for img in coco["images"]:
        ref = np.asarray(Image.open(Path(folder) / f"{img['wsclip_id']}.png"))
        ref = np.where(ref == 255, 0, ref)
        dets = samples[img["file_name"]]
        dets = dets.detections if hasattr(dets, "detections") else (dets or [])
        got = np.zeros(ref.shape, np.uint8)
        for d in dets:
            got[_paste(ref.shape, d)] = names.index(d.label) + 1
        differing += int((got != ref).sum())
    out.update(images=len(coco["images"]), pixels_differing=differing)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
