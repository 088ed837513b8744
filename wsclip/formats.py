"""File formats, one writer and one reader each: CAM npz, mask PNG, COCO RLE.

CAM file (shared by `wsclip cam`, CLIP-ES, `wsclip label --cams`): one compressed `<id>.npz` per
image with "keys" (int64 0-based foreground classes present in the image), "cam" (K', h, w)
float16 at stride 4 (CAM nets) or the model's grid (CLIP-ES), "high_res" (K', H, W) float16 and,
from CLIP-ES with CAA, "high_res_raw" (the maps before CAA). Every other array is stored float16.

Mask PNG: palette PNG, uint8 values (0 background, k + 1 class k, 255 ignore); the writer and
reader live in `wsclip.io` (with the atomic writes they use) and are re-exported here.

RLE: COCO compressed RLE {"size": [H, W], "counts": str} over column-major pixels; decoding
reuses `wsclip.data.coco_masks` (the reader of COCO's own annotation files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from wsclip.errors import BadFileError, MissingFileError, ShapeError
from wsclip.io import encode_mask_png, read_mask, voc_palette, write_mask  # noqa: F401 - re-exported

CAM_KEYS = ("keys", "cam", "high_res", "high_res_raw")


# ============================================================================ CAM files
def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def write_cam_file(path, keys, cam=None, high_res=None, **more) -> None:
    """One compressed CAM .npz written atomically: keys as int64, every map (cam, high_res, ...) as float16."""
    from wsclip.io import atomic_path

    arrays = {"keys": _numpy(keys).astype(np.int64).reshape(-1)}
    for name, value in (("cam", cam), ("high_res", high_res), *more.items()):
        if value is not None:
            arrays[name] = _numpy(value).astype(np.float16)
    with atomic_path(path) as tmp:
        _write_npz(tmp, arrays)


def _write_npz(path, arrays: dict) -> None:
    """np.savez_compressed's layout with fixed zip timestamps, so equal arrays give equal bytes."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, value in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def read_cam_file(path) -> dict:
    """Load a CAM .npz as {"keys", "cam", "high_res", ...}; a corrupt file is a BadFileError naming it."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"CAM file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - zip/format errors of every kind
        raise BadFileError(f"cannot read CAM file {path}: {exc}; delete it and re-run `wsclip cam`") from exc
    if "keys" not in out or "high_res" not in out:
        raise BadFileError(f"{path} lacks 'keys'/'high_res': not a wsclip CAM file")
    return out


def read_cams(path, key: str = "high_res") -> dict:
    """{"keys", "cams" (K, H, W) float32, "file": all arrays} of one map set; BadFileError naming the file if unusable."""
    z = read_cam_file(path)
    if key not in z:
        raise BadFileError(f"{path} has no '{key}' maps (it holds {', '.join(sorted(z))})")
    cams = np.asarray(z[key], dtype=np.float32)
    keys = np.asarray(z["keys"]).astype(np.int64).reshape(-1)
    if cams.ndim != 3 or cams.shape[0] != len(keys):
        raise BadFileError(f"{path}: '{key}' has shape {cams.shape} for {len(keys)} classes; expected (K, H, W)")
    if not np.isfinite(cams).all():
        raise BadFileError(f"{path}: '{key}' holds NaN or infinite values; re-run `wsclip cam` for this image")
    return {"keys": keys, "cams": cams, "file": z}


# ============================================================================ RLE
def rle_encode(binary: np.ndarray) -> dict:
    """COCO compressed RLE {"size": [H, W], "counts": str} of a boolean (H, W) mask (column-major runs)."""
    b = np.asarray(binary, dtype=bool)
    if b.ndim != 2:
        raise ShapeError(f"RLE needs a 2-D mask, got shape {b.shape}")
    flat = b.T.reshape(-1).astype(np.int8)  # Fortran order
    change = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"size": [int(b.shape[0]), int(b.shape[1])], "counts": rle_counts_string(counts)}


def rle_counts_string(counts) -> str:
    """COCO's compressed RLE text of run lengths: LEB128-like: 5 bits a character (offset 48), runs after the 3rd stored as deltas."""
    out = []
    for i, c in enumerate(counts):
        x = int(c) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5
            more = (x != -1) if (ch & 0x10) else (x != 0)
            if more:
                ch |= 0x20
            out.append(chr(ch + 48))
    return "".join(out)


def rle_decode(rle: dict) -> np.ndarray:
    """Boolean (H, W) mask of a COCO RLE (compressed string or run list); inverse of rle_encode."""
    from wsclip.data.coco_masks import decode_rle_string, rle_to_mask

    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError) as exc:
        raise BadFileError(f"not a COCO RLE dict with 'size' and 'counts': {exc}") from None
    if isinstance(counts, (str, bytes)):
        counts = decode_rle_string(counts)
    return rle_to_mask(counts, h, w)


def regions(mask: np.ndarray, instances: bool = False) -> list[tuple[int, np.ndarray]]:
    """(class value, boolean region) pairs of a mask: one per class, or per 8-connected part with instances."""
    out = []
    for v in np.unique(mask):
        v = int(v)
        if v in (0, 255):
            continue
        b = mask == v
        if not instances:
            out.append((v, b))
            continue
        from scipy import ndimage

        lab, n = ndimage.label(b, structure=np.ones((3, 3), dtype=bool))
        out.extend((v, lab == j) for j in range(1, n + 1))
    return out


def bbox_of(b: np.ndarray) -> list[int]:
    """COCO bbox [x, y, width, height] of a non-empty boolean region."""
    ys, xs = np.nonzero(b)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def mask_annotations(mask: np.ndarray, classes: Sequence[str]) -> list[dict]:
    """COCO-style annotations (category_id = mask value, segmentation RLE, area, bbox) of each class in a mask."""
    return [{"category_id": v, "category": classes[v - 1] if 0 < v <= len(classes) else str(v),
             "segmentation": rle_encode(b), "area": int(b.sum()), "bbox": bbox_of(b)} for v, b in regions(mask)]
