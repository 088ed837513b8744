"""The bad-input zoo: awkward and broken image files every job that reads images must survive.

`make_zoo(folder)` writes them beside two good photos (real VOC images, downscaled) and a
labels.csv naming each with a VOC class; `ZOO` says, per file, what the correct outcome is:

- ("ok", (H, W)): labelled; the mask has this size (the EXIF orientation applied, so H and W of
  the rotated file are swapped; alpha dropped, CMYK / 16-bit / greyscale converted to RGB);
- ("error", words): skipped into errors.json with a one-line reason containing `words`, the
  run completes. The server answers 4xx for these (413 for the pixel limit, else 400).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np

H, W = 40, 56  # size of the small zoo images (odd, not square)

# file name -> (expected outcome, detail); every name is listed in labels.csv with class "cat"
ZOO: dict[str, tuple[str, object]] = {
    "good1.jpg": ("ok", (72, 96)),
    "good2.png": ("ok", (64, 80)),
    "truncated.jpg": ("error", "truncated"),
    "png_named.jpg": ("ok", (H, W)),            # a PNG under a .jpg name: the content decides
    "one_pixel.png": ("ok", (1, 1)),
    "huge_png.png": ("error", "above the limit"),   # 100000 x 100000 in the header
    "huge_jpeg.jpg": ("error", "above the limit"),   # 65000 x 65000 in the header
    "cmyk.jpg": ("ok", (H, W)),
    "sixteen_bit.png": ("ok", (H, W)),
    "grey.jpg": ("ok", (H, W)),
    "rgba.png": ("ok", (H, W)),
    "exif_rotated.jpg": ("ok", (W, H)),         # orientation 6: stored W x H, shown rotated
    "empty.jpg": ("error", "empty"),
    "folder.jpg": ("error", "folder"),          # a directory named like an image
}
GOOD = sorted(n for n, (kind, _) in ZOO.items() if kind == "ok")
BAD = sorted(n for n, (kind, _) in ZOO.items() if kind == "error")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header declares width x height (8-bit RGB) with a few bytes of data: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


def huge_jpeg(width: int = 65_000, height: int = 65_000) -> bytes:
    """A small real JPEG whose SOF header is patched to declare width x height."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 30, 200)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    i = 2
    while i < len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5:i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        i += 2 + length
    raise AssertionError("no SOF marker")


def _pattern(h: int = H, w: int = W) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1).astype(np.uint8)


def make_zoo(folder: Path, voc14: Path) -> Path:
    """Write the zoo and labels.csv (every file labelled 'cat') into `folder`; returns it."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = sorted(p for p in (voc14 / "JPEGImages").glob("*.jpg"))[:2]
    Image.open(ids[0]).convert("RGB").resize((96, 72)).save(folder / "good1.jpg", quality=90)
    Image.open(ids[1]).convert("RGB").resize((80, 64)).save(folder / "good2.png")
    rgb = Image.fromarray(_pattern())
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    rgb.save(folder / "png_named.jpg", format="PNG")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "one_pixel.png")
    (folder / "huge_png.png").write_bytes(huge_png())
    (folder / "huge_jpeg.jpg").write_bytes(huge_jpeg())
    rgb.convert("CMYK").save(folder / "cmyk.jpg", format="JPEG")
    Image.fromarray(_pattern()[..., 0].astype(np.uint16) * 257).save(folder / "sixteen_bit.png")  # I;16
    rgb.convert("L").save(folder / "grey.jpg")
    rgba = np.dstack([_pattern(), np.full((H, W), 0, np.uint8)])  # fully transparent: alpha must be dropped
    Image.fromarray(rgba).save(folder / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    rgb.save(folder / "exif_rotated.jpg", format="JPEG", exif=exif.tobytes())
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "folder.jpg").mkdir(exist_ok=True)
    (folder / "labels.csv").write_text("image,labels\n" + "".join(f"{n},cat\n" for n in sorted(ZOO)))
    return folder


def read_errors(out: Path) -> dict[str, str]:
    """{id: reason} of a job's <out>/errors.json (a list of {"id", "error"})."""
    import json

    return {e["id"]: e["error"] for e in json.loads((Path(out) / "errors.json").read_text())}


def zoo_id(name: str) -> str:
    """The output id of a zoo file (its name without the extension)."""
    return Path(name).stem


def check_outputs(out: Path, written: set[str], errors: dict[str, str], shapes: dict[str, tuple] | None = None):
    """Assert the zoo's outcomes: every good file written (with its expected size when `shapes` is
    given), every bad one in errors.json with a one-line reason naming the problem."""
    assert written == {zoo_id(n) for n in GOOD}, written
    assert set(errors) == {zoo_id(n) for n in BAD}, errors
    for n in BAD:
        msg = errors[zoo_id(n)]
        assert ZOO[n][1] in msg.lower() and "\n" not in msg and "Traceback" not in msg, (n, msg)
    for n in GOOD if shapes is not None else ():
        assert tuple(shapes[zoo_id(n)]) == ZOO[n][1], (n, shapes[zoo_id(n)])
