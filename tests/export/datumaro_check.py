"""Read a CVAT "Segmentation mask 1.1" zip written by `wsclip export masks --format cvat` with datumaro
(the library CVAT imports that format with) and compare with the folder's masks pixel for pixel.

    python datumaro_check.py EXPORT.zip LABELLED_FOLDER {label|background}

Needs only datumaro, numpy and pillow (run it with an interpreter that has datumaro); prints JSON.
"""

import json
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def main(zpath: str, folder: str, ignore: str) -> int:
    import datumaro as dm

    out = {"formats": {}}
    with tempfile.TemporaryDirectory() as tmp:
        zipfile.ZipFile(zpath).extractall(tmp)
        differing = 0
        for fmt in ("voc_segmentation", "voc_instance_segmentation"):
            ds = dm.Dataset.import_from(tmp, fmt)
            names = [c.name for c in ds.categories()[dm.AnnotationType.label]]
            n = 0
            for item in ds:
                ref = np.asarray(Image.open(Path(folder) / f"{item.id}.png"))
                if ignore == "background":
                    ref = np.where(ref == 255, 0, ref)
                got = np.zeros(ref.shape, np.uint8)
                for a in item.annotations:
                    if a.type == dm.AnnotationType.mask:
                        name = names[a.label]
                        got[a.image.astype(bool)] = 255 if name == "ignore" else names.index(name)
                differing += int((got != ref).sum())
                n += 1
            out["formats"][fmt] = {"items": n, "labels": names}
        out["pixels_differing"] = differing
        # the reason ignore pixels are declared: an undeclared colour makes the import fail
        lm = Path(tmp) / "labelmap.txt"
        lines = [ln for ln in lm.read_text().splitlines() if not ln.startswith("ignore:")]
        if len(lines) != len(lm.read_text().splitlines()):
            lm.write_text("\n".join(lines) + "\n")
            try:
                ds = dm.Dataset.import_from(tmp, "voc_segmentation")
                for item in ds:
                    for a in item.annotations:
                        if a.type == dm.AnnotationType.mask:
                            a.image  # noqa: B018 - masks decode lazily
                out["undeclared_ignore_import"] = "accepted"
            except Exception as exc:  # noqa: BLE001
                out["undeclared_ignore_import"] = f"refused: {type(exc).__name__}"
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
