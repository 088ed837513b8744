"""Server side, encode: a labelled image as a palette PNG or COCO RLE JSON (CRF first when asked)."""

from __future__ import annotations

import base64
from typing import Sequence


def render(item, result, fmt: str, classes: Sequence[str], method: str, for_json: bool = False):
    """(body bytes or dict, media type, headers) of one labelled image (a service `_Item`); runs the CRF when asked."""
    from wsclip.io import encode_mask_png
    from wsclip.serve.labelers import mask_annotations, refine_result

    if item.crf:
        result = refine_result(item.image, result)
    mask = result.mask
    names = [classes[int(k)] for k in result.keys]
    if fmt == "png":
        png = encode_mask_png(mask)
        if for_json:
            return {"mask_png_base64": base64.b64encode(png).decode("ascii"), "labels": names,
                    "predicted": bool(result.predicted)}, None, None
        headers = {"X-Wsclip-Labels": ",".join(names), "X-Wsclip-Predicted": str(bool(result.predicted)).lower()}
        return png, "image/png", headers
    body = {"height": int(mask.shape[0]), "width": int(mask.shape[1]), "method": method, "labels": names,
            "label_ids": [int(k) + 1 for k in result.keys], "predicted": bool(result.predicted),
            "annotations": mask_annotations(mask, classes)}
    return body, "application/json", {}
