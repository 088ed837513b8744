"""Split lists: text files naming one image id per line (no torch import here)."""

from __future__ import annotations

from pathlib import Path

from wsclip.errors import DatasetLayoutError, MissingFileError

#: file endings treated as image or mask files when a list names files instead of ids
IMAGE_EXTS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def id_from_token(token: str) -> str:
    """'2007_000032', 'JPEGImages/2007_000032.jpg' or '/x/2007_000032.png' -> '2007_000032'."""
    name = token.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    stem, dot, ext = name.rpartition(".")
    if dot and stem and f".{ext.lower()}" in IMAGE_EXTS:
        return stem
    return name


def read_split(path) -> list[str]:
    """Ids listed in a split file: the first field of each non-empty line ('#' starts a comment).

    Lines may also be DeepLab-style pairs such as `/JPEGImages/x.jpg /SegmentationClassAug/x.png`.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"split file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetLayoutError(f"split file {path} is not a text file: {exc}") from None
    ids = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            ids.append(id_from_token(line.split()[0]))
    if not ids:
        raise DatasetLayoutError(f"split file {path} lists no ids: write one image id per line")
    return ids


def split_positions(split, ids, where) -> list[int]:
    """Positions in `ids` of the ids split file `split` lists, in its order; an id that is not among
    `ids` is a DatasetLayoutError naming `where` (the dataset's folder or annotation file)."""
    pos = {k: n for n, k in enumerate(ids)}
    wanted = read_split(split)
    unknown = [i for i in wanted if i not in pos]
    if unknown:
        raise DatasetLayoutError(f"{len(unknown)} ids of {split} are not images of {where}, e.g. '{unknown[0]}'")
    return [pos[i] for i in wanted]
