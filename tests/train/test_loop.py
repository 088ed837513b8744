"""The shared Trainer: poly LR, accumulation, exact resume, logs, data order, errors."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from wsclip.errors import WsclipError
from wsclip.train.loop import StepSampler, Trainer
from job_helpers import Crash, crash_at


class NoisyDataset(torch.utils.data.Dataset):
    """Random images whose 'augmentation' draws from the global RNGs (like real transforms)."""

    classes = ("a", "b", "c")

    def __init__(self, n=10, size=12):
        g = torch.Generator().manual_seed(123)
        self.x = torch.rand(n, 3, size, size, generator=g)
        self.y = (torch.rand(n, 3, generator=g) > 0.5).float()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        import numpy as np

        noise = 0.1 * torch.randn(3, 1, 1) + float(np.random.rand()) * 0.01
        return {"id": str(i), "image": self.x[i] + noise, "labels": self.y[i]}


class SmallNet(nn.Module):
    def __init__(self, bn=True):
        super().__init__()
        norm = nn.BatchNorm2d(8) if bn else nn.Identity()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm, nn.ReLU())
        self.head = nn.Conv2d(8, 3, 1, bias=False)

    def forward(self, x):
        return self.head(self.body(x))


def step_fn(model, batch):
    logits = model(batch["image"]).mean(dim=(2, 3))
    loss = F.multilabel_soft_margin_loss(logits, batch["labels"])
    return loss, {"extra": loss.detach() * 2}


def make_trainer(out, callbacks=(), num_workers=0, bn=True, **kw):
    torch.manual_seed(0)
    net = SmallNet(bn)
    opts = dict(out_dir=out, batch_size=4, lr=0.05, max_steps=7, accum_steps=2, ckpt_every=2, log_every=1,
                seed=3, num_workers=num_workers, callbacks=callbacks,
                param_groups=[(net.body.parameters(), 1.0), (net.head.parameters(), 10.0)])
    opts.update(kw)
    return Trainer(net, step_fn, NoisyDataset(), **opts)




def test_killed_and_resumed_run_matches_uninterrupted(tmp_path):
    ref = make_trainer(tmp_path / "ref").fit()
    with pytest.raises(Crash):
        make_trainer(tmp_path / "run", callbacks=[crash_at(5)]).fit()
    # the crash left the step-4 checkpoint only (steps 5 were lost)
    t = make_trainer(tmp_path / "run", num_workers=2)  # workers do not change the data or augmentation
    assert t.latest_checkpoint().name == "step-0000004"
    resumed = t.fit(resume=True)
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)
    # log: every step exactly once, identical values to the uninterrupted run
    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(x) for x in (tmp_path / "ref" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 8))
    for r, q in zip(rows, ref_rows, strict=True):
        assert r["loss"] == pytest.approx(q["loss"], abs=1e-6) and r["lr"] == pytest.approx(q["lr"])
        assert r["extra"] == pytest.approx(2 * r["loss"], rel=1e-5)
    # only the newest checkpoint is kept; its training state loads with weights_only=True
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert ckpts == ["step-0000007"]
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-0000007" / "state.pt", weights_only=True)
    assert state["step"] == 7 and len(state["rng"]) == 1
    # re-running a finished run with --resume does nothing more
    again = make_trainer(tmp_path / "run").fit(resume=True)
    torch.testing.assert_close(again.state_dict(), resumed.state_dict())


def test_poly_lr_with_head_multiplier(tmp_path):
    lrs = []

    def record(trainer, s, terms):
        lrs.append([g["lr"] for g in trainer.optimizer.param_groups])

    make_trainer(tmp_path, callbacks=[record], max_steps=5, ckpt_every=0).fit()
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    for s, r in enumerate(rows):
        want = 0.05 * (1 - s / 5) ** 0.9
        assert r["lr"] == pytest.approx(want, rel=1e-9)  # lr used by step s+1
    for s, (body, head) in enumerate(lrs, start=1):
        assert body == pytest.approx(0.05 * (1 - s / 5) ** 0.9, abs=1e-12)
        assert head == pytest.approx(10 * body, abs=1e-12)


def test_accumulation_equals_big_batch(tmp_path):
    """2 micro-batches of 2 give the same update as one batch of 4 (mean loss, no batch statistics)."""
    a = make_trainer(tmp_path / "a", accum_steps=1, max_steps=3, ckpt_every=0, bn=False).fit()
    b = make_trainer(tmp_path / "b", accum_steps=2, max_steps=3, ckpt_every=0, bn=False).fit()
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=1e-5, atol=1e-6, msg=k)


def test_existing_checkpoint_needs_resume_and_settings_must_match(tmp_path):
    make_trainer(tmp_path, max_steps=2).fit()
    with pytest.raises(WsclipError, match="--resume"):
        make_trainer(tmp_path, max_steps=2).fit()
    with pytest.raises(WsclipError, match="max_steps=2"):
        make_trainer(tmp_path, max_steps=3).fit(resume=True)


def test_bad_batch_sizes_are_clear(tmp_path):
    with pytest.raises(WsclipError, match="not divisible"):
        make_trainer(tmp_path, batch_size=5)
    with pytest.raises(WsclipError, match="fewer than one batch"):
        make_trainer(tmp_path, batch_size=24, accum_steps=1)


def test_sampler_global_batches_do_not_depend_on_world_or_accumulation():
    single = iter(StepSampler(23, 6, seed=5))
    ranks = [iter(StepSampler(23, 6, accum_steps=3, world=2, rank=r, seed=5)) for r in range(2)]
    seen = []
    for _ in range(9):  # crosses epoch boundaries (3 steps per epoch)
        b = next(single)
        split = [x for _ in range(3) for r in range(2) for x in next(ranks[r])]  # micro j: rank 0, rank 1
        assert split == b and len(b) == 6
        seen.append(b)
    epoch0 = [i for b in seen[:3] for _, i in b]
    assert len(set(epoch0)) == 18 and all(e == 0 for b in seen[:3] for e, _ in b)
    assert [i for b in seen[3:6] for _, i in b] != epoch0  # reshuffled per epoch
    resumed = iter(StepSampler(23, 6, seed=5, start=4))
    assert next(resumed) == seen[4]


def test_non_finite_loss_is_reported(tmp_path):
    def bad(model, batch):
        return model(batch["image"]).mean() * float("nan"), {}

    t = Trainer(SmallNet(), bad, NoisyDataset(), out_dir=tmp_path, batch_size=2, lr=0.1, max_steps=2)
    with pytest.raises(WsclipError, match="non-finite"):
        t.fit()
