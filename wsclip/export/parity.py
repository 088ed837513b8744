"""`wsclip export check`: run PyTorch and an exported artefact on the same inputs and compare.

Inputs: random batches (a batch size other than the traced one; odd sizes where H and W are
dynamic) and, when given, a folder of real images (each at its own size where the model
allows, else resized). For every float output the report gives the max absolute error and
the max relative error (max |a - b| divided by max |b| of the reference, so near-zero
entries do not blow it up); for integer outputs (label masks) the fraction of equal pixels.
An argmax is discontinuous: a pixel whose two best scores differ by less than the accepted
error (2 * tolerance * max score) can flip under any rounding, so such near-ties are counted
apart, and the mask agreement that is checked is the one over all pixels minus the flipped
near-ties. The check passes when every relative error is <= `tolerance` and every such mask
agreement is >= `min_agreement` (default 1.0: every decisive pixel agrees).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from wsclip.errors import WsclipError


@dataclass
class CaseResult:
    """One compared input batch."""

    name: str
    batch: int
    size: str
    errors: dict[str, dict]  # output -> {"max_abs", "max_rel"} or {"agreement", "mismatched"}


@dataclass
class ParityReport:
    artefact: str
    model: str
    backend: str
    precision: str
    tolerance: float
    min_agreement: float
    cases: list[CaseResult] = field(default_factory=list)

    @property
    def worst(self) -> dict[str, dict]:
        """Per output: the largest errors / lowest agreement over all cases (agreement pooled by pixels)."""
        out: dict[str, dict] = {}
        for case in self.cases:
            for name, e in case.errors.items():
                w = out.setdefault(name, {})
                if "agreement" in e:
                    for key in ("mismatched", "total", "decisive_mismatched"):
                        if key in e:
                            w[key] = w.get(key, 0) + e[key]
                    w["agreement"] = 1.0 - w["mismatched"] / max(w["total"], 1)
                    if "decisive_mismatched" in w:
                        w["decisive_agreement"] = 1.0 - w["decisive_mismatched"] / max(w["total"], 1)
                else:
                    w["max_abs"] = max(w.get("max_abs", 0.0), e["max_abs"])
                    w["max_rel"] = max(w.get("max_rel", 0.0), e["max_rel"])
        return out

    @property
    def passed(self) -> bool:
        if not self.cases:
            return False
        for e in self.worst.values():
            if "agreement" in e and e.get("decisive_agreement", e["agreement"]) < self.min_agreement:
                return False
            if "max_rel" in e and not e["max_rel"] <= self.tolerance:  # NaN fails too
                return False
        return True

    def to_dict(self) -> dict:
        return {**asdict(self), "worst": self.worst, "passed": self.passed}

    def summary(self) -> str:
        lines = [f"{self.artefact} ({self.model}, {self.backend}, {self.precision}) vs PyTorch"]
        for case in self.cases:
            parts = []
            for name, e in case.errors.items():
                if "agreement" in e:
                    parts.append(f"{name} agreement {_agreement(e)}")
                else:
                    parts.append(f"{name} max abs {e['max_abs']:.2e} rel {e['max_rel']:.2e}")
            lines.append(f"  {case.name:<32} batch {case.batch:<3} {case.size:<10} " + ", ".join(parts))
        verdict = []
        for name, e in self.worst.items():
            if "agreement" in e:
                verdict.append(f"{name} agreement {_agreement(e)} (min {100 * self.min_agreement:g}%)")
            else:
                verdict.append(f"{name} max rel {e['max_rel']:.2e} (tolerance {self.tolerance:g})")
        lines.append(("PASS: " if self.passed else "FAIL: ") + ", ".join(verdict))
        return "\n".join(lines)


def _agreement(e: dict) -> str:
    """'100.0000% apart from near-ties (99.99997% of all 3731001; 1 differs, a near-tie)' or a plain percentage."""
    if "decisive_agreement" not in e:
        return f"{100 * e['agreement']:.4f}%"
    text = f"{100 * e['decisive_agreement']:.4f}% apart from near-ties"
    if e["mismatched"]:
        near = e["mismatched"] - e["decisive_mismatched"]
        text += (f" ({100 * e['agreement']:.5f}% of all {e['total']}; {e['mismatched']} differ, "
                 f"{near} of them near-ties)")
    return text


def compare_outputs(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], tolerance: float = 0.0,
                    scores=None) -> dict[str, dict]:
    """Errors of `got` against `ref`, output by output (see the module docstring).

    For integer outputs (argmax masks) `scores` gives the reference values the argmax was
    taken over: an array (B, C, ...) or a function of the mismatched pixels' indices
    returning (M, C). A mismatched pixel whose top two scores are closer than
    2 * tolerance * max|scores| is a near-tie that any rounding can flip: "decisive_agreement"
    counts only the other mismatches (over all pixels).
    """
    out = {}
    for name, r in ref.items():
        g = np.asarray(got[name])
        if g.shape != r.shape:
            raise WsclipError(f"output '{name}' has shape {g.shape} from the artefact and {r.shape} from PyTorch")
        if np.issubdtype(r.dtype, np.integer):
            where = np.nonzero(g != r)
            mism = int(where[0].size)
            e = {"agreement": 1.0 - mism / max(r.size, 1), "mismatched": mism, "total": int(r.size)}
            if scores is not None:
                at = _scores_at(scores, where)
                top2 = -np.partition(-at, 1, axis=1)[:, :2] if mism else np.zeros((0, 2), np.float32)
                scale = _score_scale(scores)
                e["decisive_mismatched"] = int(np.count_nonzero(top2[:, 0] - top2[:, 1] > 2 * tolerance * scale))
                e["decisive_agreement"] = 1.0 - e["decisive_mismatched"] / max(r.size, 1)
            out[name] = e
        else:
            r32, g32 = r.astype(np.float32, copy=False), g.astype(np.float32, copy=False)
            max_abs = float(np.max(np.abs(g32 - r32))) if r.size else 0.0
            scale = float(np.max(np.abs(r32))) if r.size else 0.0
            out[name] = {"max_abs": max_abs, "max_rel": max_abs / max(scale, 1e-12)}
    return out


def _scores_at(scores, where) -> np.ndarray:
    """(M, C) decision scores at the pixels `where` = (batch, *spatial) index arrays."""
    if callable(scores):
        return np.asarray(scores(where))
    return np.moveaxis(scores, 1, -1)[where]


def _score_scale(scores) -> float:
    return float(getattr(scores, "scale", None) or np.max(np.abs(scores)))


class _CamScores:
    """[bg threshold, cams] at given pixels, without materialising the (B, K+1, H, W) stack."""

    def __init__(self, cams: np.ndarray, bg: float):
        self.cams, self.bg = cams, float(bg)
        self.scale = max(float(cams.max()) if cams.size else 0.0, self.bg)

    def __call__(self, where) -> np.ndarray:
        at = np.moveaxis(self.cams, 1, -1)[where]
        return np.concatenate([np.full((at.shape[0], 1), self.bg, at.dtype), at], axis=1)


def decision_scores(meta: dict, ref: dict[str, np.ndarray]):
    """What a labeler's mask is the argmax of: [bg threshold, cams] (camnet) or probs (seg); None otherwise."""
    if meta["model"] == "camnet" and "cams" in ref:
        return _CamScores(ref["cams"], (meta.get("config") or {}).get("bg_threshold", 0.15))
    if meta["model"] == "seg" and "probs" in ref:
        return ref["probs"]
    return None


def open_artefact(path, device="cpu", **kw):
    """The runner for an .onnx file (ONNX Runtime) or a TensorRT engine."""
    from wsclip.export.tensorrt import ENGINE_SUFFIXES

    path = Path(path)
    if path.suffix in ENGINE_SUFFIXES:
        from wsclip.export.tensorrt import TrtRunner

        dev = torch.device(device)
        return TrtRunner(path, device=dev.index or 0, **kw)
    if path.suffix == ".onnx":
        from wsclip.export.ort import OrtRunner

        return OrtRunner(path, device=device, **kw)
    raise WsclipError(f"{path} is neither an .onnx file nor a TensorRT engine ({', '.join(ENGINE_SUFFIXES)})")


def open_labeler(path, device="cpu", **kw):
    """Any labeler backend behind `run(images, labels=None)`: an .onnx file, a TensorRT engine, or a
    CAM / segmentation checkpoint (PyTorch CamLabeler / SegLabeler; `kw` are their options)."""
    from wsclip.registry import is_export, labeler_kind

    if is_export(path):
        return open_artefact(path, device=device, **kw)
    return labeler_kind(path).predictor_module(path, device=device, **kw)


def _profile_of(meta: dict):
    """(min, opt, max) shapes of the first input for a TensorRT engine's optimisation profile, else None."""
    profile = meta.get("profile") or {}
    return profile.get(meta["inputs"][0]["name"])


def _random_batch(meta: dict, i: int) -> int:
    """Case i's batch size: other than the traced (or profile-optimal) one, inside an engine's profile."""
    prof = _profile_of(meta)
    if prof is None:
        return int((meta.get("traced") or {}).get("batch") or 1) + 1 + i
    (lo, opt, hi) = (int(s[0]) for s in prof)
    for b in (opt + 1 + i, opt - 1 - i, hi, lo):
        if lo <= b <= hi:
            return b
    return opt


def _random_side(rng, meta: dict, axis: int) -> int:
    """An odd height/width (not a multiple of the stride): 33..129, or inside an engine's profile."""
    prof = _profile_of(meta)
    if prof is None:
        return int(rng.integers(33, 130)) | 1
    lo, hi = int(prof[0][axis]), int(prof[2][axis])
    side = int(rng.integers(lo, hi + 1)) | 1
    return side if side <= hi else hi


def _random_cases(meta: dict, n: int, seed: int):
    """(name, x, labels) random batches with a batch size other than the traced one (inside an engine's profile)."""
    rng = np.random.default_rng(seed)
    spec = meta["inputs"][0]
    for i in range(n):
        b = _random_batch(meta, i)
        dims = []
        for axis, d in enumerate(spec["shape"]):
            if d == "batch":
                dims.append(b)
            elif d in ("height", "width"):
                dims.append(_random_side(rng, meta, axis))
            else:
                dims.append(int(d))
        if spec["dtype"] == "uint8":
            x = rng.integers(0, 256, dims, dtype=np.uint8)
        elif spec["dtype"] == "int32":
            x = _random_tokens(rng, dims)
        else:
            x = rng.random(dims, dtype=np.float32)
        labels = None
        if any(s["name"] == "labels" for s in meta["inputs"]):
            k = len(meta.get("classes") or []) or int(meta["inputs"][1]["shape"][1])
            labels = (rng.random((b, k)) < 0.3).astype(np.float32)
            labels[np.arange(b), rng.integers(0, k, b)] = 1.0  # at least one class per image
        size = f"{dims[2]}x{dims[3]}" if len(dims) == 4 else f"L={dims[1]}"
        yield f"random #{i + 1}", x, labels, size


def _random_tokens(rng, dims) -> np.ndarray:
    """Token rows like a tokenizer's: start token, random words, end token (the largest id), zero padding."""
    b, length = dims
    out = np.zeros((b, length), np.int32)
    for row in range(b):
        n = int(rng.integers(1, length - 1))
        out[row, 0] = 49406
        out[row, 1:n] = rng.integers(1, 49405, n - 1)
        out[row, n] = 49407
    return out


def _real_cases(meta: dict, images, batch: int, limit: int | None):
    """Batches of real images, grouped by size; image-level labels select classes where the folder has them."""
    from wsclip.data.transforms import resize_image

    spec = meta["inputs"][0]
    if spec["name"] != "images":
        raise WsclipError(f"--images does not apply to the '{meta['model']}' model (its input is {spec['name']})")
    fixed = None if isinstance(spec["shape"][2], str) else (int(spec["shape"][2]), int(spec["shape"][3]))
    prof = _profile_of(meta)
    with_labels = any(s["name"] == "labels" for s in meta["inputs"])
    items = list(_read_images(images, meta.get("classes") if with_labels else None, limit))
    groups: dict[tuple, list] = {}
    for img, labels in items:
        if fixed is not None:
            img = resize_image(img, fixed)
        elif prof is not None:  # an engine: scale into its profile's height/width range, keeping the aspect
            img = resize_image(img, _fit_into(img.shape[:2], prof[0][2:], prof[2][2:]))
        groups.setdefault(img.shape[:2], []).append((img.transpose(2, 0, 1), labels))
    name = f"real ({len(items)} images{', their labels' if any(lb is not None for _, lb in items) else ''})"
    for hw, group in groups.items():
        for start in range(0, len(group), batch):
            chunk = group[start:start + batch]
            labels = None
            if all(lb is not None for _, lb in chunk):
                labels = np.stack([lb for _, lb in chunk]).astype(np.float32)
            yield name, np.stack([im for im, _ in chunk]), labels, f"{hw[0]}x{hw[1]}"


def _fit_into(hw, lo, hi) -> tuple[int, int]:
    """(h, w) scaled so that both sides lie in [lo, hi] where the aspect allows (then clamped)."""
    h, w = (int(v) for v in hw)
    s = min(1.0, hi[0] / h, hi[1] / w)
    s = max(s, lo[0] / h, lo[1] / w)
    return (min(max(round(h * s), int(lo[0])), int(hi[0])), min(max(round(w * s), int(lo[1])), int(hi[1])))


def _read_images(images, classes, limit):
    """(uint8 HWC image, labels or None): a dataset folder (VOC, COCO, folder + labels file) or any image folder."""
    from wsclip.export.precision import _image_paths
    from wsclip.io import read_image

    ds = None
    if classes and not isinstance(images, (list, tuple)):
        try:
            from wsclip.data import open_dataset

            ds = open_dataset(str(images))
        except (WsclipError, ImportError, ValueError):
            ds = None
        if ds is not None and (tuple(ds.classes) != tuple(classes) or len(ds) == 0):
            ds = None
    if ds is None:
        for p in _image_paths(images)[:limit]:
            yield read_image(p), None
        return
    for i in range(len(ds) if limit is None else min(limit, len(ds))):
        item = ds[i]
        img = item["image"]
        img = img.permute(1, 2, 0).numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        labels = np.asarray(item["labels"], np.float32)
        yield img, (labels if labels.any() else None)


def check_parity(artefact, checkpoint=None, *, images=None, n_random: int = 2, batch: int = 4,
                 tolerance: float = 1e-4, min_agreement: float = 1.0, device="cpu", limit: int | None = None,
                 seed: int = 0) -> ParityReport:
    """Compare an exported artefact with the PyTorch model rebuilt from `checkpoint` (default: the sidecar's source)."""
    from wsclip.export.onnx import check_source, verify_artefact
    from wsclip.export.wrappers import spec_from_sidecar

    meta = verify_artefact(artefact)
    src = checkpoint or (meta.get("source") or {}).get("path")
    if not src or not Path(src).is_file():
        from wsclip.errors import MissingFileError

        raise MissingFileError(f"source checkpoint not found: {src}; pass --checkpoint")
    check_source(meta, src)
    runner = open_artefact(artefact, device=device)
    module = spec_from_sidecar(meta, src).module.to(device).eval()
    backend = "tensorrt" if meta["format"] == "tensorrt" else f"onnxruntime {','.join(runner.providers[:1])}"
    report = ParityReport(str(artefact), meta["model"], backend, meta.get("precision", "fp32"), tolerance, min_agreement)
    cases = list(_random_cases(meta, n_random, seed))
    if images is not None:
        cases += list(_real_cases(meta, images, batch, limit))
    merged: dict[str, list] = {}
    from wsclip.progress import progress

    for name, x, labels, size in progress(cases, desc="parity", unit="batch"):
        ref = module.run(x, labels)
        got = runner.run(x, labels)
        errors = compare_outputs(ref, got, tolerance, decision_scores(meta, ref))
        if name.startswith("real"):  # report the real images as one case
            merged.setdefault(name, []).append((x.shape[0], size, errors))
        else:
            report.cases.append(CaseResult(name, int(x.shape[0]), size, errors))
    for name, parts in merged.items():
        sub = ParityReport("", "", "", "", tolerance, min_agreement,
                           [CaseResult(name, b, s, e) for b, s, e in parts])
        sizes = sorted({s for _, s, _ in parts})
        report.cases.append(CaseResult(name, max(b for b, _, _ in parts),
                                       sizes[0] if len(sizes) == 1 else f"{len(sizes)} sizes", sub.worst))
    return report
