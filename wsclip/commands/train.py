"""`wsclip train *`, `wsclip synth`, `wsclip qa-corpus`: flags and calls (training configs come from wsclip.config)."""

from __future__ import annotations

import json
from pathlib import Path

from wsclip.commands import group as _group


# ============================================================================ synth
def _add_synth(sub):
    p = sub.add_parser("synth", help="write the synthetic world (procedural multi-label scenes) as a VOC-layout folder")
    p.add_argument("--out", required=True, type=Path, help="output folder (re-running resumes)")
    p.add_argument("--train", type=int, default=2000, help="number of train images")
    p.add_argument("--val", type=int, default=200, help="number of val images")
    p.add_argument("--seed", type=int, default=0, help="world seed: the same seed writes the same scenes (default 0)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128, the demo's world)")
    p.add_argument("--format", choices=("jpg", "png"), default="jpg", help="image files: JPEG quality 95 or lossless PNG")
    p.set_defaults(func=_run_synth)


def _run_synth(args):
    from wsclip.data.synth import write_voc_layout

    out = write_voc_layout(args.out, args.train, args.val, seed=args.seed, size=args.size, image_format=args.format)
    print(f"wrote {args.train} train + {args.val} val synth images to {out}")


# ============================================================================ train tiny-clip
def _add_train_tiny_clip(sub):
    g = _group(sub, "train", "train a model (see `wsclip train <what> --help`)")
    p = g.add_parser("tiny-clip", help="train a tiny open_clip CLIP on the synthetic world (CPU, minutes)")
    p.add_argument("--out", required=True, type=Path, help="output .safetensors (a .json sidecar is written beside it)")
    p.add_argument("--steps", type=int, help="optimisation steps (default 400; 150 with --quick)")
    p.add_argument("--batch-size", type=int, help="scenes per step, 4 views each (default 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, cosine after warm-up; default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the world, the model init and the data order (default 0)")
    p.add_argument("--arch", choices=("vit", "rn"), default="vit",
                   help="vit: ViT image tower (CLIP-ES needs it); rn: ResNet tower, learns objects faster (CLIMS)")
    p.add_argument("--quick", action="store_true", help="a short, lower-quality run")
    p.add_argument("--eval-n", type=int, default=200, help="val scenes for the zero-shot report (0: skip)")
    p.add_argument("--no-resume", action="store_true", help="ignore a saved partial training state")
    p.set_defaults(func=_run_train_tiny_clip)


def _run_train_tiny_clip(args):
    from wsclip.train.tiny_clip import TinyClipConfig, train_tiny_clip

    kw = dict(seed=args.seed, lr=args.lr, arch=args.arch)
    cfg = TinyClipConfig.quick(**kw) if args.quick else TinyClipConfig(**kw)
    if args.steps is not None:
        cfg.steps = args.steps
    if args.batch_size is not None:
        cfg.batch_size = args.batch_size
    summary = train_tiny_clip(args.out, cfg, resume=not args.no_resume, eval_n=args.eval_n)
    print(json.dumps(summary, indent=2))
    print(f"saved {args.out}")


# ============================================================================ train cam / clims / qa-clims / irn / seg
#: `wsclip train <what>`: (config class, trainer, help, fields without a flag); flags come from the config's fields
TRAINERS = {
    "cam": ("wsclip.config:CamConfig", "wsclip.train.baseline_cam:train_cam",
            "baseline CAM network: GAP + multilabel soft-margin, frozen BN (CLIMS starts from it)", ()),
    "clims": ("wsclip.config:ClimsConfig", "wsclip.train.clims:train_clims",
              "CLIMS: train the CAM network against a frozen CLIP (OTM, BTM, CBS, REG); multi-GPU with torchrun", ()),
    "qa-clims": ("wsclip.config:QaClimsConfig", "wsclip.train.qa_clims:train_qa_clims",
                 "QA-CLIMS: train the CAM network against a frozen CLIP with VQA-answer texts (FRC, BRC, REG); "
                 "needs a corpus from `wsclip qa-corpus`", ()),
    "irn": ("wsclip.config:IrnConfig", "wsclip.train.irn:train_irn",
            "IRN boundary network from CAM seeds (frozen backbone); its boundary map drives the random-walk "
            "refinement", ("head_lr_mult", "sync_bn")),
    "seg": ("wsclip.train.seg:SegConfig", "wsclip.train.seg:train_seg",
            "DeepLab segmentation network on pseudo masks (255 ignored); multi-GPU with torchrun", ("resize_long",)),
}


def _ref(spec: str):
    import importlib

    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def _rank0() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _add_trainer(sub, what: str):
    from wsclip.config import add_config_args

    cls, _, help, skip = TRAINERS[what]
    g = _group(sub, "train", "train a model (see `wsclip train <what> --help`)")
    p = g.add_parser(what, help=help)
    add_config_args(p, _ref(cls), skip=skip)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.set_defaults(func=_run_trainer, trainer=what)


def _run_trainer(args):
    import logging

    from wsclip.config import config_from_args
    from wsclip.train.loop import shutdown_distributed

    cls, fn, _, _ = TRAINERS[args.trainer]
    if args.trainer == "irn":
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = config_from_args(_ref(cls), args)
    try:
        path = _ref(fn)(cfg, resume=args.resume)
    finally:
        shutdown_distributed()
    if _rank0():
        print(f"saved {path}")


def _add_train_cam(sub):
    _add_trainer(sub, "cam")


def _add_train_clims(sub):
    _add_trainer(sub, "clims")


def _add_train_qa_clims(sub):
    _add_trainer(sub, "qa-clims")


def _add_train_irn(sub):
    _add_trainer(sub, "irn")


def _add_train_seg(sub):
    _add_trainer(sub, "seg")


# ============================================================================ qa-corpus
def _add_qa_corpus(sub):
    p = sub.add_parser("qa-corpus", help="ask a local BLIP VQA model the QA-CLIMS questions about every "
                                         "(image, class) and write the corpus JSON (resumes; extra [vqa])")
    p.add_argument("--data", required=True, help="dataset: a path or voc:/coco:/folder:/synth: spec")
    p.add_argument("--split", default="train_aug", help="split (default train_aug)")
    p.add_argument("--model", required=True, help="folder of a Hugging Face BLIP VQA model (save_pretrained layout)")
    p.add_argument("--out", required=True, type=Path, help="corpus JSON to write (re-running resumes it)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--images-per-batch", type=int, default=4, help="images whose questions are answered together")
    p.add_argument("--num-beams", type=int, default=3, help="beam search width (BLIP VQA: 3)")
    p.add_argument("--max-new-tokens", type=int, default=10, help="longest answer in tokens")
    p.add_argument("--save-every", type=int, default=50, help="rewrite the output every N images")
    p.add_argument("--limit", type=int, help="only the first N images of the split")
    p.set_defaults(func=_run_qa_corpus)


def _run_qa_corpus(args):
    from wsclip.data import open_dataset
    from wsclip.runtime import resolve_device
    from wsclip.train.qa_corpus import build_corpus

    kw = {} if str(args.data).startswith("synth:") else {"masks": False}
    ds = open_dataset(args.data, split=args.split, **kw)
    corpus = build_corpus(ds, args.model, args.out, device=str(resolve_device(args.device)),
                          images_per_batch=args.images_per_batch, num_beams=args.num_beams,
                          max_new_tokens=args.max_new_tokens, save_every=args.save_every, limit=args.limit)
    print(f"wrote {len(corpus)} (image, class) entries for {len(corpus.images)} images to {args.out}")
