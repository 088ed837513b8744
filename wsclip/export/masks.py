"""`wsclip export masks`: a labelled folder in the formats labelling teams load.

    coco         one JSON file: images, categories (id k + 1 = class k, as the masks), and one annotation
                 per class mask (or per connected region with instances=True): COCO compressed RLE,
                 area, bbox, iscrowd 0; each image carries its wsclip quality score
    labelstudio  one JSON file of Label Studio tasks with pre-annotations ("predictions"): a
                 `brushlabels` result per class mask in Label Studio's own RLE (below), plus
                 <name>.labeling_config.xml declaring the BrushLabels (from_name "tag", to_name "image")
    cvat         a "Segmentation mask 1.1" zip: labelmap.txt declaring every colour used,
                 ImageSets/Segmentation/default.txt, SegmentationClass/ and SegmentationObject/ PNGs
    fiftyone     a COCO detection dataset folder (data/ with the photos, labels.json with a bbox on
                 every RLE annotation, as FiftyOne's COCO importer needs): `fo.Dataset.from_dir(DIR,
                 dataset_type=fo.types.COCODetectionDataset, label_types="segmentations")`

Ignore pixels (255): COCO, Label Studio and FiftyOne have no "ignore" region, so they are left out of
every annotation (unlabelled, like the background). CVAT refuses a colour its labelmap does not
declare, so by default (ignore="label") they are written in VOC's border colour 224,224,192 and
declared as a label "ignore" (only when some exported mask has them); ignore="background" writes
them as background instead. Images rejected in `wsclip review` (review.json) are left out;
only_accepted keeps just the accepted ones.

Label Studio RLE (the brush format of its frontend, the thi.ng rle-pack layout): the mask is
flattened to the RGBA image (H * W * 4 bytes, each pixel 255 in all four channels inside the
mask, 0 outside) and packed MSB first as: 32 bits value count, 5 bits word size - 1 (8 -> 7),
4 x 4 bits run-length field sizes - 1 (3, 4, 8, 16), then per run a flag bit (1 repeated value,
0 literal values), 2 bits choosing the field size, the count - 1 in that many bits, and the
value(s) in 8 bits; runs longer than 2^16 are split; then 1 to 8 zero bits of padding (a whole zero
byte when the bits end on a byte boundary, as Label Studio's own encoder writes).
"""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from wsclip.errors import MissingFileError, WsclipError
from wsclip.formats import bbox_of, regions

__all__ = ["FORMATS", "IGNORE_COLOR", "export_masks", "coco_dataset", "ls_rle_encode", "ls_rle_decode",
           "labelstudio_tasks", "labelstudio_config", "write_cvat_zip", "regions", "cvat_labelmap"]

FORMATS = ("coco", "labelstudio", "cvat", "fiftyone")
IGNORE_MODES = ("label", "background")
IGNORE_COLOR = (224, 224, 192)  # VOC's border colour (palette index 255)
LS_RLE_SIZES = (3, 4, 8, 16)


# ============================================================================ shared
def _file_name(folder, image_id: str) -> str:
    p = folder.image_path(image_id)
    return f"{image_id}{p.suffix.lower() if p is not None else '.jpg'}"


# ============================================================================ COCO
def coco_dataset(folder, ids: Sequence[str], instances: bool = False) -> dict:
    """The COCO dict of `ids` (RLE segmentations, bbox, area; 255 pixels are in no annotation)."""
    from wsclip.serve.labelers import rle_encode

    classes = folder.classes
    images, anns = [], []
    for n, image_id in enumerate(ids, 1):
        mask = folder.mask(image_id)
        q = folder.records[image_id].get("quality") or {}
        images.append({"id": n, "file_name": _file_name(folder, image_id), "height": int(mask.shape[0]),
                       "width": int(mask.shape[1]), "wsclip_id": image_id, "wsclip_quality": q.get("score")})
        for v, b in regions(mask, instances):
            anns.append({"id": len(anns) + 1, "image_id": n, "category_id": v, "segmentation": rle_encode(b),
                         "area": int(b.sum()), "bbox": bbox_of(b), "iscrowd": 0})
    cats = [{"id": k + 1, "name": c, "supercategory": "object"} for k, c in enumerate(classes)]
    return {"info": {"description": f"wsclip masks of {folder.root}"}, "images": images, "annotations": anns,
            "categories": cats}


# ============================================================================ Label Studio
def _pack_fields(values: np.ndarray, widths: np.ndarray) -> bytes:
    """Concatenate unsigned fields (value, bit width) MSB first, zero-padded to whole bytes."""
    widths = widths.astype(np.int64)
    owner = np.repeat(np.arange(len(widths)), widths)
    ends = np.cumsum(widths)
    pos = ends[owner] - 1 - np.arange(int(ends[-1]))  # bit index inside its field, from the least significant
    bits = (values.astype(np.uint64)[owner] >> pos.astype(np.uint64)) & np.uint64(1)
    return np.packbits(bits.astype(np.uint8)).tobytes()


def ls_rle_encode(binary: np.ndarray) -> list[int]:
    """Label Studio brush RLE (a list of byte values) of a boolean (H, W) mask; see the module docstring."""
    flat = np.repeat(np.asarray(binary, dtype=bool).reshape(-1).astype(np.uint8) * 255, 4)
    n = flat.size
    if n >= 2**32:
        raise WsclipError("image too large for Label Studio's RLE (2^32 values at most)")
    vals = [n, 7] + [s - 1 for s in LS_RLE_SIZES]
    wids = [32, 5, 4, 4, 4, 4]
    if n:
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        starts = np.concatenate([[0], change])
        lengths = np.diff(np.concatenate([starts, [n]]))
        for start, length in zip(starts.tolist(), lengths.tolist()):
            value = int(flat[start])
            if length == 1:  # a literal block of one value
                vals += [0, 0, 0, value]
                wids += [1, 2, 3, 8]
                continue
            while length > 2**16:
                vals += [1, 3, 2**16 - 1, value]
                wids += [1, 2, 16, 8]
                length -= 2**16
            idx = next(i for i, s in enumerate(LS_RLE_SIZES) if length <= 2**s)
            vals += [1, idx, length - 1, value]
            wids += [1, 2, LS_RLE_SIZES[idx], 8]
    packed = list(_pack_fields(np.array(vals, dtype=np.uint64), np.array(wids)))
    return packed + [0] * (sum(wids) % 8 == 0)  # Label Studio's encoder pads 1 to 8 zero bits, never none


def ls_rle_decode(rle: Sequence[int]) -> np.ndarray:
    """The flat uint8 values of a Label Studio brush RLE (the RGBA image; [3::4] is the alpha channel)."""
    bits = np.unpackbits(np.asarray(rle, dtype=np.uint8))
    pos = 0

    def read(k: int) -> int:
        nonlocal pos
        if pos + k > bits.size:
            raise WsclipError("truncated Label Studio RLE")
        v = 0
        for b in bits[pos:pos + k]:
            v = (v << 1) | int(b)
        pos += k
        return v

    n = read(32)
    word = read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out = np.zeros(n, dtype=np.uint8)
    i = 0
    while i < n:
        repeat = read(1)
        j = i + 1 + read(sizes[read(2)])
        if j > n:
            raise WsclipError("Label Studio RLE runs past its value count")
        if repeat:
            out[i:j] = read(word)
        else:
            for t in range(i, j):
                out[t] = read(word)
        i = j
    return out


def labelstudio_config(classes: Sequence[str]) -> str:
    """The labeling config (XML) the tasks' results refer to: Image "image", BrushLabels "tag"."""
    from xml.sax.saxutils import quoteattr

    from wsclip.io import voc_palette

    pal = voc_palette()
    labels = "\n".join(f'    <Label value={quoteattr(c)} background="#{pal[3 * (k + 1)]:02x}{pal[3 * (k + 1) + 1]:02x}'
                       f'{pal[3 * (k + 1) + 2]:02x}"/>' for k, c in enumerate(classes))
    return f'<View>\n  <Image name="image" value="$image" zoom="true"/>\n  <BrushLabels name="tag" toName="image">\n' \
           f"{labels}\n  </BrushLabels>\n</View>\n"


def labelstudio_tasks(folder, ids: Sequence[str], url_prefix: str = "") -> list[dict]:
    """Label Studio tasks: data.image (url_prefix + file name) and one prediction of brushlabels results."""
    classes = folder.classes
    tasks = []
    for image_id in ids:
        mask = folder.mask(image_id)
        h, w = mask.shape
        results = []
        for v, b in regions(mask, instances=False):
            results.append({"id": f"wsclip{len(results)}", "from_name": "tag", "to_name": "image", "type": "brushlabels",
                            "origin": "prediction", "original_width": int(w), "original_height": int(h),
                            "image_rotation": 0,
                            "value": {"format": "rle", "rle": ls_rle_encode(b), "brushlabels": [classes[v - 1]]}})
        q = (folder.records[image_id].get("quality") or {}).get("score")
        tasks.append({"data": {"image": url_prefix + _file_name(folder, image_id), "wsclip_id": image_id},
                      "predictions": [{"model_version": "wsclip", **({"score": q} if q is not None else {}),
                                       "result": results}]})
    return tasks


# ============================================================================ CVAT
def cvat_labelmap(classes: Sequence[str], with_ignore: bool) -> list[tuple[str, tuple[int, int, int]]]:
    """(name, colour) of every label: background, the classes (VOC palette colours 1..K), ignore if used."""
    from wsclip.io import voc_palette

    if len(classes) > 254:
        raise WsclipError(f"CVAT masks hold at most 254 classes, this folder has {len(classes)}")
    pal = voc_palette()
    out = [("background", (0, 0, 0))] + [(c, tuple(pal[3 * (k + 1): 3 * (k + 2)])) for k, c in enumerate(classes)]
    return out + [("ignore", IGNORE_COLOR)] if with_ignore else out


def _png(index: np.ndarray, palette: list[int]) -> bytes:
    from PIL import Image

    im = Image.fromarray(index.astype(np.uint8), mode="P")
    im.putpalette(palette)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def write_cvat_zip(folder, ids: Sequence[str], out, ignore: str = "label") -> dict:
    """CVAT "Segmentation mask 1.1" zip of `ids` (atomic); returns {"ignore_declared": bool}."""
    from wsclip.io import atomic_path, voc_palette

    if ignore not in IGNORE_MODES:
        raise WsclipError(f"ignore must be one of {', '.join(IGNORE_MODES)}, got '{ignore}'")
    classes = folder.classes
    masks = {}
    for i in ids:
        m = folder.mask(i)
        if ignore == "background":
            m = np.where(m == 255, 0, m).astype(np.uint8)
        masks[i] = m
    with_ignore = ignore == "label" and any((m == 255).any() for m in masks.values())
    lm = cvat_labelmap(classes, with_ignore)
    cls_pal = [0] * 768
    for k, (_, col) in enumerate(lm[: len(classes) + 1]):
        cls_pal[3 * k: 3 * k + 3] = col
    cls_pal[765:768] = IGNORE_COLOR
    obj_pal = voc_palette()
    with atomic_path(out) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr("labelmap.txt", "# label:color_rgb:parts:actions\n"
                       + "".join(f"{n}:{c[0]},{c[1]},{c[2]}::\n" for n, c in lm))
            z.writestr("ImageSets/Segmentation/default.txt", "".join(f"{i}\n" for i in ids))
            for i, m in masks.items():
                z.writestr(f"SegmentationClass/{i}.png", _png(m, cls_pal))
                obj = np.where(m == 255, 255, 0).astype(np.uint8)
                parts = regions(m, instances=True)
                if len(parts) > 254:  # more regions than palette entries: one object per class
                    parts = regions(m, instances=False)
                for n, (_, b) in enumerate(parts, 1):
                    obj[b] = n
                z.writestr(f"SegmentationObject/{i}.png", _png(obj, obj_pal))
    return {"ignore_declared": with_ignore}


# ============================================================================ FiftyOne
def write_fiftyone_dir(folder, ids: Sequence[str], out) -> None:
    """A COCO detection dataset folder: data/<file name> photos and labels.json (instances, bbox on each)."""
    from wsclip.io import atomic_write_json

    out = Path(out)
    data = out / "data"
    coco = coco_dataset(folder, ids, instances=True)
    for img, image_id in zip(coco["images"], ids):
        src = folder.image_path(image_id)
        if src is None:
            raise MissingFileError(f"no photo file known for '{image_id}': FiftyOne datasets hold the photos; "
                                   "pass --images (as given to `wsclip label`)")
        dst = data / img["file_name"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.is_file() or dst.stat().st_size != src.stat().st_size:
            shutil.copyfile(src, dst)
    atomic_write_json(out / "labels.json", coco)


# ============================================================================ entry point
def export_masks(folder, out, fmt: str, instances: bool = False, only_accepted: bool = False,
                 url_prefix: str = "", ignore: str = "label") -> dict:
    """Write the kept images of a LabeledFolder (or a folder path) in `fmt`; returns a summary dict."""
    from wsclip.io import atomic_write_json, atomic_write_text
    from wsclip.serve.folder import LabeledFolder

    if fmt not in FORMATS:
        raise WsclipError(f"unknown export format '{fmt}': use one of {', '.join(FORMATS)}")
    if not isinstance(folder, LabeledFolder):
        folder = LabeledFolder(folder)
    ids = folder.kept_ids(only_accepted)
    if not ids:
        raise WsclipError(f"no image of {folder.root} is left to export (all rejected, or none accepted)")
    out = Path(out)
    info: dict = {"format": fmt, "images": len(ids), "left_out": len(folder.ids) - len(ids), "out": str(out)}
    if fmt == "coco":
        coco = coco_dataset(folder, ids, instances)
        atomic_write_json(out, coco)
        info["annotations"] = len(coco["annotations"])
    elif fmt == "labelstudio":
        tasks = labelstudio_tasks(folder, ids, url_prefix)
        atomic_write_json(out, tasks)
        cfg = out.with_name(out.stem + ".labeling_config.xml")
        atomic_write_text(cfg, labelstudio_config(folder.classes))
        info.update(results=sum(len(t["predictions"][0]["result"]) for t in tasks), labeling_config=str(cfg))
    elif fmt == "cvat":
        info.update(write_cvat_zip(folder, ids, out, ignore))
    else:
        write_fiftyone_dir(folder, ids, out)
    return info
