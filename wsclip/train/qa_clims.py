"""QA-CLIMS training (`wsclip train qa-clims`), METHODS.md section 4.

The CAM net, its sigmoid maps, the masked fg/bg images (`wsclip.kernels.masked_batch`)
and the frozen CLIP are CLIMS's (wsclip.train.clims); the text side comes from a VQA
corpus (wsclip.train.qa_corpus). Every text is encoded once per run, before training:

- t_fg(image, class) = w e("a photo of {label}.") + (1 - w) mean_i e("a photo of {answer_i}."),
  w = 0.5, with the label appended to answers that lack it. As in METHODS.md and the
  public code, t_fg is NOT re-normalised (the e(.) are unit vectors, their mix is shorter).
- background texts: the pair's de-duplicated background answers minus the label (at most
  10), stored once each in a table of unique texts and gathered per pair.

L = w1 FRC + w2 BRC + w3 REG (losses.frc / losses.brc: sums over pairs, pairs without a
background text skipped; REG the mean CAM). Under DDP the sums are scaled so that N
processes train like one process on the same global batch (as in clims.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from wsclip.config import QaClimsConfig
from wsclip.errors import WsclipError
from wsclip.train import losses
from wsclip.train.clims import encode_masked_pairs, load_frozen_clip, mask_normalisation
from wsclip.train.qa_corpus import QACorpus, QAEntry, bg_texts, fg_texts, load_corpus, qa_label_name


class MissingPairError(WsclipError, KeyError):
    """An (image, class) pair of the training data has no entry in the QA corpus."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def prompt_names(cfg: QaClimsConfig, classes: Sequence[str]) -> list[str]:
    """The label text per class: cfg.class_names, else readable class names ('diningtable' -> 'dining table')."""
    names = list(cfg.class_names) if cfg.class_names else [qa_label_name(c) for c in classes]
    if len(names) != len(classes):
        raise WsclipError(f"{len(names)} prompt names (class_names) for a dataset with {len(classes)} classes")
    return names


@dataclass
class QATextTable:
    """Text features of every (image, class) pair, computed once.

    t_fg (P + K, D): rows 0..P-1 the corpus pairs, row P + k the label alone (pairs the
    corpus lacks, used with --missing skip). bg_feats (U, D): unique background texts;
    bg_index (P + K, L) into it, bg_mask (P + K, L) marking real entries.
    """

    rows: dict[tuple[str, int], int]
    t_fg: torch.Tensor
    bg_feats: torch.Tensor
    bg_index: torch.Tensor
    bg_mask: torch.Tensor
    num_pairs: int
    missing: str = "error"

    def to(self, device) -> "QATextTable":
        return QATextTable(self.rows, self.t_fg.to(device), self.bg_feats.to(device), self.bg_index.to(device),
                           self.bg_mask.to(device), self.num_pairs, self.missing)

    def lookup(self, ids: Sequence[str], pairs: torch.Tensor, classes: Sequence[str] | None = None) -> torch.Tensor:
        """Row per pair (M,) for pairs (M, 2) of (batch position, class index) and the batch's image ids."""
        out = []
        for b, k in pairs.tolist():
            row = self.rows.get((str(ids[b]), k))
            if row is None:
                if self.missing != "skip":
                    name = classes[k] if classes is not None else f"class {k}"
                    raise MissingPairError(
                        f"the QA corpus has no answers for image '{ids[b]}' and '{name}': rebuild it with "
                        "`wsclip qa-corpus` on this dataset, or pass --missing skip"
                    )
                row = self.num_pairs + k
            out.append(row)
        return torch.as_tensor(out, dtype=torch.long, device=self.t_fg.device)

    def gather(self, rows: torch.Tensor):
        """(t_fg (M, D), t_bg (M, L, D), bg_mask (M, L)) for rows (M,)."""
        return self.t_fg[rows], self.bg_feats[self.bg_index[rows]], self.bg_mask[rows]


def _encode(clip, texts: list[str], desc: str, chunk: int = 2048) -> torch.Tensor:
    from wsclip.progress import progress

    feats = []
    with progress(total=len(texts), desc=desc, unit="text") as bar:
        for s in range(0, len(texts), chunk):
            part = texts[s:s + chunk]
            feats.append(clip.encode_text(part).float())
            bar.update(len(part))
    if not feats:
        return torch.zeros(0, clip.embed_dim, device=clip.device)
    return torch.cat(feats)


def build_text_table(
    clip,
    entries: dict[tuple[str, int], QAEntry],
    names: Sequence[str],
    template: str = "a photo of {}.",
    label_weight: float = 0.5,
    max_bg: int = 10,
    missing: str = "error",
) -> QATextTable:
    """Encode the corpus texts once and assemble t_fg and the background tables (METHODS.md section 4)."""
    if missing not in ("error", "skip"):
        raise WsclipError(f"missing must be 'error' or 'skip', got '{missing}'")
    keys = sorted(entries)
    fg_sets = [fg_texts(entries[key].fg_answers, names[key[1]]) for key in keys]
    bg_sets = [bg_texts(entries[key].bg_answers, names[key[1]], max_bg) for key in keys]

    label_feats = _encode(clip, [template.format(n) for n in names], "label texts")
    fg_unique = list(dict.fromkeys(t for ts in fg_sets for t in ts))
    fg_feats = _encode(clip, [template.format(t) for t in fg_unique], "answer texts")
    bg_unique = list(dict.fromkeys(t for ts in bg_sets for t in ts))
    bg_feats = _encode(clip, [template.format(t) for t in bg_unique], "background texts")
    dev, dim = label_feats.device, label_feats.shape[1]

    # t_fg: w * label + (1 - w) * mean of the pair's answer texts (a sparse average over fg_feats)
    fg_pos = {t: n for n, t in enumerate(fg_unique)}
    rows_idx = [r for r, ts in enumerate(fg_sets) for _ in ts]
    cols_idx = [fg_pos[t] for ts in fg_sets for t in ts]
    counts = torch.tensor([max(1, len(ts)) for ts in fg_sets], dtype=torch.float32, device=dev)
    mean_ans = torch.zeros(len(keys), dim, device=dev)
    if rows_idx:
        mean_ans.index_add_(0, torch.as_tensor(rows_idx, device=dev), fg_feats[torch.as_tensor(cols_idx, device=dev)])
    mean_ans = mean_ans / counts[:, None]
    classes_of = torch.as_tensor([k for _, k in keys], dtype=torch.long, device=dev)
    has_ans = torch.tensor([len(ts) > 0 for ts in fg_sets], device=dev)[:, None]
    t_pairs = torch.where(has_ans, label_weight * label_feats[classes_of] + (1 - label_weight) * mean_ans,
                          label_feats[classes_of])
    t_fg = torch.cat([t_pairs, label_feats])  # + one label-only row per class

    width = max(1, max((len(ts) for ts in bg_sets), default=0))
    bg_pos = {t: n for n, t in enumerate(bg_unique)}
    rows = [[bg_pos[t] for t in ts] + [0] * (width - len(ts)) for ts in bg_sets] + [[0] * width] * len(names)
    bg_index = torch.tensor(rows, dtype=torch.long).view(-1, width)
    lens = torch.tensor([len(ts) for ts in bg_sets] + [0] * len(names), dtype=torch.long)
    bg_mask = torch.arange(width)[None, :] < lens[:, None]
    if bg_feats.shape[0] == 0:
        bg_feats = torch.zeros(1, dim, device=dev)
    return QATextTable({key: n for n, key in enumerate(keys)}, t_fg, bg_feats, bg_index.to(dev), bg_mask.to(dev),
                       len(keys), missing)


def corpus_entries(corpus: QACorpus, classes: Sequence[str], ids: Iterable[str] | None = None) -> dict:
    """The corpus's (image id, class index) entries, restricted to `ids` when given."""
    return corpus.resolve(classes, ids)


def check_coverage(dataset, entries: dict, missing: str = "error", limit: int = 5) -> int:
    """Count the dataset's positive pairs the corpus lacks; with missing='error' any gap is a MissingPairError."""
    if not hasattr(dataset, "label_vector"):
        return 0
    absent = []
    for i, image_id in enumerate(dataset.ids):
        for k in dataset.label_vector(i).nonzero().flatten().tolist():
            if (str(image_id), int(k)) not in entries:
                absent.append((image_id, dataset.classes[int(k)]))
    if absent and missing == "error":
        examples = ", ".join(f"{i}/{c}" for i, c in absent[:limit])
        raise MissingPairError(
            f"the QA corpus lacks {len(absent)} (image, class) pairs of the training data (e.g. {examples}): "
            "build it for this dataset with `wsclip qa-corpus`, or pass --missing skip to train those pairs "
            "on the area term only"
        )
    return len(absent)


class QaClimsObjective:
    """step_fn for the Trainer: FRC + BRC + area on one batch (batch needs "id" for the corpus lookup)."""

    def __init__(self, clip, table: QATextTable, cfg: QaClimsConfig, classes: Sequence[str] | None = None):
        self.clip, self.table, self.cfg, self.classes = clip, table, cfg, classes
        self.norm = mask_normalisation(clip, cfg.mask_norm)

    def __call__(self, model, batch):
        from wsclip.train.loop import world_size

        cfg = self.cfg
        cams, pairs, v, u = encode_masked_pairs(model, batch, self.clip, self.norm, cfg.kernel_backend)
        t_fg, t_bg, bg_mask = self.table.gather(self.table.lookup(batch["id"], pairs.cpu(), self.classes))
        sum_scale = world_size() * max(1, int(cfg.accum_steps))  # local sum -> share of the global-batch sum
        terms = {
            "frc": losses.frc(v, t_fg, t_bg, cfg.tau, bg_mask) * sum_scale,
            "brc": losses.brc(u, t_fg, t_bg, cfg.tau, bg_mask) * sum_scale,
            "reg": losses.area(cams),
        }
        loss = cfg.w1 * terms["frc"] + cfg.w2 * terms["brc"] + cfg.w3 * terms["reg"]
        return loss, terms


def train_qa_clims(cfg: QaClimsConfig, resume: bool = False, dataset=None, clip=None, corpus=None,
                   callbacks: Iterable = ()) -> Path:
    """Train a CAM network with the QA-CLIMS losses; returns the path of the final checkpoint.

    `dataset`, `clip` and `corpus` may be given pre-built; otherwise they come from
    cfg.data, cfg.clip and cfg.corpus.
    """
    from wsclip.train.baseline_cam import fit_cam_network, init_cam_network, open_train_dataset
    from wsclip.train.loop import init_distributed, resolve_device, seed_everything

    cfg.validate()
    if cfg.missing not in ("error", "skip"):
        raise WsclipError(f"--missing must be 'error' or 'skip', got '{cfg.missing}'")
    if corpus is None:
        if not cfg.corpus:
            raise WsclipError("no QA corpus given: pass --corpus FILE.json (from `wsclip qa-corpus`) or --corpus FG.npy BG.npy")
        corpus = load_corpus(list(cfg.corpus))
    init_distributed()
    device = resolve_device(cfg.device)
    ds = dataset if dataset is not None else open_train_dataset(cfg)
    classes = tuple(ds.classes)
    names = prompt_names(cfg, classes)
    entries = corpus_entries(corpus, classes, getattr(ds, "ids", None))
    check_coverage(ds, entries, cfg.missing)

    seed_everything(cfg.seed)
    net = init_cam_network(cfg, classes)

    if clip is None:
        clip = load_frozen_clip(cfg.clip, device, cfg.clip_precision)
    table = build_text_table(clip, entries, names, cfg.template, cfg.label_weight, cfg.max_bg_texts,
                             cfg.missing).to(device)
    objective = QaClimsObjective(clip, table, cfg, classes)

    return fit_cam_network(net, objective, ds, classes, cfg, "train qa-clims", resume, callbacks,
                           {"trained": "qa-clims", "clip": str(cfg.clip), "prompts": names,
                            "corpus": [str(c) for c in cfg.corpus]})
