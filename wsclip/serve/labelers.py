"""One uniform labeler over every method and backend, used by `wsclip label`, the server and Ray.

    cfg = LabelerConfig(model="camnet.safetensors")          # or cam.onnx, a TensorRT engine, seg.safetensors
    lab = load_labeler(cfg)
    results = lab.label_batch([rgb_uint8, ...], labels=[multi_hot_or_None, ...])
    results[0].mask                                            # uint8 (H, W): 0 bg, k + 1 class k, 255 ignore

Methods: "cam" (a CAM network: CLIMS, QA-CLIMS or baseline; PyTorch, ONNX Runtime or TensorRT),
"seg" (a segmentation network, same backends) and "clip-es" (training-free, when
`wsclip.label.clip_es` is installed). Refinements: "none", "crf" (dense CRF on the stacked
scores, run by `refine_result` in the caller's worker pool) and "irn" (random walk on an IRN
boundary map; CAM method, PyTorch).

Batch plan: `label_batch` groups images by exact size (first-appearance order) and splits each
group into runs of at most `batch_size` (`plan_batches`). Convolution kernels may give other
floating-point results for other batch compositions (oneDNN does at batch 1 vs 2), so callers
that must be reproducible (resume, Ray) hand it the same image lists; `wsclip label` does.

Missing image-level labels (an entry None) are predicted when the method needs them: from the
CAM network's class scores (sigmoid of the global-average-pooled maps, PyTorch backend) or by
CLIP zero-shot multi-label classification (softmax over "a photo of {class}." prompts, every
class at or above a threshold, at least the top one).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from wsclip.runtime import resolve_device
from wsclip.config import opt, parse_numbers
from wsclip.errors import ShapeError, WsclipError
from wsclip.formats import mask_annotations, rle_decode, rle_encode  # noqa: F401 - re-exported
from wsclip.label.pseudo import PseudoConfig, scores_to_mask, stack_scores
from wsclip.stages import stage

METHODS = ("auto", "cam", "seg", "clip-es")
REFINEMENTS = ("none", "crf", "irn")
PREDICTORS = ("auto", "cam", "clip", "none")
ZERO_SHOT_TEMPLATE = "a photo of {}."
CPU_BATCH_PIXELS = 320 * 320  # see Labeler._split_for_cpu
_READABLE = {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}


# ============================================================================ config and results
@dataclass
class LabelerConfig:
    """Everything needed to build a labeler (picklable: Ray actors and server workers rebuild from it)."""

    model: str | None = opt(None, "CAM or segmentation network: checkpoint (.safetensors), .onnx or TensorRT engine")
    method: str = opt("auto", "auto: from the model file; clip-es needs --clip", choices=METHODS)
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    batch_size: int = opt(8, "largest batch the network runs")
    refine: str = opt("none", "crf: dense CRF (extra [crf]); irn: random walk on an IRN boundary map (--irn)",
                      choices=REFINEMENTS)
    irn: str | None = opt(None, "IRN boundary checkpoint for --refine irn")
    predict: str = opt("auto", "how missing image-level labels are predicted: the CAM network's class scores or "
                       "CLIP zero-shot", choices=PREDICTORS)
    clip: str | None = opt(None, "CLIP file for --predict clip and --method clip-es")
    label_threshold: float | None = opt(None, "score threshold of predicted labels (0.5 cam, 0.25 clip)")
    bg_threshold: float | None = opt(None, "CAM background threshold (default the model's, 0.15)")
    scales: tuple[float, ...] = opt((1.0,), "comma-separated test scales (CAM/seg PyTorch backend)", parse=parse_numbers)
    flip: bool = opt(False, "add horizontal-flip views")
    amp: bool = opt(False, "bf16 autocast on CUDA (PyTorch backend)")
    backend: str = opt("auto", "PyTorch networks: auto (probed on the CPU), eager, channels-last, bf16, compile "
                       "(wsclip.label.backends); clip-es: auto, eager (fp32) or bf16")
    threads: int | None = opt(None, "CPU threads for PyTorch / ONNX Runtime")
    classes: str | None = opt(None, "[clip-es] class list: voc, coco or a file with one name per line (default voc)")
    compat: str = opt("wsclip", "official: every behaviour of the public code (docs/compat.md); default wsclip's",
                      choices=("wsclip", "official"))
    clip_act: str | None = opt(None, "CLIP activation when the file cannot tell (OpenAI weights: quick_gelu)",
                               choices=("quick_gelu", "gelu"))
    options: dict = opt({}, "clip-es: ClipEsConfig fields, alpha and precision (CLIP weights)", cli=False)

    def validate(self) -> "LabelerConfig":
        if self.batch_size < 1:
            raise WsclipError(f"batch size must be at least 1, got {self.batch_size}")
        return self

    def replace(self, **kw) -> "LabelerConfig":
        return replace(self, **kw)


@dataclass
class LabelResult:
    """One image's labeling.

    mask: uint8 (H, W). keys: int64 0-based classes the image is labelled with. cams: float32
    (len(keys), H, W) when asked. crf_scores / crf_values: the stacked scores a CRF refines and
    the mask value of each channel (set when refine="crf"). scores: (K,) class scores when the
    labels were predicted.
    """

    mask: np.ndarray
    keys: np.ndarray
    cams: np.ndarray | None = None
    crf_scores: np.ndarray | None = None
    crf_values: np.ndarray | None = None
    crf_params: object | None = None  # the CRFParams of the labeler (its --compat), used by refine_result
    scores: np.ndarray | None = None
    predicted: bool = False
    low: np.ndarray | None = None     # stride-4 CAMs (len(keys), ceil(H/4), ceil(W/4)) when asked (PyTorch CAM net)


def plan_batches(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Index lists of same-size images, groups in first-appearance order, each split into runs of <= batch_size."""
    if batch_size < 1:
        raise WsclipError(f"batch size must be at least 1, got {batch_size}")
    groups: dict[tuple[int, int], list[int]] = {}
    for i, hw in enumerate(sizes):
        groups.setdefault(tuple(int(s) for s in hw), []).append(i)
    return [idx[s:s + batch_size] for idx in groups.values() for s in range(0, len(idx), batch_size)]


def image_hw(im) -> tuple[int, int]:
    """(H, W) of an RGB uint8 image: numpy (H, W, 3) or torch (3, H, W)."""
    return (int(im.shape[-2]), int(im.shape[-1])) if isinstance(im, torch.Tensor) else (int(im.shape[0]), int(im.shape[1]))


def _check_images(images: Sequence) -> None:
    for im in images:
        ok = (isinstance(im, np.ndarray) and im.ndim == 3 and im.shape[2] == 3 and im.dtype == np.uint8) or (
            isinstance(im, torch.Tensor) and im.dim() == 3 and im.shape[0] == 3 and im.dtype == torch.uint8)
        if not ok:
            desc = f"{tuple(getattr(im, 'shape', ()))} {getattr(im, 'dtype', type(im).__name__)}"
            raise ShapeError(f"images must be RGB uint8 arrays (H, W, 3) or tensors (3, H, W), got {desc}")
        if min(image_hw(im)) < 1:
            raise ShapeError(f"empty image of shape {tuple(im.shape)}")


def _stack(images: Sequence, device) -> torch.Tensor:
    """uint8 (B, 3, H, W) on `device` from same-size HWC arrays or CHW tensors (e.g. decoded on the GPU)."""
    if any(isinstance(im, torch.Tensor) for im in images):  # mixed: GPU-decoded tensors and host arrays
        return torch.stack([(im if isinstance(im, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(im))
                             .permute(2, 0, 1)).to(device) for im in images]).contiguous()
    x = torch.from_numpy(np.ascontiguousarray(np.stack(images))).permute(0, 3, 1, 2)
    return x.to(device, non_blocking=True).contiguous()


def host_image(im) -> np.ndarray:
    """RGB uint8 (H, W, 3) numpy copy of an image given as numpy HWC or torch CHW."""
    if isinstance(im, torch.Tensor):
        return im.permute(1, 2, 0).contiguous().cpu().numpy()
    return im


# ============================================================================ label prediction
class ClipZeroShot:
    """CLIP zero-shot multi-label prediction: softmax over class prompts, every class >= threshold (at least one)."""

    def __init__(self, clip, classes: Sequence[str], device="cpu", threshold: float = 0.25,
                 template: str = ZERO_SHOT_TEMPLATE):
        from wsclip.models.clip import ClipModel, load_clip

        self.clip = clip if isinstance(clip, ClipModel) else load_clip(clip, device=device)
        self.classes = tuple(classes)
        self.threshold = float(threshold)
        names = [_READABLE.get(c, c) for c in self.classes]
        self.text = self.clip.encode_text([template.format(n) for n in names])  # (K, D), cached

    @torch.no_grad()
    def scores(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(B, K) class probabilities."""
        if not images:
            return np.zeros((0, len(self.classes)), np.float32)
        x = torch.cat([self.clip.preprocess_tensor(im) for im in images])  # HWC accepted; resized per image
        feats = self.clip.encode_image(x)
        return torch.softmax(100.0 * feats @ self.text.T, dim=-1).float().cpu().numpy()

    def predict(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(multi-hot (B, K) float32, scores (B, K))."""
        s = self.scores(images)
        y = (s >= self.threshold).astype(np.float32)
        if len(s):
            y[np.arange(len(s)), s.argmax(1)] = 1.0
        return y, s


# ============================================================================ base
class Labeler:
    """What `wsclip label`, the server and the Ray job call; subclasses implement `_run_group`."""

    method = "base"
    needs_labels = True       # the method labels only the classes it is told (or predicts) are present

    def __init__(self, cfg: LabelerConfig, classes: Sequence[str], device: torch.device, backend: str):
        self.cfg = cfg
        self.classes = tuple(classes)
        self.device = device
        self.backend = backend
        self.batch_size = int(cfg.batch_size)
        if self.batch_size < 1:
            raise WsclipError(f"batch size must be at least 1, got {cfg.batch_size}")
        if cfg.refine not in REFINEMENTS:
            raise WsclipError(f"unknown refinement '{cfg.refine}': use one of {', '.join(REFINEMENTS)}")
        self.refine = cfg.refine
        self.predictor = None
        from wsclip.compat import resolve
        from wsclip.refine.crf import CRFParams

        self.crf_params = resolve(CRFParams(), cfg.compat)  # the --compat official CRF image (BGR, uint8 wrap)
        self.variant: str | None = None  # PyTorch modules: the backend variant once resolved
        self.torch_threads = torch.get_num_threads()  # the caller's, for a PyTorch module (see `_threads`)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> dict:
        """Short description for logs, /health and summaries."""
        return {"method": self.method, "backend": self.backend, "device": str(self.device),
                "classes": len(self.classes), "refine": self.refine, "batch_size": self.batch_size,
                "variant": self.variant,
                "predict": {_OwnScores: "cam-scores", ClipZeroShot: "clip-zero-shot"}.get(type(self.predictor), "none")}

    def label_batch(self, images: Sequence[np.ndarray], labels: Sequence | None = None,
                    want_cams: bool = False, on_result=None) -> list[LabelResult]:
        """Label RGB uint8 (H, W, 3) images; `labels[i]` a (K,) 0/1 vector or None (predicted when needed).

        `on_result(i, result)` is called as soon as image i's batch is done (so a caller can write its
        files while the next batch runs); the results are returned as well."""
        with stage("preprocess"):  # input checks and the batch plan
            images = list(images)
            _check_images(images)
            labels = [None] * len(images) if labels is None else list(labels)
            if len(labels) != len(images):
                raise ShapeError(f"{len(labels)} label vectors for {len(images)} images")
            labels = [self._check_labels(y) for y in labels]
            plan = [run for idx in plan_batches([image_hw(im) for im in images], self.batch_size)
                    for run in self._split_for_cpu(idx, image_hw(images[idx[0]]))]
        out: list[LabelResult | None] = [None] * len(images)
        with self._threads():
            for idx in plan:
                for i, r in zip(idx, self._run_group([images[i] for i in idx], [labels[i] for i in idx], want_cams)):
                    out[i] = r
                    if on_result is not None:
                        on_result(i, r)
        return out  # type: ignore[return-value]

    def _split_for_cpu(self, idx: list[int], hw: tuple[int, int]) -> list[list[int]]:
        """On the CPU, a PyTorch network runs at most CPU_BATCH_PIXELS pixels per call: at VOC sizes one
        image already fills the cores, and a larger batch only adds cache misses (ResNet-50 at 513 px,
        measured: 9% more CPU time per image at batch 4 than at batch 1); small images still batch."""
        if self.device.type != "cpu" or getattr(self, "runner", None) is not None or \
                getattr(self, "module", None) is None:
            return [idx]
        step = max(1, CPU_BATCH_PIXELS // max(1, hw[0] * hw[1]))
        return [idx[s:s + step] for s in range(0, len(idx), step)]

    def _threads(self):
        """One torch thread around an exported network on the CPU (its runtime has its own pool); a PyTorch
        module run beside it (class-score prediction) gets the caller's threads back (`torch_threads`)."""
        import contextlib

        from wsclip.label.backends import torch_threads

        self.torch_threads = torch.get_num_threads()
        exported = getattr(self, "runner", None) is not None and self.device.type == "cpu"
        return torch_threads(1) if exported else contextlib.nullcontext()

    def warmup(self, hw: tuple[int, int] = (64, 64)) -> None:
        """One run on a blank image so the first request pays no lazy initialisation."""
        y = np.zeros(self.num_classes, np.float32)
        y[:1] = 1
        self.label_batch([np.zeros((*hw, 3), np.uint8)], [y if self.needs_labels else None])

    # ------------------------------------------------------------------ helpers
    def _check_labels(self, y):
        if y is None:
            return None
        y = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y, dtype=np.float32).reshape(-1)
        if y.shape != (self.num_classes,):
            raise ShapeError(f"a label vector must have {self.num_classes} entries (one per class), got {y.shape[0]}")
        return (y > 0.5).astype(np.float32)

    def _fill_labels(self, images, labels, own_scores=None) -> tuple[np.ndarray, list[np.ndarray | None]]:
        """(B, K) labels with missing rows predicted; also the per-image predicted scores (or None)."""
        y = np.zeros((len(images), self.num_classes), np.float32)
        scores: list[np.ndarray | None] = [None] * len(images)
        missing = [i for i, lab in enumerate(labels) if lab is None]
        for i, lab in enumerate(labels):
            if lab is not None:
                y[i] = lab
        if not missing or not self.needs_labels:
            return y, scores
        if own_scores is not None and isinstance(self.predictor, _OwnScores):
            s = own_scores[missing]
            pred = (s >= self.predictor.threshold).astype(np.float32)
            pred[np.arange(len(missing)), s.argmax(1)] = 1.0
        elif isinstance(self.predictor, ClipZeroShot):
            pred, s = self.predictor.predict([images[i] for i in missing])
        else:
            raise WsclipError(
                f"the {self.method} method needs image-level labels and none were given for some images: pass a "
                "labels file (--labels), or predict them (--predict cam with a PyTorch CAM checkpoint, or "
                "--predict clip --clip CLIP_FILE)"
            )
        for j, i in enumerate(missing):
            y[i] = pred[j]
            scores[i] = s[j].astype(np.float32)
        return y, scores

    def _run_group(self, images, labels, want_cams) -> list[LabelResult]:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class _OwnScores:
    """Marker: predict labels from the network's own class scores."""

    threshold: float = 0.5


# ============================================================================ CLIP-ES
class ClipEsLabeler(Labeler):
    """Training-free CLIP-ES (`wsclip.label.clip_es.ClipEs`: GradCAM on a CLIP ViT + CAA).

    Pseudo mask as `wsclip pseudo` makes it (wsclip.label.pseudo): background score
    (1 - max_c F_c)^alpha (alpha = options["alpha"], default 1) before the class maps, argmax. Images run one same-size
    group at a time (GradCAM needs gradients, so no inference mode).
    """

    method = "clip-es"

    def __init__(self, cfg: LabelerConfig):
        from wsclip.data.base import resolve_classes
        from wsclip.label.clip_es import ClipEs, ClipEsConfig
        from wsclip.models.clip import load_clip

        if not cfg.clip:
            raise WsclipError("--method clip-es needs --clip CLIP_FILE (a ViT CLIP, e.g. ViT-B-16)")
        if cfg.refine == "irn":
            raise WsclipError("--refine irn applies to CAM networks; CLIP-ES refines with CAA (built in) and --refine crf")
        device = resolve_device(cfg.device)
        opts = dict(cfg.options)
        self.pseudo = PseudoConfig(alpha=float(opts.pop("alpha", 1.0)))
        classes = resolve_classes(cfg.classes or "voc")
        clip = load_clip(cfg.clip, device=device, precision=opts.pop("precision", "fp32"), act=cfg.clip_act,
                         compat=cfg.compat)
        compute = {"auto": None, "eager": "fp32", "bf16": "bf16"}.get(cfg.backend, "unknown")
        if compute == "unknown":
            raise WsclipError(f"--backend {cfg.backend} does not apply to clip-es (GradCAM needs PyTorch autograd): "
                              "use auto, eager (fp32) or bf16")
        if opts.get("compute") is None:
            opts["compute"] = compute
        try:
            self.impl = ClipEs(clip, classes, ClipEsConfig(**{"compat": cfg.compat, **opts}))
        except TypeError as exc:
            raise WsclipError(f"unknown CLIP-ES option: {exc}") from None
        super().__init__(cfg, classes, device, "pytorch")
        self.predictor = _make_predictor(cfg, self, own_scores=False, clip=clip)

    def _run_group(self, images, labels, want_cams):
        with stage("preprocess"):
            y, scores = self._fill_labels(images, labels)  # a zero-shot label prediction counts here
            keys = [np.nonzero(y[i] > 0.5)[0].astype(np.int64) for i in range(len(images))]
            images = [host_image(im) for im in images]
        items = self.impl.label(images, [k.tolist() for k in keys])
        self.variant = self.impl.compute
        with stage("d2h", self.device):
            highs = [item["high_res"].float().cpu().numpy() for item in items]  # (K', H, W) each
        with stage("postprocess"):
            return self._clip_es_results(highs, keys, scores, want_cams)

    def _clip_es_results(self, highs, keys, scores, want_cams) -> list[LabelResult]:
        out = []
        for i, high in enumerate(highs):
            stacked = stack_scores(high, self.pseudo)
            mask = scores_to_mask(stacked, keys[i])
            r = LabelResult(mask=mask, keys=keys[i], scores=scores[i], predicted=scores[i] is not None)
            if want_cams:
                r.cams = high
            if self.refine == "crf":
                r.crf_scores = stacked
                r.crf_params = self.crf_params
                r.crf_values = np.concatenate([[0], keys[i] + 1]).astype(np.uint8)
            out.append(r)
        return out


# ============================================================================ factory
def _make_predictor(cfg: LabelerConfig, lab: Labeler, own_scores: bool, clip=None):
    mode = cfg.predict
    if mode not in PREDICTORS:
        raise WsclipError(f"unknown label predictor '{mode}': use one of {', '.join(PREDICTORS)}")
    if mode == "auto":
        mode = "clip" if cfg.clip and not own_scores else ("cam" if own_scores else ("clip" if cfg.clip else "none"))
    if mode == "none":
        return None
    if mode == "cam":
        if not own_scores:
            raise WsclipError(f"--predict cam needs a PyTorch CAM network checkpoint; this {lab.method} labeler "
                              f"({lab.backend}) has no class scores: use --predict clip --clip CLIP_FILE")
        return _OwnScores(0.5 if cfg.label_threshold is None else float(cfg.label_threshold))
    if not cfg.clip:
        raise WsclipError("--predict clip needs --clip CLIP_FILE (an open_clip or OpenAI CLIP checkpoint)")
    thr = 0.25 if cfg.label_threshold is None else float(cfg.label_threshold)
    return ClipZeroShot(clip if clip is not None else cfg.clip, lab.classes, device=lab.device, threshold=thr)


def detect_method(model) -> str:
    """'cam' or 'seg' from a checkpoint's sidecar kind or an exported model's sidecar (`wsclip.registry`)."""
    from wsclip.registry import labeler_kind

    return labeler_kind(model).method


def load_labeler(cfg: LabelerConfig | None = None, **kw) -> Labeler:
    """Build the labeler a config describes (keywords override or replace the config's fields)."""
    cfg = (cfg or LabelerConfig()).replace(**kw) if kw else (cfg or LabelerConfig())
    if cfg.method not in METHODS:
        raise WsclipError(f"unknown method '{cfg.method}': use one of {', '.join(METHODS)}")
    method = cfg.method
    if method == "auto":
        if cfg.model is None:
            method = "clip-es" if cfg.clip else None
            if method is None:
                raise WsclipError("give a model (--model CAM/seg checkpoint, .onnx or engine) or --method clip-es --clip FILE")
        else:
            method = detect_method(cfg.model)
    if method in ("cam", "seg") and not cfg.model:
        raise WsclipError(f"--method {method} needs --model (a checkpoint, .onnx file or TensorRT engine)")
    if cfg.threads and cfg.device in ("auto", "cpu"):
        torch.set_num_threads(int(cfg.threads))
    from wsclip.serve.net_labelers import CamNetLabeler, SegNetLabeler

    cls = {"cam": CamNetLabeler, "seg": SegNetLabeler, "clip-es": ClipEsLabeler}[method]
    return cls(cfg)


# ============================================================================ refinement (worker pools)
def refine_result(image: np.ndarray, result: LabelResult, crf_params=None) -> LabelResult:
    """Apply the dense CRF to a result that carries `crf_scores` (no-op otherwise); picklable for process pools."""
    if result.crf_scores is None:
        return result
    from wsclip.refine.crf import CRFParams, dense_crf

    if result.crf_scores.shape[0] <= 1:  # background only: nothing to refine
        result.crf_scores = None
        return result
    q = dense_crf(image, result.crf_scores, crf_params or result.crf_params or CRFParams())
    result.mask = result.crf_values[q.argmax(0)].astype(np.uint8)
    result.crf_scores = None
    return result


__all__ = [
    "METHODS", "REFINEMENTS", "PREDICTORS", "LabelerConfig", "LabelResult", "Labeler", "ClipEsLabeler", "ClipZeroShot", "plan_batches", "load_labeler", "detect_method",
    "refine_result", "rle_encode", "rle_decode", "mask_annotations", "image_hw", "host_image",
]
