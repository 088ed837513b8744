"""The usual serial labeling loop (the baseline of the label-e2e suite): one image at a time, no pipelining.

Decode a JPEG, run the network at batch 1, take the argmax mask, write the PNG, next image: what
the public CAM scripts do per image, without `wsclip label`'s reader thread, batching, encoding
thread, manifest or resume. It runs the labeler it is given (the label-e2e suite gives it the eager
fp32 one) in the calling process, so at the same torch thread count as `wsclip label` there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def label_serially(labeler, folder: Path, ids: Sequence[str], labels: dict, out: Path, num_classes: int) -> None:
    """Write <out>/<id>.png for each <folder>/<id>.jpg; labels {id: [class indices 1..K]}."""
    from wsclip.io import read_image, write_mask

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i in ids:
        image = read_image(Path(folder) / f"{i}.jpg")
        y = np.zeros(num_classes, np.float32)
        y[[int(c) - 1 for c in labels[i]]] = 1
        result = labeler.label_batch([image], [y])[0]
        write_mask(out / f"{i}.png", result.mask)
