"""The network labelers: a CAM network (`CamNetLabeler`) and a segmentation network (`SegNetLabeler`),
each run by PyTorch (a backend variant, `wsclip.label.backends`), ONNX Runtime or TensorRT behind the
`Labeler` interface of `wsclip.serve.labelers` (which builds them: `load_labeler`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wsclip.errors import CheckpointError, WsclipError
from wsclip.label.backends import Variant, torch_threads
from wsclip.label.masks import background_argmax
from wsclip.registry import ENGINE_SUFFIXES, is_export
from wsclip.runtime import precision, resolve_device
from wsclip.serve.labelers import Labeler, LabelerConfig, LabelResult, _make_predictor, _OwnScores, _stack
from wsclip.stages import stage


def _cam_results(cams: torch.Tensor, y: torch.Tensor, bg: float, want_cams: bool, want_crf: bool,
                 scores, mask: torch.Tensor | None = None, low: torch.Tensor | None = None) -> list[LabelResult]:
    """Per-image results from max-normalised CAMs (B, K, H, W) of all classes and labels y (B, K).

    The mask is argmax over [bg, CAMs of the labelled classes] (ties to the earlier channel, so to
    the background), computed on the labelled channels only.
    """
    picked = []
    with stage("postprocess", cams.device):
        for i in range(cams.shape[0]):
            keys = torch.nonzero(y[i] > 0.5).flatten().to(cams.device)
            sel = cams[i, keys]
            m = mask[i] if mask is not None else background_argmax(sel, bg, keys)
            picked.append((keys, sel, m.to(torch.uint8), low[i, keys] if low is not None else None))
    with stage("d2h", cams.device):
        return [_cam_result(keys, sel, m, lo, bg, want_cams, want_crf, s) for (keys, sel, m, lo), s in zip(picked, scores)]


def _cam_result(keys, sel, m, low, bg, want_cams, want_crf, score) -> LabelResult:
    """One image's LabelResult on the host from its device tensors."""
    r = LabelResult(mask=m.cpu().numpy(), keys=keys.cpu().numpy().astype(np.int64),
                    scores=score, predicted=score is not None)
    if want_cams or want_crf:
        sel_np = sel.float().cpu().numpy()
        if want_cams:
            r.cams = sel_np
            r.low = low.float().cpu().numpy() if low is not None else None
        if want_crf:
            r.crf_scores = np.concatenate([np.full((1, *sel_np.shape[1:]), bg, np.float32), sel_np])
            r.crf_values = np.concatenate([[0], r.keys + 1]).astype(np.uint8)
    return r


class _VariantSlot:
    """The backend variant of a labeler's PyTorch module, resolved on its first batch (`--backend auto`
    probes there on the CPU; see wsclip.serve.autobackend)."""

    def __init__(self, lab: Labeler, options: dict):
        from wsclip.label.backends import check_backend

        self.lab, self.options = lab, options
        self.name = check_backend(lab.cfg.backend)
        self.variant = None
        self.report = None

    def get(self, x: torch.Tensor):
        if self.variant is None:
            from wsclip.serve.autobackend import cache_key, resolve

            lab = self.lab
            names, bg = lab.module.output_names, getattr(lab, "bg", None)

            def scores_of(ref):  # what the mask is the argmax of (near-ties are not counted as mismatches)
                from wsclip.export.parity import decision_scores

                return decision_scores({"model": "seg" if "probs" in ref else "camnet",
                                        "config": {"bg_threshold": bg}}, ref)

            key = cache_key(lab.cfg.model, {**self.options, "method": lab.method}, lab.device)
            chosen, self.report = resolve(self.name, lab.module, lab.device, lab.cfg.amp, key, lambda: x[:1],
                                          names, scores_of, make_onnx=self._export if self._exportable() else None)
            if isinstance(chosen, Variant):
                self.variant, lab.variant = chosen, chosen.name
            else:  # ONNX Runtime won: it runs the network; the module stays for class-score prediction
                self.variant, lab.runner, lab.variant = Variant(lab.module, "eager", lab.device), chosen, "onnxruntime"
        return self.variant

    def _exportable(self) -> bool:
        """Whether the exported graph computes what the module does (not the official PIL-resize CAM path)."""
        return getattr(self.lab.module, "preprocess", "tensor") == "tensor"

    def _export(self) -> Path:
        """The labeler's checkpoint exported to ONNX once, into the cache (reused while the file is unchanged)."""
        import hashlib
        import json

        from wsclip.export.onnx import export_onnx
        from wsclip.io import cache_dir, file_sha256

        lab = self.lab
        opts = {"scales": tuple(lab.cfg.scales), "flip": lab.cfg.flip}
        if lab.method == "cam":
            opts["bg_threshold"] = lab.bg
        tag = hashlib.sha256(json.dumps(opts, sort_keys=True).encode()).hexdigest()[:8]
        path = cache_dir() / "onnx" / f"{file_sha256(lab.cfg.model)[:16]}_{lab.method}_{tag}.onnx"
        export_onnx({"cam": "camnet", "seg": "seg"}[lab.method], lab.cfg.model, path, overwrite=False, **opts)
        return path


def _open_export(cfg: LabelerConfig, path: Path, device: torch.device, model: str, what: str):
    """(runner, backend name) of an exported `model` (.onnx: ONNX Runtime; engine: TensorRT)."""
    from wsclip.export.parity import open_artefact

    kw = {"threads": cfg.threads} if path.suffix == ".onnx" and cfg.threads else {}
    runner = open_artefact(path, device=str(device), **kw)
    if runner.model != model:
        raise CheckpointError(f"{path} is an exported '{runner.model}' model, not {what}")
    return runner, ("tensorrt" if path.suffix in ENGINE_SUFFIXES else "onnxruntime")


# ============================================================================ CAM network
class CamNetLabeler(Labeler):
    """A CAM network (PyTorch `CamLabeler`, or an exported camnet run by ONNX Runtime / TensorRT)."""

    method = "cam"

    def __init__(self, cfg: LabelerConfig):
        from wsclip.label.cam_labeler import CAM_BG_THRESHOLD

        path = Path(cfg.model)
        device = resolve_device(cfg.device)
        if is_export(path):
            self.runner, backend = _open_export(cfg, path, device, "camnet", "a CAM network")
            conf = self.runner.meta.get("config") or {}
            self.bg = float(cfg.bg_threshold if cfg.bg_threshold is not None else conf.get("bg_threshold", CAM_BG_THRESHOLD))
            self.module = None
            classes = self.runner.classes
        else:
            from wsclip.compat import value
            from wsclip.label.cam_labeler import load_cam_labeler

            self.bg = float(cfg.bg_threshold if cfg.bg_threshold is not None else CAM_BG_THRESHOLD)
            self.module = load_cam_labeler(path, device=device, bg_threshold=self.bg, scales=tuple(cfg.scales),
                                           flip=cfg.flip, preprocess=value("preprocess", cfg.compat))
            self.runner = None
            backend = "pytorch"
            classes = self.module.classes
            if device.type == "cuda":
                torch.backends.cudnn.benchmark = False  # same algorithms every run: reproducible masks
        super().__init__(cfg, classes, device, backend)
        self._variants = _VariantSlot(self, {"scales": list(cfg.scales), "flip": cfg.flip, "bg": self.bg})
        self.irn = None
        if self.refine == "irn":
            if self.module is None:
                raise WsclipError("--refine irn needs the PyTorch CAM checkpoint (the IRN step runs in PyTorch)")
            if not cfg.irn:
                raise WsclipError("--refine irn needs --irn IRN_CHECKPOINT (the output of `wsclip train irn`)")
            from wsclip.models.irn import load_irn

            self.irn, _ = load_irn(cfg.irn, device=device)
        self.predictor = _make_predictor(cfg, self, own_scores=self.module is not None)

    def _cams(self, x: torch.Tensor, want_scores: bool, want_low: bool = False):
        """(max-normalised CAMs (B, K, H, W) of every class, class scores (B, K) or None, stride-4 CAMs or None)."""
        with stage("forward", self.device):
            variant = self._variants.get(x) if self.module is not None else None  # auto may pick ONNX Runtime
            # ONNX Runtime (exported, or `auto`'s choice) gives the full-size CAMs: the stride-4 maps of CAM
            # files are then resized from them (`cam_low`), so the masks never depend on --cams
            if self.runner is not None and (self.module is None or not want_scores):
                out = self.runner.run(x.cpu().numpy() if not x.is_cuda else x)
                return torch.from_numpy(out["cams"]).to(self.device), None, None
            raw = []
            hook = self.module.camnet.register_forward_hook(lambda m, i, o: raw.append(o)) if want_scores else None
            try:  # all of torch's threads, also where ONNX Runtime won `auto` but cannot give what is asked
                with torch_threads(self.torch_threads), precision(self.device):  # the variant sets its own autocast
                    maps = variant(x, None, low=want_low, method="cams", eager=want_scores)  # hooks need the eager module
            finally:
                if hook is not None:
                    hook.remove()
            scores = torch.sigmoid(raw[0].float().mean(dim=(2, 3))).cpu().numpy() if raw else None
            return maps[0].float(), scores, maps[1].float() if want_low else None

    def _run_group(self, images, labels, want_cams):
        with stage("h2d", self.device):
            x = _stack(images, self.device)
        need_pred = self.needs_labels and any(lab is None for lab in labels)
        cams, own, low = self._cams(x, want_scores=need_pred and isinstance(self.predictor, _OwnScores),
                                    want_low=want_cams)
        with stage("postprocess", self.device):
            y_np, scores = self._fill_labels(images, labels, own)
            y = torch.from_numpy(y_np).to(cams.device)
            mask = self._irn_mask(x, cams, y) if self.irn is not None else None
            results = _cam_results(cams, y, self.bg, want_cams, self.refine == "crf", scores, mask, low)
        for r in results:
            r.crf_params = self.crf_params
        return results

    def _irn_mask(self, x: torch.Tensor, cams: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """IRN random walk (radius 5, beta 10, 2^8 steps) of the stride-4 CAMs on the boundary map; (B, H, W)."""
        from wsclip.refine.random_walk import irn_refine

        h, w = x.shape[-2:]
        with torch.inference_mode():
            edge = self.irn.boundary(self.module.normalize(x))  # (B, h4, w4)
            grid = tuple(edge.shape[-2:])
            masks = []
            for i in range(x.shape[0]):
                keys = torch.nonzero(y[i] > 0.5).flatten()
                if not len(keys):  # nothing to propagate: all background
                    masks.append(torch.zeros((h, w), dtype=torch.long, device=x.device))
                    continue
                small = F.interpolate(cams[i:i + 1, keys], size=grid, mode="bilinear", align_corners=False)
                small = small / (small.amax(dim=(2, 3), keepdim=True) + 1e-5)
                _, lab = irn_refine(small[0], edge[i], size=(h, w))
                values = torch.cat([keys.new_zeros(1), keys + 1])
                masks.append(values[lab])
        return torch.stack(masks)


# ============================================================================ segmentation network
class SegNetLabeler(Labeler):
    """A segmentation network (PyTorch `SegLabeler`, or an exported seg model); labels, if given, restrict the argmax."""

    method = "seg"
    needs_labels = False

    def __init__(self, cfg: LabelerConfig):
        path = Path(cfg.model)
        device = resolve_device(cfg.device)
        if is_export(path):
            self.runner, backend = _open_export(cfg, path, device, "seg", "a segmentation network")
            self.module, classes = None, self.runner.classes
        else:
            from wsclip.label.seg_labeler import load_seg_labeler

            self.module = load_seg_labeler(path, device=device, scales=tuple(cfg.scales), flip=cfg.flip)
            self.runner, backend, classes = None, "pytorch", self.module.classes
        if cfg.refine == "irn":
            raise WsclipError("--refine irn applies to CAM networks; use --refine crf or none with a segmentation network")
        super().__init__(cfg, classes, device, backend)
        self._variants = _VariantSlot(self, {"scales": list(cfg.scales), "flip": cfg.flip})

    def _run_group(self, images, labels, want_cams):
        with stage("h2d", self.device):
            x = _stack(images, self.device)
        with stage("forward", self.device):
            variant = self._variants.get(x) if self.module is not None else None  # auto may pick ONNX Runtime
            if self.runner is not None:
                probs = torch.from_numpy(self.runner.run(x.cpu().numpy() if not x.is_cuda else x)["probs"]).to(self.device)
            else:
                with precision(self.device):  # the variant sets its own autocast
                    probs = variant(x)[0].float()
        with stage("postprocess", self.device):
            allow = torch.ones(probs.shape[:2], dtype=torch.bool, device=probs.device)
            for i, lab in enumerate(labels):
                if lab is not None:
                    allow[i, 1:] = torch.from_numpy(lab > 0.5).to(probs.device)
            masked = torch.where(allow[:, :, None, None], probs, torch.full_like(probs, -1.0))
            mask = masked.argmax(dim=1).to(torch.uint8)
        with stage("d2h", self.device):
            mask = mask.cpu().numpy()
            return self._seg_results(probs, allow, mask, len(images))

    def _seg_results(self, probs, allow, mask, n) -> list[LabelResult]:
        out = []
        for i in range(n):
            keys = np.unique(mask[i])
            r = LabelResult(mask=mask[i], keys=(keys[keys > 0].astype(np.int64) - 1))
            if self.refine == "crf":
                r.crf_scores = (probs[i] * allow[i, :, None, None]).cpu().numpy()
                r.crf_params = self.crf_params
                r.crf_values = np.arange(probs.shape[1], dtype=np.uint8)
            out.append(r)
        return out
