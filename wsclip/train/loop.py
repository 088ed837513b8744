"""The shared training loop: poly-LR SGD, AMP, accumulation, DDP, checkpoints, exact resume.

Every trainer in wsclip (baseline CAM, CLIMS, QA-CLIMS, IRN, segmentation) builds a
`Trainer` with its model, parameter groups with lr multipliers, a dataset and a
`step_fn(model, batch) -> (loss, {term: value})`, then calls `fit()`.

Semantics:
- `batch_size` is the GLOBAL batch of one optimizer step; each process runs
  micro-batches of batch_size / (world_size * accum_steps) images.
- Data order: a permutation per epoch seeded by (seed, epoch); step s of an epoch
  uses perm[s*batch_size:(s+1)*batch_size], cut into accumulation micro-batches and
  then per-process slices. The same images form a step whatever the number of
  processes or accumulation steps.
  Augmentation randomness is seeded per sample by (seed, epoch, index), so it does
  not depend on worker processes or on resuming.
- Gradients are averaged over processes (DDP) and accumulation micro-batches; a
  step_fn whose loss is a sum or a mean over a varying number of items can use
  `global_scale` to reproduce the single-process value on the global batch.
- Checkpoints: out/checkpoints/step-NNNNNNN/{model.safetensors,model.json,state.pt}
  written to a temporary folder and renamed, then `latest` is updated. state.pt
  (optimizer, scheduler, step, RNG states of every process) loads with weights_only=True.
  `fit(resume=True)` continues exactly: same weights as an uninterrupted run.
- Log: out/log.jsonl, one JSON line per logged step (step, epoch, lr, loss, terms, time).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Sampler

from wsclip.errors import CheckpointError, WsclipError
from wsclip.runtime import precision

StepFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict[str, Any]]"]
CKPT_DIR = "checkpoints"
LOG_FILE = "log.jsonl"


# ============================================================================ seeding and distributed
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def init_distributed() -> bool:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); gloo on CPU, NCCL on CUDA."""
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True


def shutdown_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over processes (no gradient); the tensor itself when not distributed."""
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x


def global_scale(local_count, device=None) -> torch.Tensor:
    """world_size * local_count / global_count: multiply a local MEAN by this so that the
    gradients averaged by DDP equal those of the mean over the global batch (a local SUM is
    multiplied by world_size alone). 0 when the global count is 0."""
    n = torch.as_tensor(float(local_count), device=device)
    total = all_reduce_sum(n)
    return torch.where(total > 0, n * world_size() / total.clamp(min=1e-12), torch.zeros_like(n))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> the local CUDA device when there is one (cuda:LOCAL_RANK under torchrun), else CPU."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WsclipError(f"device '{device}' asked for but CUDA is not available here: use --device cpu")
    return dev


# ============================================================================ SyncBN on CPU
class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose batch statistics are computed over all processes (gloo, CPU).

    torch.nn.SyncBatchNorm supports only accelerators; this is the same computation with
    differentiable all-reduces (two passes: mean, then variance).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        count = torch.tensor([x.numel() / c], dtype=x.dtype, device=x.device)
        stats = all_reduce(torch.cat([x.sum(dim=(0, 2, 3)), count]))
        n = stats[c]
        mean = stats[:c] / n
        centred = x - mean.view(1, c, 1, 1)
        var = all_reduce(centred.pow(2).sum(dim=(0, 2, 3))) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / max(float(n) - 1, 1.0), alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """SyncBN for every BatchNorm: torch's on CUDA, CPUSyncBatchNorm on CPU (same Parameters kept)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, CPUSyncBatchNorm):
            new = CPUSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            if child.track_running_stats:
                new.running_mean, new.running_var = child.running_mean, child.running_var
                new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_sync_batchnorm(child, device)
    return module


# ============================================================================ data order
class StepSampler(Sampler):
    """Infinite batch sampler: yields this process's micro-batches as lists of (epoch, index).

    An epoch is n // batch_size optimizer steps; step s of epoch e uses the global batch
    perm_e[s*batch_size:(s+1)*batch_size] (perm_e seeded by (seed, e)), split into
    accum_steps micro-batches, each split over the `world` processes. Starts at optimizer
    step `start` (resume).
    """

    def __init__(self, n: int, batch_size: int, accum_steps: int = 1, world: int = 1, rank: int = 0,
                 seed: int = 0, start: int = 0):
        self.n, self.batch_size, self.accum, self.world, self.rank = n, batch_size, accum_steps, world, rank
        self.seed, self.start = seed, start
        self.micro = batch_size // (accum_steps * world)
        if self.micro * accum_steps * world != batch_size:
            raise WsclipError(
                f"batch size {batch_size} is not divisible by processes x accumulation steps = {accum_steps * world}"
            )
        self.steps_per_epoch = n // batch_size
        if self.steps_per_epoch < 1:
            raise WsclipError(
                f"the dataset has {n} images, fewer than one batch of {batch_size}: lower --batch-size or add images"
            )

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        step = self.start
        epoch, perm = -1, None
        while True:
            e, s = divmod(step, self.steps_per_epoch)
            if e != epoch:
                epoch, perm = e, self.permutation(e)
            batch = perm[s * self.batch_size:(s + 1) * self.batch_size]
            for j in range(self.accum):
                lo = (j * self.world + self.rank) * self.micro
                yield [(epoch, int(i)) for i in batch[lo:lo + self.micro]]
            step += 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index, 0x5EED]).generate_state(1)[0])


class SeededItems(Dataset):
    """Wraps a dataset: item (epoch, i) is dataset[i] drawn with python/numpy/torch RNGs seeded
    by (seed, epoch, i), so random augmentation is reproducible; the caller's RNG streams are restored."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        s = sample_seed(self.seed, epoch, i)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(s)
                np.random.seed(s)
                torch.manual_seed(s)
                return self.dataset[i]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def to_device(batch, device: torch.device):
    """Move every tensor in a (nested) batch to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


# ============================================================================ RNG state (weights_only friendly)
def _rng_state() -> dict:
    st = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": st[0], "keys": torch.from_numpy(st[1].astype(np.int64)), "pos": int(st[2]),
                  "has_gauss": int(st[3]), "gauss": float(st[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ============================================================================ the trainer
class Trainer:
    """Reusable training loop; see the module docstring for the exact semantics.

    param_groups: None (all trainable parameters at lr) or a sequence of (params, lr_mult)
    pairs or dicts {"params": ..., "lr_mult": m, ...} (other keys, e.g. weight_decay, are kept).
    step_fn(model, batch) gets the model to call (DDP-wrapped when distributed) and the batch
    on the device, and returns (loss, terms) where terms are scalars to log. callbacks are
    called as cb(trainer, step, terms) after every optimizer step. model_meta goes into the
    checkpoint's JSON sidecar (e.g. kind "camnet" makes it loadable by load_camnet).
    """

    def __init__(
        self,
        model: nn.Module,
        step_fn: StepFn,
        dataset: Dataset,
        *,
        out_dir,
        batch_size: int,
        lr: float,
        max_steps: int | None = None,
        epochs: int | None = None,
        param_groups: Sequence | None = None,
        optimizer: str = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        poly_power: float = 0.9,
        accum_steps: int = 1,
        grad_clip: float | None = None,
        amp: bool = True,
        seed: int = 0,
        ckpt_every: int = 0,
        keep_checkpoints: int = 1,
        log_every: int = 1,
        sync_bn: bool = False,
        device: str | torch.device = "auto",
        num_workers: int = 0,
        collate_fn: Callable | None = None,
        model_meta: dict | None = None,
        desc: str = "train",
        callbacks: Iterable[Callable] = (),
        ddp_kwargs: dict | None = None,
    ):
        init_distributed()
        self.rank, self.world = rank(), world_size()
        self.device = resolve_device(device)
        self.out_dir = Path(out_dir)
        self.step_fn, self.dataset = step_fn, dataset
        self.seed, self.accum = int(seed), int(accum_steps)
        self.ckpt_every, self.keep, self.log_every = int(ckpt_every), max(1, int(keep_checkpoints)), max(1, int(log_every))
        self.num_workers, self.collate_fn, self.grad_clip = num_workers, collate_fn, grad_clip
        self.model_meta = dict(model_meta or {})
        self.desc, self.callbacks = desc, list(callbacks)
        self.amp = bool(amp) and self.device.type == "cuda"
        self.poly_power = poly_power

        self.batch_size = int(batch_size)
        probe = StepSampler(len(dataset), self.batch_size, self.accum, self.world)
        self.micro_batch, self.steps_per_epoch = probe.micro, probe.steps_per_epoch
        if max_steps is None:
            if epochs is None:
                raise WsclipError("give max_steps or epochs")
            max_steps = max(1, epochs * self.steps_per_epoch)
        self.max_steps = int(max_steps)

        model.to(self.device)
        if sync_bn and self.world > 1:
            model = convert_sync_batchnorm(model, self.device)
        self.module = model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(model, device_ids=ids, **(ddp_kwargs or {}))
        else:
            self.model = model

        groups = self._groups(model, param_groups)
        for g in groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
            g.setdefault("lr_mult", 1.0)
        if optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
        elif optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
        else:
            raise WsclipError(f"unknown optimizer '{optimizer}': use sgd or adamw")
        total = self.max_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: max(0.0, 1.0 - min(s, total) / total) ** self.poly_power
        )
        self.step = 0

    @staticmethod
    def _groups(model, param_groups) -> list[dict]:
        if param_groups is None:
            return [{"params": [p for p in model.parameters() if p.requires_grad], "lr_mult": 1.0}]
        out = []
        for g in param_groups:
            if isinstance(g, dict):
                g = dict(g)
                g["params"] = [p for p in g["params"] if p.requires_grad]
            else:
                params, mult = g
                g = {"params": [p for p in params if p.requires_grad], "lr_mult": float(mult)}
            if g["params"]:
                out.append(g)
        if not out:
            raise WsclipError("no trainable parameters were given to the trainer")
        return out

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ checkpoints
    @property
    def ckpt_root(self) -> Path:
        return self.out_dir / CKPT_DIR

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint folder, or None."""
        root = self.ckpt_root
        pointer = root / "latest"
        if pointer.is_file():
            cand = root / pointer.read_text().strip()
            if (cand / "state.pt").is_file():
                return cand
        done = sorted(p for p in root.glob("step-*") if (p / "state.pt").is_file()) if root.is_dir() else []
        return done[-1] if done else None

    def save_checkpoint(self) -> Path | None:
        """Write model + optimizer + scheduler + step + every process's RNG state atomically."""
        from wsclip.io import atomic_write_text, save_checkpoint

        rngs = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(rngs, _rng_state())
        else:
            rngs = [_rng_state()]
        path = None
        if self.is_main:
            root = self.ckpt_root
            root.mkdir(parents=True, exist_ok=True)
            name = f"step-{self.step:07d}"
            tmp = root / f".tmp-{name}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            meta = {"kind": "trainer-model", **self.model_meta, "step": self.step, "max_steps": self.max_steps}
            save_checkpoint(tmp / "model.safetensors", self.module.state_dict(), meta)
            state = {
                "step": self.step,
                "max_steps": self.max_steps,
                "batch_size": self.batch_size,
                "world_size": self.world,
                "accum_steps": self.accum,
                "seed": self.seed,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rngs,
            }
            torch.save(state, tmp / "state.pt")
            path = root / name
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
            atomic_write_text(root / "latest", name + "\n")
            old = sorted(p for p in root.glob("step-*") if p != path)
            for p in old[: max(0, len(old) - (self.keep - 1))]:
                shutil.rmtree(p, ignore_errors=True)
        if self.world > 1:
            dist.barrier()
        return path

    def load_checkpoint(self, ckpt: Path) -> None:
        """Restore model, optimizer, scheduler, step and RNG state from a checkpoint folder."""
        from wsclip.io import load_checkpoint

        tensors, meta = load_checkpoint(ckpt / "model.safetensors")
        try:
            state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{ckpt / 'state.pt'} is not a readable training state: {exc}") from exc
        for key, mine in (("batch_size", self.batch_size), ("max_steps", self.max_steps), ("seed", self.seed),
                          ("accum_steps", self.accum)):
            if state.get(key) != mine:
                raise CheckpointError(
                    f"{ckpt} was saved with {key}={state.get(key)}, this run has {mine}: resume with the same "
                    "settings (or start a new --out)"
                )
        try:
            self.module.load_state_dict(tensors, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{ckpt}: model weights do not fit this model: {str(exc).splitlines()[0]}") from exc
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rngs = state["rng"]
        _set_rng_state(rngs[self.rank % len(rngs)])
        self.step = int(state["step"])

    # ------------------------------------------------------------------ log
    def _truncate_log(self, step: int) -> None:
        from wsclip.io import atomic_write_text

        log = self.out_dir / LOG_FILE
        if not log.is_file():
            return
        keep = [ln for ln in log.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        atomic_write_text(log, "".join(ln + "\n" for ln in keep))

    # ------------------------------------------------------------------ fit
    def fit(self, resume: bool = False) -> nn.Module:
        """Train to max_steps (from the last checkpoint when resume); returns the unwrapped model."""
        ckpt = self.latest_checkpoint()
        if ckpt is not None and not resume:
            raise WsclipError(
                f"{self.out_dir} already holds a checkpoint ({ckpt.name}): pass --resume to continue it "
                "or choose another output folder"
            )
        if ckpt is not None:
            self.load_checkpoint(ckpt)
        else:
            seed_everything(self.seed + self.rank)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._truncate_log(self.step)
        if self.step >= self.max_steps:
            return self.module

        sampler = StepSampler(len(self.dataset), self.batch_size, self.accum, self.world, self.rank, self.seed,
                              start=self.step)
        loader = DataLoader(
            SeededItems(self.dataset, self.seed), batch_sampler=sampler, num_workers=self.num_workers,
            collate_fn=self.collate_fn, pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        from wsclip.progress import progress

        bar = progress(total=self.max_steps, initial=self.step, desc=self.desc, unit="step") if self.is_main else None
        log = open(self.out_dir / LOG_FILE, "a") if self.is_main else None
        autocast = lambda: precision(self.device, self.amp, train=True)  # noqa: E731
        ddp = self.model is not self.module
        t0 = time.time()
        self.model.train()
        try:
            batches = iter(loader)
            while self.step < self.max_steps:
                terms_sum: dict[str, torch.Tensor] = {}
                for micro in range(self.accum):
                    batch = to_device(next(batches), self.device)
                    sync = contextlib.nullcontext() if (not ddp or micro == self.accum - 1) else self.model.no_sync()
                    with sync:
                        with autocast():
                            loss, terms = self.step_fn(self.model, batch)
                        (loss / self.accum).backward()
                    for k, v in {"loss": loss, **terms}.items():
                        v = torch.as_tensor(v, device=self.device).detach().float() / self.accum
                        terms_sum[k] = terms_sum[k] + v if k in terms_sum else v
                if self.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
                lr = self.optimizer.param_groups[0]["lr"]
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.step += 1
                if self.step % self.log_every == 0 or self.step == self.max_steps:
                    self._log(terms_sum, lr, log, bar, t0)
                elif bar is not None:
                    bar.update(1)
                if self.ckpt_every and self.step % self.ckpt_every == 0 and self.step < self.max_steps:
                    self.save_checkpoint()
                for cb in self.callbacks:
                    cb(self, self.step, terms_sum)
            self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()
        return self.module

    def _log(self, terms: dict, lr: float, log, bar, t0: float) -> None:
        keys = sorted(terms)
        vals = torch.stack([terms[k] for k in keys])
        if self.world > 1:
            vals = all_reduce_sum(vals) / self.world
        vals = vals.tolist()
        row = dict(zip(keys, vals))
        if not all(math.isfinite(v) for v in vals):
            raise WsclipError(f"the loss became non-finite at step {self.step} ({row}): lower the learning rate")
        if self.is_main:
            epoch = self.step / self.steps_per_epoch
            entry = {"step": self.step, "epoch": round(epoch, 4), "lr": lr, **row, "time": round(time.time() - t0, 3)}
            log.write(json.dumps(entry) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in row.items()}, refresh=False)
