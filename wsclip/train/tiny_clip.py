"""A tiny open_clip CLIP trained on the synthetic world (wsclip.data.synth), for CPU demos and tests.

The model is a plain `open_clip.CLIP` built from TINY_CLIP_CFG and saved in the
format `wsclip.models.clip.load_clip` reads (safetensors + JSON sidecar with
model_cfg). Training is contrastive on views of generated scenes:

- full images with their captions ("a photo of a boat and a bird on water."),
- object views: one object masked onto the CLIP mean colour (as CLIMS's fg = X * P),
  or its bounding-box crop, captioned "a photo of a boat.",
- background views: one class removed (as CLIMS's bg = X * (1 - P)), captioned by
  what is left ("a photo of water." when nothing is).

Every text has a content (classes, background); a text counts as a positive for
every view whose content it describes, so "a photo of a boat." is not pushed away
from a full image that holds a boat. The loss is the symmetric multi-positive
InfoNCE with a learnable logit scale, applied both to the CLS embedding (what
`encode_image` returns) and to the patch-mean embedding CLIP-ES uses. A short
text-only contrastive warm-up and a 10x smaller text learning rate keep the class
prompts apart while the image tower learns shapes (see `text_warmup`).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wsclip.data.synth import (
    SYNTH_BACKGROUNDS,
    SYNTH_CLASSES,
    SYNTH_SIZE,
    caption_for,
    generate_scene,
)
from wsclip.errors import WsclipError
from wsclip.models.clip import CLIP_MEAN, CLIP_STD, save_clip

TINY_CLIP_NAME = "tiny-synth"
#: bump when the world or the training recipe changes: it is part of every cache key (ensure_tiny_clip),
#: so a changed world or model never loads an old cached CLIP
TRAIN_VERSION = 2

#: open_clip model config: open_clip.CLIP(**TINY_CLIP_CFG)
TINY_CLIP_CFG: dict = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}

#: the ResNet variant (open_clip ModifiedResNet, attention pooling): learns the objects' shapes and
#: textures several times faster on CPU than the ViT (object top-1 0.66 vs 0.23 after 100 steps,
#: measured), so CLIMS uses it; CLIP-ES needs the ViT (patch tokens, attention maps).
TINY_CLIP_RN_CFG: dict = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32},
    "text_cfg": dict(TINY_CLIP_CFG["text_cfg"]),
}
TINY_CLIP_CFGS = {"vit": TINY_CLIP_CFG, "rn": TINY_CLIP_RN_CFG}

CROP_VIEWS = 1  # per scene: object bounding-box crops (masked views: TinyClipConfig.masked_views)
OBJECT_TEMPLATES = ("a photo of a {}.", "a photo of {}.", "a clean origami {}.", "a picture of a {}.")
BACKGROUND_TEMPLATES = ("a photo of {}.", "a clean origami {}.", "a picture of {}.")


@dataclass
class TinyClipConfig:
    """Training settings; `quick()` gives a short run for smoke tests and demos."""

    steps: int = 400
    batch_size: int = 32  # scenes per step; each gives 4 views
    lr: float = 1e-3
    text_lr_scale: float = 0.1  # the text tower learns slower, so class prompts stay apart
    text_warmup: int = 20  # text-only contrastive steps before joint training (see text_warmup)
    weight_decay: float = 0.1
    warmup: int = 20
    seed: int = 0
    size: int = SYNTH_SIZE  # scene size of the pretrain corpus (the world's); views are resized to the CLIP's input
    logit_scale: float | None = 10.0  # fixed contrastive scale (None: learned, as open_clip); see `train_step`
    corpus: int = 3000  # distinct pretrain scenes, drawn in turn and re-viewed (fresh masks, flips, crops)
    checkpoint_every: int = 100  # steps between resumable training states (0: never)
    arch: str = "vit"  # "vit" (CLIP-ES and CLIMS) or "rn" (CLIMS: learns objects faster)
    masked_views: int = 1  # per scene: objects masked onto the mean colour in the full frame (what CLIMS shows)
    model_cfg: dict | None = None  # an explicit open_clip config (default: the one of `arch`)

    def __post_init__(self):
        if self.model_cfg is None:
            if self.arch not in TINY_CLIP_CFGS:
                raise WsclipError(f"unknown tiny CLIP architecture '{self.arch}': use {' or '.join(TINY_CLIP_CFGS)}")
            self.model_cfg = copy.deepcopy(TINY_CLIP_CFGS[self.arch])

    @classmethod
    def quick(cls, **kw) -> "TinyClipConfig":
        base = {"steps": 150, "batch_size": 32, "warmup": 10}
        return cls(**{**base, **kw})

    def key(self) -> str:
        """Hash of everything that changes the trained weights."""
        d = asdict(self)
        d.pop("checkpoint_every")
        if d["masked_views"] == 1:  # added after files were cached: at its default the key stays what it was
            d.pop("masked_views")
        d["version"] = TRAIN_VERSION
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- model
def build_tiny_clip(model_cfg: dict | None = None):
    """An untrained open_clip.CLIP from `model_cfg` (default TINY_CLIP_CFG)."""
    import open_clip

    cfg = copy.deepcopy(model_cfg or TINY_CLIP_CFG)
    return open_clip.CLIP(**cfg)


def tokenize(texts, context_length: int):
    import open_clip

    return open_clip.tokenize(list(texts), context_length=context_length)


def encode_images(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLS embedding, patch-mean embedding), both L2-normalised, from normalised pixels.

    A ResNet tower has no patch tokens: both are its attention-pooled embedding.
    """
    visual = model.visual
    if not hasattr(visual, "transformer"):
        emb = F.normalize(visual(x), dim=-1)
        return emb, emb
    store = {}
    handle = visual.transformer.register_forward_hook(lambda m, i, o: store.__setitem__("tokens", o))
    try:
        cls_emb = visual(x)
    finally:
        handle.remove()
    tokens = store["tokens"]  # (B, 1 + N, C), batch-first in open_clip >= 2.2x
    avg = visual.ln_post(tokens[:, 1:].mean(1))
    if visual.proj is not None:
        avg = avg @ visual.proj
    return F.normalize(cls_emb, dim=-1), F.normalize(avg, dim=-1)


def encode_texts(model, texts, context_length: int | None = None) -> torch.Tensor:
    tokens = tokenize(texts, context_length or model.context_length)
    return F.normalize(model.encode_text(tokens), dim=-1)


# ----------------------------------------------------------------------------- views
def _normalise(images_uint8: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _dilate(m: torch.Tensor, r: int) -> torch.Tensor:
    return m if r <= 0 else F.max_pool2d(m, 2 * r + 1, stride=1, padding=r)


def _soften(m: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(m, 3, stride=1, padding=1, count_include_pad=False)


def _crop_resize(x: torch.Tensor, box, out: int) -> torch.Tensor:
    """Crop box (y0, x0, y1, x1) in pixels from x (C, H, W) and resize to (out, out) bilinearly."""
    _, h, w = x.shape
    y0, x0, y1, x1 = box
    theta = torch.tensor([[(x1 - x0) / w, 0.0, (x0 + x1) / w - 1.0],
                          [0.0, (y1 - y0) / h, (y0 + y1) / h - 1.0]], dtype=x.dtype)
    grid = F.affine_grid(theta[None], (1, x.shape[0], out, out), align_corners=False)
    return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


def to_input_size(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Normalised pixels (N, 3, S, S) resized to the CLIP's input size as CLIMS's masked images are
    (`wsclip.kernels.masked_batch`: bilinear, align_corners=True), so the CLIP learns what CLIMS shows it."""
    if size is None or x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)


def make_views(scenes, rng: np.random.Generator, out_size: int | None = None, masked_views: int = 1):
    """Views of a list of SynthScene: (pixels (N, 3, s, s) normalised, texts, contents).

    Per scene: the full image, `masked_views` + CROP_VIEWS object views and one background view,
    made at the scene size S and resized to `out_size` (default S).

    contents[i] = (frozenset of class indices, background index or None) of view i.
    """
    size = scenes[0].image.shape[0]
    x = _normalise(np.stack([s.image for s in scenes]))
    inst = torch.from_numpy(np.stack([s.instances for s in scenes]).astype(np.int64))
    views, texts, contents = [], [], []
    for b, sc in enumerate(scenes):
        img = x[b]
        bg = sc.background
        present = sc.classes
        names = [SYNTH_CLASSES[c] for c in present]
        if rng.random() < 0.5:
            img = img.flip(-1)
            inst_b = inst[b].flip(-1)
        else:
            inst_b = inst[b]
        # full view
        views.append(img)
        contents.append((frozenset(present), bg))
        r = rng.random()
        if r < 0.6:
            texts.append(sc.caption)
        elif r < 0.8:
            texts.append(caption_for(names))
        else:
            texts.append(rng.choice(OBJECT_TEMPLATES).format(SYNTH_CLASSES[int(rng.choice(present))]))
        # object views: masked onto the mean colour in the full frame (what CLIMS feeds CLIP)
        # and bounding-box crops (plain or masked)
        if sc.object_classes:
            n = len(sc.object_classes)
            kinds = ["masked"] * masked_views + ["crop"] * CROP_VIEWS
            picks = rng.choice(n, size=len(kinds), replace=n < len(kinds))
            for kind, j in zip(kinds, picks.tolist()):
                c = sc.object_classes[j]
                m = (inst_b == j + 1).float()[None, None]
                m = _dilate(m, int(rng.choice(4, p=(0.4, 0.3, 0.2, 0.1))))
                if rng.random() < 0.5:
                    m = _soften(m)
                m = m[0]
                if kind == "masked":
                    views.append(img * m)
                    contents.append((frozenset([c]), None))
                else:
                    ys, xs = torch.nonzero(inst_b == j + 1, as_tuple=True)
                    pad = float(rng.uniform(1, 5))
                    y0, y1 = ys.min().item() - pad, ys.max().item() + 1 + pad
                    x0, x1 = xs.min().item() - pad, xs.max().item() + 1 + pad
                    side = max(y1 - y0, x1 - x0)
                    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
                    box = (cy - side / 2, cx - side / 2, cy + side / 2, cx + side / 2)
                    if rng.random() < 0.6:
                        views.append(_crop_resize(img, box, size))
                        contents.append((frozenset([c]), bg))
                    else:
                        views.append(_crop_resize(img * m, box, size))
                        contents.append((frozenset([c]), None))
                texts.append(rng.choice(OBJECT_TEMPLATES).format(SYNTH_CLASSES[c]))
        # background view: remove every instance of one class
        c = int(rng.choice(present)) if present else -1
        removed = torch.zeros_like(inst_b, dtype=torch.float32)
        for j, cj in enumerate(sc.object_classes):
            if cj == c:
                removed = torch.maximum(removed, (inst_b == j + 1).float())
        m = _dilate(removed[None, None], int(rng.choice(3, p=(0.2, 0.5, 0.3)) + 1))
        if rng.random() < 0.5:
            m = _soften(m)
        views.append(img * (1 - m[0]))
        left = [k for k in present if k != c]
        if left:
            texts.append(caption_for([SYNTH_CLASSES[k] for k in left], SYNTH_BACKGROUNDS[bg]))
        else:
            texts.append(rng.choice(BACKGROUND_TEMPLATES).format(SYNTH_BACKGROUNDS[bg]))
        contents.append((frozenset(left), bg))
    return to_input_size(torch.stack(views), out_size), texts, contents


def describes(text_content, view_content) -> bool:
    """Whether a text with content (classes, bg) is true of a view with content (classes, bg).

    The text's classes must all be in the view and its background (if named) must match: so
    "a photo of water." is true of a boat on water as well (as for a web-trained CLIP, which is
    what gives CLIMS's CBS loss its signal), and false of a masked object (no background).
    """
    tc, tb = text_content
    vc, vb = view_content
    return tc <= vc and (tb is None or tb == vb)


def multi_positive_infonce(img: torch.Tensor, txt: torch.Tensor, pos: torch.Tensor, scale) -> torch.Tensor:
    """Symmetric InfoNCE where pos (N, U) bool marks every matching (view, text) pair.

    Each view's target is uniform over its matching texts, each text's over its matching views.
    """
    logits = scale * img @ txt.t()
    p = pos.float()
    i2t = -(F.log_softmax(logits, dim=1) * (p / p.sum(1, keepdim=True))).sum(1).mean()
    has = p.sum(0) > 0
    t2i = -(F.log_softmax(logits, dim=0) * (p / p.sum(0, keepdim=True).clamp_min(1))).sum(0)[has].mean()
    return 0.5 * (i2t + t2i)


@functools.lru_cache(maxsize=4096)
def _pretrain_scene(seed: int, index: int, size: int):
    """Scene `index` of the pretrain split, generated once per process (a corpus re-viewed every epoch)."""
    return generate_scene(seed, "pretrain", index, size)


def build_batch(cfg: TinyClipConfig, step: int):
    """Normalised pixels (N, 3, S, S), unique texts (U) and the positive matrix (N, U) for one step."""
    scenes = [_pretrain_scene(cfg.seed, (step * cfg.batch_size + i) % cfg.corpus, cfg.size)
              for i in range(cfg.batch_size)]
    rng = np.random.default_rng([cfg.seed, 7, step])
    x, texts, contents = make_views(scenes, rng, input_size(cfg.model_cfg), cfg.masked_views)
    # every step also contrasts against all class and background prompts
    t_obj, t_bg = rng.choice(OBJECT_TEMPLATES), rng.choice(BACKGROUND_TEMPLATES)
    extra = [t_obj.format(n) for n in SYNTH_CLASSES] + [t_bg.format(n) for n in SYNTH_BACKGROUNDS]
    unique = list(dict.fromkeys(texts + extra))
    text_content = [content_of_text(t) for t in unique]
    pos = torch.tensor([[describes(tc, vc) for tc in text_content] for vc in contents])
    return x, unique, pos


def input_size(model_cfg: dict) -> int:
    """The CLIP image tower's input size (pixels per side)."""
    return int(model_cfg["vision_cfg"]["image_size"])


def content_of_text(text: str):
    """(classes, background or None) that a generated caption or prompt states."""
    words = text.replace(",", " ").replace(".", " ").split()
    classes = frozenset(k for k, n in enumerate(SYNTH_CLASSES) if n in words)
    bg = next((k for k, n in enumerate(SYNTH_BACKGROUNDS) if n in words), None)
    return classes, bg


# ----------------------------------------------------------------------------- training
def _param_groups(model, weight_decay: float):
    """AdamW groups: (vision, text) x (decay, no decay); gains, biases, embeddings and the scale undecayed."""
    groups = []
    for tower in ("vision", "text"):
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if not p.requires_grad or (name.startswith("visual.") != (tower == "vision")):
                continue
            if p.ndim < 2 or "embedding" in name or "logit_scale" in name:
                no_decay.append(p)
            else:
                decay.append(p)
        groups += [{"params": decay, "weight_decay": weight_decay, "tower": tower},
                   {"params": no_decay, "weight_decay": 0.0, "tower": tower}]
    return groups


def text_warmup(model, steps: int, seed: int, lr: float = 1e-3) -> None:
    """Text-only contrastive warm-up: the templates of one concept are positives, other concepts negatives.

    A freshly initialised text tower maps "a photo of a boat." and "a photo of a car." to
    nearly the same point (cosine ~0.97); joint training from there collapses the class
    prompts together before the image tower can tell the objects apart. A few steps of
    this give every class and background word its own direction first.
    """
    concepts = [(c, OBJECT_TEMPLATES) for c in SYNTH_CLASSES] + [(b, BACKGROUND_TEMPLATES) for b in SYNTH_BACKGROUNDS]
    params = [p for n, p in model.named_parameters() if not n.startswith("visual.") and n != "logit_scale"]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0)
    rng = np.random.default_rng([seed, 11])
    target = torch.arange(len(concepts))
    for _ in range(steps):
        a = encode_texts(model, [rng.choice(t).format(c) for c, t in concepts])
        b = encode_texts(model, [rng.choice(t).format(c) for c, t in concepts])
        logits = 10.0 * a @ b.t()
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _lr_at(cfg: TinyClipConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, t)))


def train_step(model, opt, cfg: TinyClipConfig, step: int) -> float:
    """One optimisation step; returns the loss."""
    x, texts, pos = build_batch(cfg, step)
    lr = _lr_at(cfg, step)
    for g in opt.param_groups:
        g["lr"] = lr * (cfg.text_lr_scale if g.get("tower") == "text" else 1.0)
    cls_emb, avg_emb = encode_images(model, x)
    txt = encode_texts(model, texts)
    # a fixed, moderate scale makes the raw cosines themselves spread (matching pairs high, others
    # near 0), which CLIMS's OTM/BTM/CBS read directly; a learned one grows and lets them bunch up
    scale = model.logit_scale.exp() if cfg.logit_scale is None else torch.tensor(float(cfg.logit_scale))
    loss = multi_positive_infonce(cls_emb, txt, pos, scale)
    if avg_emb is not cls_emb:
        loss = 0.5 * (loss + multi_positive_infonce(avg_emb, txt, pos, scale))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return float(loss.detach())


def _state_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial.pt")


def train_tiny_clip(out, cfg: TinyClipConfig | None = None, resume: bool = True, eval_n: int = 200,
                    stop_after: int | None = None) -> dict:
    """Train the tiny CLIP and save it at `out` (.safetensors + .json sidecar); returns a summary.

    A resumable training state is kept beside `out` every `checkpoint_every` steps and
    removed at the end; a re-run with the same settings continues from it. `stop_after`
    ends this run after that many steps, saving the training state (not the model).
    """
    from wsclip.io import atomic_path, atomic_write_json, sidecar_path
    from wsclip.progress import progress

    cfg = cfg or TinyClipConfig()
    out = Path(out)
    if out.suffix != ".safetensors":
        raise WsclipError(f"tiny CLIP output must end in .safetensors, got {out}")
    if cfg.steps < 1 or cfg.batch_size < 2 or cfg.corpus < cfg.batch_size:
        raise WsclipError("tiny CLIP training needs steps >= 1, batch_size >= 2 and corpus >= batch_size")
    torch.manual_seed(cfg.seed)
    model = build_tiny_clip(cfg.model_cfg)
    model.train()
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    start, losses = 0, []
    state_file = _state_path(out)
    if resume and state_file.is_file():
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        if state.get("key") == cfg.key():
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            start, losses = int(state["step"]), list(state["losses"])
    if start == 0 and cfg.text_warmup:
        text_warmup(model, cfg.text_warmup, cfg.seed)
    t0 = time.perf_counter()
    bar = progress(total=cfg.steps, initial=start, desc="tiny-clip", unit="step")
    end = cfg.steps if stop_after is None else min(cfg.steps, start + int(stop_after))
    for step in range(start, end):
        losses.append(train_step(model, opt, cfg, step))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        done = step + 1
        if done < cfg.steps and ((cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == end):
            with atomic_path(state_file) as tmp:
                torch.save({"key": cfg.key(), "step": done, "losses": losses,
                            "model": model.state_dict(), "opt": opt.state_dict()}, tmp)
    bar.close()
    if end < cfg.steps:
        return {"steps": cfg.steps, "stopped_at": end, "state": str(state_file)}
    train_s = time.perf_counter() - t0
    model.eval()
    if cfg.logit_scale is not None:  # the scale it was trained with (CLIP-ES reads its own)
        with torch.no_grad():
            model.logit_scale.fill_(math.log(cfg.logit_scale))
    save_clip(out, model, cfg.model_cfg, name=TINY_CLIP_NAME + ("-rn" if cfg.arch == "rn" else ""))
    summary = {"steps": cfg.steps, "train_seconds_this_run": round(train_s, 1),
               "loss_first": losses[0] if losses else None, "loss_last": float(np.mean(losses[-10:])) if losses else None}
    if eval_n:
        summary["eval"] = evaluate_tiny_clip(model, n=eval_n, seed=cfg.seed, size=cfg.size)
    side = sidecar_path(out)
    meta = json.loads(side.read_text())
    meta.update({"train_cfg": asdict(cfg), "train_key": cfg.key(), "summary": summary})
    atomic_write_json(side, meta)
    if state_file.is_file():
        state_file.unlink()
    return summary


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_tiny_clip(model, n: int = 200, seed: int = 0, size: int = SYNTH_SIZE, batch: int = 100,
                       template: str = "a photo of {}.") -> dict:
    """Zero-shot figures on synth val scenes of `size` px, resized to the CLIP's input (fractions in [0, 1]).

    - top1_in_labels: the best of "a photo of a {class}." over all K classes is a present class
      (CLS embedding); top1_in_labels_patchmean: the same with the CLIP-ES patch-mean embedding;
    - object_top1: each object masked onto the mean colour is given its own class;
      object_crop_top1: the same for its masked bounding-box crop, resized to the input size;
    - background_top1: images with every object removed are given their background word;
    - object_vs_background: a masked object's class prompt beats every background word (CBS);
    - similarity spread, the raw cosines CLIMS's losses read (prompts in CLIMS's `template`), medians
      over objects: s_fg (masked object vs its class), s_bg (the image with that object removed vs
      its class: BTM), s_full (whole image vs the class: the "CAM = whole image" solution), c_fg_bg
      (masked object vs its scene's background word: CBS) and c_full_bg (whole image vs it);
      s_fg_gt_s_bg: the share of objects with s_fg > s_bg.
    """
    model.eval()
    res = input_size(_model_cfg(model))
    scenes = [generate_scene(seed, "val", i, size) for i in range(n)]
    cls_txt = encode_texts(model, [f"a photo of a {c}." for c in SYNTH_CLASSES])
    bg_txt = encode_texts(model, [f"a photo of {b}." for b in SYNTH_BACKGROUNDS])
    clims_cls = encode_texts(model, [template.format(c) for c in SYNTH_CLASSES])
    clims_bg = encode_texts(model, [template.format(b) for b in SYNTH_BACKGROUNDS])
    hits = hits_avg = 0
    obj_hits = obj_total = obj_vs_bg = bg_hits = crop_hits = 0
    spread: dict[str, list] = {k: [] for k in ("s_fg", "s_bg", "s_full", "c_fg_bg", "c_full_bg")}
    for s0 in range(0, n, batch):
        part = scenes[s0:s0 + batch]
        x = _normalise(np.stack([s.image for s in part]))
        inst = torch.from_numpy(np.stack([s.instances for s in part]).astype(np.int64))
        e_cls, e_avg = encode_images(model, to_input_size(x, res))
        for emb, name in ((e_cls, "cls"), (e_avg, "avg")):
            top = (emb @ cls_txt.t()).argmax(1).tolist()
            h = sum(int(t in s.classes) for t, s in zip(top, part))
            if name == "cls":
                hits += h
            else:
                hits_avg += h
        obj_x, rest_x, obj_y, obj_b, obj_img = [], [], [], [], []
        for b, s in enumerate(part):
            for j, c in enumerate(s.object_classes):
                m = (inst[b] == j + 1).float()
                obj_x.append(x[b] * m)
                same = torch.zeros_like(m)
                for jj, cc in enumerate(s.object_classes):
                    if cc == c:
                        same = torch.maximum(same, (inst[b] == jj + 1).float())
                rest_x.append(x[b] * (1 - _dilate(same[None, None], 1)[0, 0]))
                obj_y.append(c)
                obj_b.append(s.background)
                obj_img.append(b)
        obj_crops = []
        for b, s in enumerate(part):
            for j in range(len(s.object_classes)):
                ys, xs = torch.nonzero(inst[b] == j + 1, as_tuple=True)
                pad = 2 * size / 64
                y0, y1 = ys.min().item() - pad, ys.max().item() + 1 + pad
                x0, x1 = xs.min().item() - pad, xs.max().item() + 1 + pad
                side, cy, cx = max(y1 - y0, x1 - x0), (y0 + y1) / 2, (x0 + x1) / 2
                box = (cy - side / 2, cx - side / 2, cy + side / 2, cx + side / 2)
                obj_crops.append(_crop_resize(x[b] * (inst[b] == j + 1).float(), box, res))
        e_crop, _ = encode_images(model, torch.stack(obj_crops))
        e_obj, _ = encode_images(model, to_input_size(torch.stack(obj_x), res))
        e_rest, _ = encode_images(model, to_input_size(torch.stack(rest_x), res))
        sim_c = e_obj @ cls_txt.t()
        sim_b = e_obj @ bg_txt.t()
        y = torch.tensor(obj_y)
        rows = torch.arange(len(y))
        obj_hits += int((sim_c.argmax(1) == y).sum())
        crop_hits += int(((e_crop @ cls_txt.t()).argmax(1) == y).sum())
        obj_vs_bg += int((sim_c[rows, y] > sim_b.max(1).values).sum())
        obj_total += len(y)
        full = e_cls[torch.tensor(obj_img)]
        bgi = torch.tensor(obj_b)
        spread["s_fg"] += (e_obj @ clims_cls.t())[rows, y].tolist()
        spread["s_bg"] += (e_rest @ clims_cls.t())[rows, y].tolist()
        spread["s_full"] += (full @ clims_cls.t())[rows, y].tolist()
        spread["c_fg_bg"] += (e_obj @ clims_bg.t())[rows, bgi].tolist()
        spread["c_full_bg"] += (full @ clims_bg.t())[rows, bgi].tolist()
        bg_x = x * (1 - _dilate((inst > 0).float()[:, None], 1))
        e_bg, _ = encode_images(model, to_input_size(bg_x, res))
        bg_y = torch.tensor([s.background for s in part])
        bg_hits += int(((e_bg @ bg_txt.t()).argmax(1) == bg_y).sum())
    out = {
        "images": n,
        "top1_in_labels": hits / n,
        "top1_in_labels_patchmean": hits_avg / n,
        "object_top1": obj_hits / max(1, obj_total),
        "object_crop_top1": crop_hits / max(1, obj_total),
        "object_vs_background": obj_vs_bg / max(1, obj_total),
        "background_top1": bg_hits / n,
        "s_fg_gt_s_bg": float(np.mean(np.array(spread["s_fg"]) > np.array(spread["s_bg"]))),
    }
    out.update({f"median_{k}": float(np.median(v)) for k, v in spread.items()})
    return out


def _model_cfg(model) -> dict:
    """The open_clip config of a tiny CLIP (its image size is what matters here)."""
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return {"vision_cfg": {"image_size": int(size)}}


# ----------------------------------------------------------------------------- cache
def ensure_tiny_clip(cache_dir, seed: int = 0, steps: int | None = None, cfg: TinyClipConfig | None = None) -> Path:
    """Path of a trained tiny CLIP in `cache_dir`, training it only if no file for these settings exists.

    Files are keyed by a hash of the full training config (model, steps, seed, recipe version).
    """
    cfg = copy.deepcopy(cfg) if cfg is not None else TinyClipConfig()
    cfg.seed = int(seed)
    if steps is not None:
        cfg.steps = int(steps)
    path = Path(cache_dir) / f"tiny-clip-{cfg.key()}.safetensors"
    from wsclip.io import sidecar_path

    if path.is_file() and sidecar_path(path).is_file():
        return path
    train_tiny_clip(path, cfg)
    return path
