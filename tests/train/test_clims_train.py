"""CLIMS training end to end on the synthetic world with a tiny random CLIP and the tiny backbone:
frozen CLIP, one image-encoder call per step, baseline -> CLIMS, exact resume, torchrun/gloo DDP."""

import json
import os
import subprocess
import sys

import pytest
import torch

from wsclip.config import ClimsConfig, from_preset
from wsclip.models.camnet import load_camnet
from wsclip.train.loop import StepSampler

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 16-image synthetic world in VOC layout and a tiny random CLIP saved like a real checkpoint."""
    from job_helpers import synth_world_and_clip

    return synth_world_and_clip(tmp_path_factory.mktemp("clims"), 16, TINY_CLIP_CFG, "tiny-test")


def _cfg(world, out, **kw):
    base = dict(data=str(world / "synth"), out=str(out), clip=str(world / "clip.safetensors"), batch_size=4,
                max_steps=4, crop=64, resize_long=(48, 80), num_workers=0, ckpt_every=2, log_every=1,
                device="cpu", seed=0, lr=0.05)
    base.update(kw)
    return from_preset(ClimsConfig, "synth", **base)


@pytest.fixture(scope="module")
def clip(world):
    from wsclip.train.clims import load_frozen_clip

    return load_frozen_clip(str(world / "clip.safetensors"), "cpu")


def test_frozen_clip_and_one_encoder_call_per_step(world, clip, tmp_path):
    from wsclip.data import open_dataset
    from wsclip.train.clims import train_clims

    calls, texts = [], []
    h1 = clip.model.visual.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    h2 = clip.model.transformer.register_forward_hook(lambda m, i, o: texts.append(1))
    before = {k: v.clone() for k, v in clip.model.state_dict().items()}
    clip.clear_text_cache()
    cfg = _cfg(world, tmp_path / "run", max_steps=3, ckpt_every=0)
    try:
        final = train_clims(cfg, clip=clip)
    finally:
        h1.remove()
        h2.remove()
    # CLIP: no parameter is trainable, none got a gradient, weights unchanged, still in eval mode
    assert not any(p.requires_grad for p in clip.model.parameters())
    assert all(p.grad is None for p in clip.model.parameters()) and not clip.model.training
    assert all(torch.equal(v, clip.model.state_dict()[k]) for k, v in before.items())
    # one image-encoder call per step holding fg and bg of every positive pair once (2 M images)
    ds = open_dataset(str(world / "synth"), split="train", masks=False)
    labels = torch.stack([ds.label_vector(i) for i in range(len(ds))])
    sampler = iter(StepSampler(len(ds), 4, seed=cfg.seed))
    expected = [2 * int(labels[[i for _, i in next(sampler)]].sum()) for _ in range(3)]
    assert calls == expected
    # the texts were encoded once for the whole run (class prompts + background words)
    assert len(texts) == 2
    # the CAM net trained, and its checkpoint says so
    net, meta = load_camnet(final)
    assert meta["trained"] == "clims" and meta["classes"] == list(ds.classes)
    assert meta["background"] == ["water", "rails", "sky", "grass", "road"]
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    for r in log:
        assert set(r) >= {"otm", "btm", "cbs", "reg", "loss", "lr"}
        want = 10 * r["otm"] + 24 * r["btm"] + 1 * r["cbs"] + 1.15 * r["reg"]  # the synth preset
        assert r["loss"] == pytest.approx(want, rel=1e-5)


def test_baseline_then_clims_killed_and_resumed_matches(world, clip, tmp_path):
    from wsclip.cli import main
    from wsclip.train.clims import train_clims

    rc = main(["train", "cam", "--preset", "synth", "--data", str(world / "synth"), "--out", str(tmp_path / "cam"),
               "--batch-size", "4", "--max-steps", "2", "--crop", "64", "--resize-long", "48", "80",
               "--num-workers", "0", "--device", "cpu"])
    assert rc == 0
    base = tmp_path / "cam" / "camnet.safetensors"
    net0, meta0 = load_camnet(base)
    assert meta0["trained"] == "cam" and meta0["preset"] == "synth" and meta0["backbone"] == "tiny-s8"
    # the synth baseline starts from random weights, so its BN trains: the statistics were estimated
    bn = net0.backbone.layer2[0].bn1
    assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean)) and int(bn.num_batches_tracked) == 2

    ref = train_clims(_cfg(world, tmp_path / "ref", init=str(base)), clip=clip)

    class Killed(Exception):
        pass

    def kill(trainer, step, terms):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        train_clims(_cfg(world, tmp_path / "run", init=str(base)), clip=clip, callbacks=[kill])
    assert not (tmp_path / "run" / "camnet.safetensors").exists()
    resumed = train_clims(_cfg(world, tmp_path / "run", init=str(base)), clip=clip, resume=True)
    a, _ = load_camnet(ref)
    b, _ = load_camnet(resumed)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=k)
    # and training moved the weights away from the baseline
    assert not torch.allclose(a.classifier.weight, net0.classifier.weight)
    # the synth preset trains BN as the papers do (its statistics move); freeze_bn keeps the baseline's
    assert not torch.equal(a.backbone.layer2[0].bn1.running_mean, bn.running_mean)
    frozen = train_clims(_cfg(world, tmp_path / "frozen", init=str(base), max_steps=2, freeze_bn=True), clip=clip)
    assert torch.equal(load_camnet(frozen)[0].backbone.layer2[0].bn1.running_mean, bn.running_mean)


def test_torchrun_two_processes_match_single_process(world, clip, tmp_path):
    from wsclip.train.clims import train_clims

    args = ["--preset", "synth", "--data", str(world / "synth"), "--clip", str(world / "clip.safetensors"),
            "--batch-size", "4", "--max-steps", "2", "--crop", "64", "--resize-long", "48", "80",
            "--num-workers", "0", "--ckpt-every", "0", "--log-every", "1", "--device", "cpu", "--seed", "0", "--lr", "0.05"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WSCLIP_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "wsclip.cli", "train", "clims", *args, "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    single = train_clims(_cfg(world, tmp_path / "single", max_steps=2, ckpt_every=0), clip=clip)
    a, _ = load_camnet(single)
    b, _ = load_camnet(tmp_path / "ddp" / "camnet.safetensors")
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x.float(), y.float(), rtol=1e-4, atol=1e-5, msg=k)
    # the logged loss terms are those of the global batch too
    log = [json.loads(x) for x in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "single" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [r["step"] for r in ref] == [1, 2]
    for r, q in zip(log, ref, strict=True):
        for key in ("loss", "otm", "btm", "cbs", "reg"):
            assert r[key] == pytest.approx(q[key], rel=1e-4, abs=1e-6), key


def test_cli_errors_are_one_line(world, tmp_path, capsys):
    from wsclip.cli import main

    assert main(["train", "clims", "--preset", "synth", "--out", str(tmp_path / "x")]) == 2
    assert "no training data given" in capsys.readouterr().err
    assert main(["train", "clims", "--preset", "synth", "--data", str(world / "synth"), "--out", str(tmp_path / "x"),
                 "--clip", str(tmp_path / "missing.safetensors"), "--device", "cpu", "--num-workers", "0"]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    assert main(["train", "cam", "--preset", "synth", "--data", str(world / "synth"), "--batch-size", "64",
                 "--out", str(tmp_path / "y"), "--device", "cpu"]) == 2
    assert "fewer than one batch" in capsys.readouterr().err
