"""CLIP-ES text: synonym fusion, background words, and sharpness-based prompt selection.

METHODS.md sections 1 and 5. Selection: for each candidate template, zero-shot classify the
images over the class names (softmax of 100 * cosine similarity), and score the template by its
sharpness = sum over images of var(s_i) / mean(s_i) (the dispersion index of image i's class
scores s_i, population variance). The sharpest template wins; CLIP-ES reports `a clean origami {}.`.
The image embeddings are computed once and shared by every template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch

from wsclip.errors import DatasetLayoutError, MissingFileError, WsclipError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


# ----------------------------------------------------------------------------- text
def fuse_synonyms(words: Sequence[str] | str, sep: str = ",") -> str:
    """One class string from a name and its synonyms: ['person', 'people', 'human'] -> 'person,people,human'."""
    if isinstance(words, str):
        return words
    words = [w.strip() for w in words if w and w.strip()]
    if not words:
        raise WsclipError("synonym fusion needs at least one non-empty word")
    return sep.join(dict.fromkeys(words))


def clip_es_text(dataset: str = "voc", classes: Sequence[str] | None = None, template: str | None = None,
                 background: Sequence[str] | None = None) -> dict:
    """CLIP-ES prompts {'foreground': [...], 'background': [...], 'template': str} for a dataset.

    Known datasets use the synonym-fused names and background words of METHODS.md section 1;
    `classes` (each a name or a list of synonyms), `template` and `background` override them.
    """
    from wsclip.vocab import method_text, prompts

    if template is not None and "{}" not in template:
        raise WsclipError(f"prompt template {template!r} has no '{{}}' where the class name goes")
    fused = None if classes is None else [fuse_synonyms(c) for c in classes]
    names, bg, tmpl = method_text(dataset, "clip-es", fused)
    tmpl = template or tmpl
    bg = tuple(background) if background is not None else bg
    return {"foreground": prompts(names, tmpl), "background": prompts(bg, tmpl), "template": tmpl}


def read_templates(path) -> list[str]:
    """Templates from a text file, one per line (blank lines and '#' comments skipped); each must hold '{}'."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"templates file not found: {path}")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        t = line.strip()
        if not t or t.startswith("#"):
            continue
        if "{}" not in t:
            raise WsclipError(f"{path}:{n}: template {t!r} has no '{{}}' where the class name goes")
        out.append(t)
    if not out:
        raise WsclipError(f"{path} holds no templates (one per line, with '{{}}' for the class name)")
    return list(dict.fromkeys(out))


def collect_images(paths: Iterable, limit: int | None = None) -> list[Path]:
    """Image files from files and folders (folders: their images, sorted), at most `limit`."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise MissingFileError(f"image or folder not found: {p}")
    if not files:
        raise DatasetLayoutError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {', '.join(map(str, paths))}")
    return files[:limit] if limit else files


# ----------------------------------------------------------------------------- scoring
def dispersion_index(probs: torch.Tensor) -> torch.Tensor:
    """var(s_i) / mean(s_i) per row of class scores (I, K) (population variance), float64."""
    p = torch.as_tensor(probs).double()
    return p.var(dim=-1, unbiased=False) / p.mean(dim=-1)


def sharpness(probs: torch.Tensor) -> float:
    """Sum over images of the dispersion index of their class scores (I, K)."""
    return float(dispersion_index(probs).sum())


@torch.no_grad()
def image_embeddings(clip, images: Iterable, batch_size: int = 32) -> torch.Tensor:
    """Normalised CLIP image embeddings (I, D) of images (paths, uint8 HWC arrays or tensors), at the model's input size."""
    from wsclip.io import read_image

    feats, batch = [], []

    def flush():
        if batch:
            feats.append(clip.encode_image(torch.cat(batch)).float())
            batch.clear()

    for im in images:
        arr = read_image(im) if isinstance(im, (str, Path)) else im
        batch.append(clip.preprocess_tensor(arr))
        if len(batch) >= batch_size:
            flush()
    flush()
    if not feats:
        raise DatasetLayoutError("prompt selection needs at least one image")
    return torch.cat(feats)


@torch.no_grad()
def template_scores(clip, image_feats: torch.Tensor, class_names: Sequence[str], template: str,
                    logit_scale: float = 100.0) -> torch.Tensor:
    """Zero-shot class scores (I, K): softmax over classes of logit_scale * cos(image, template(class))."""
    from wsclip.vocab import prompts

    text = clip.encode_text(prompts(class_names, template), normalize=True).to(image_feats.device)
    return (logit_scale * image_feats.float() @ text.float().T).softmax(dim=-1)


def rank_templates(clip, images, class_names: Sequence[str], templates: Sequence[str], batch_size: int = 32,
                   logit_scale: float = 100.0) -> list[tuple[str, float]]:
    """[(template, sharpness)] sorted from sharpest to least sharp (ties keep the input order).

    `images`: paths or arrays, or precomputed normalised embeddings (I, D) as a tensor.
    """
    if not templates:
        raise WsclipError("no candidate templates given")
    if len(class_names) < 2:
        raise WsclipError("prompt selection needs at least two class names")
    feats = images if isinstance(images, torch.Tensor) and images.dim() == 2 else image_embeddings(clip, images, batch_size)
    scored = [(t, sharpness(template_scores(clip, feats, class_names, t, logit_scale))) for t in templates]
    return sorted(scored, key=lambda ts: -ts[1])


def format_ranking(ranking: Sequence[tuple[str, float]], top: int | None = None) -> str:
    """A ranked table: rank, sharpness, template."""
    rows = list(ranking)[: top or None]
    lines = [f"{'rank':>4}  {'sharpness':>12}  template"]
    lines += [f"{i:>4}  {s:12.6g}  {t}" for i, (t, s) in enumerate(rows, 1)]
    return "\n".join(lines)


__all__ = [
    "fuse_synonyms", "clip_es_text", "read_templates", "collect_images", "dispersion_index", "sharpness",
    "image_embeddings", "template_scores", "rank_templates", "format_ranking",
]
