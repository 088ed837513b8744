"""Configs: presets exactly per METHODS.md, YAML round trip, CLI flags override 1:1."""

import argparse

import pytest

from wsclip import vocab
from wsclip.config import (CamConfig, ClimsConfig, add_config_args, config_from_args, from_preset, load_yaml,
                           save_yaml)
from wsclip.errors import WsclipError


def test_clims_presets_match_methods():
    voc = from_preset(ClimsConfig, "voc-official")
    assert (voc.alpha, voc.beta, voc.gamma, voc.delta, voc.tau) == (10, 24, 1, 0.2, 0.26)
    assert (voc.lr, voc.batch_size, voc.epochs, voc.head_lr_mult) == (2.5e-4, 16, 15, 10)
    assert voc.background == vocab.CLIMS_VOC_BACKGROUND and voc.class_names[14] == "player"
    assert voc.preset == "voc-official" and voc.sync_bn
    # the official presets reproduce the public code (--compat official): ImageNet-normalised masked inputs,
    # bn1 in train mode; the paper one is wsclip's cleaner behaviour
    from wsclip.compat import resolve

    assert voc.compat == "official" and (resolve(voc).mask_norm, resolve(voc).bn1) == ("imagenet", "train")
    paper = resolve(from_preset(ClimsConfig, "voc-paper"))
    assert (paper.compat, paper.mask_norm, paper.bn1) == ("wsclip", "clip", "eval")
    # explicit settings win over --compat
    assert resolve(from_preset(ClimsConfig, "voc-official", bn1="eval")).bn1 == "eval"
    coco = from_preset(ClimsConfig, "coco-official")
    assert (coco.alpha, coco.beta, coco.gamma, coco.delta, coco.tau) == (2, 14, 1.25, 0.2, 0.285)
    assert (coco.lr, coco.batch_size, coco.epochs) == (5e-4, 32, 8)
    assert len(coco.background) == 88 and coco.compat == "official" and resolve(coco).mask_norm == "imagenet"
    # the public CLIMS COCO code (clip_utils.py) spells person "player", as its VOC one does; the rest are COCO's
    assert coco.class_names == vocab.CLIMS_COCO_NAMES and coco.class_names[0] == "player"
    assert coco.class_names[1:] == vocab.COCO_CLASSES[1:] and vocab.method_text("coco", "clims")[0][0] == "player"
    paper = from_preset(ClimsConfig, "voc-paper")
    assert (paper.alpha, paper.beta, paper.gamma, paper.delta) == (10, 25, 29.5, 1.15)
    assert paper.background_per_class["boat"] == ["river", "water", "lake", "sea", "building"]
    assert set(paper.background) == {w for ws in vocab.CLIMS_PAPER_VOC_BACKGROUND.values() for w in ws}
    for name in ("voc-official", "coco-official", "voc-paper"):
        c = from_preset(ClimsConfig, name)
        assert (c.momentum, c.weight_decay, c.poly_power, c.crop, c.resize_long) == (0.9, 1e-4, 0.9, 512, (320, 640))
    cam = from_preset(CamConfig, "voc-official")
    assert (cam.lr, cam.batch_size, cam.epochs, cam.freeze_bn) == (0.1, 16, 5, True)
    assert from_preset(ClimsConfig, "synth").backbone == "tiny-s8"
    with pytest.raises(WsclipError, match="unknown preset"):
        from_preset(ClimsConfig, "voc")


def test_qa_clims_and_irn_presets_match_methods():
    from wsclip.config import IrnConfig, QaClimsConfig

    voc = from_preset(QaClimsConfig, "voc-qa")  # METHODS.md section 4
    assert (voc.lr, voc.batch_size, voc.epochs, voc.w1, voc.w2, voc.w3, voc.tau) == (3.5e-4, 8, 15, 10, 8, 0.2, 0.7)
    assert (voc.label_weight, voc.max_bg_texts, voc.crop) == (0.5, 10, 512)
    coco = from_preset(QaClimsConfig, "coco-qa")  # weights from METHODS; lr and batch from the public run script
    assert (coco.w1, coco.w2, coco.w3, coco.tau, coco.lr, coco.batch_size) == (30, 24, 0.2, 0.7, 1e-5, 8)
    for name, fg in (("voc-official", 0.30), ("coco-official", 0.35)):  # METHODS.md sections 3 and 6
        irn = from_preset(IrnConfig, name)
        assert (irn.fg_threshold, irn.bg_threshold, irn.radius) == (fg, 0.10, 10)
        assert (irn.batch_size, irn.epochs, irn.lr) == (32, 3, 0.1)


def test_yaml_round_trip_and_unknown_keys(tmp_path):
    cfg = from_preset(ClimsConfig, "voc-paper", lr=1e-3, max_steps=7)
    save_yaml(cfg, tmp_path / "c.yaml")
    assert load_yaml(ClimsConfig, tmp_path / "c.yaml") == cfg
    (tmp_path / "bad.yaml").write_text("lr: 0.1\nlearning_rate: 3\n")
    with pytest.raises(WsclipError, match="learning_rate"):
        load_yaml(ClimsConfig, tmp_path / "bad.yaml")


def test_flags_override_yaml_override_preset(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 0.002\nbatch_size: 8\n")
    p = argparse.ArgumentParser()
    add_config_args(p, ClimsConfig)
    args = p.parse_args(["--preset", "coco-official", "--config", str(tmp_path / "c.yaml"), "--batch-size", "4",
                         "--resize-long", "64", "96", "--no-amp", "--background", "sky", "sea",
                         "--background-per-class", '{"boat": ["sea"]}'])
    cfg = config_from_args(ClimsConfig, args)
    assert cfg.lr == 0.002 and cfg.batch_size == 4 and cfg.tau == 0.285  # flag > yaml > preset
    assert cfg.resize_long == (64, 96) and cfg.amp is False and cfg.background == ("sky", "sea")
    assert cfg.background_per_class == {"boat": ["sea"]} and cfg.preset == "coco-official"
    # no flags: exactly the defaults
    assert config_from_args(CamConfig, _parse(CamConfig, [])) == CamConfig()
    with pytest.raises(WsclipError, match="batch_size"):
        config_from_args(CamConfig, _parse(CamConfig, ["--batch-size", "0"]))


def _parse(cls, argv):
    p = argparse.ArgumentParser()
    add_config_args(p, cls)
    return p.parse_args(argv)


def test_clip_es_compute_follows_compat():
    """CLIP-ES frozen blocks: bf16 may be chosen by wsclip's auto, never under --compat official (fp32 as the
    public code); an explicit --compute wins."""
    from wsclip.compat import resolve
    from wsclip.label.clip_es import ClipEsConfig

    assert resolve(ClipEsConfig()).compute == "auto"
    assert resolve(ClipEsConfig(compat="official")).compute == "fp32"
    assert resolve(ClipEsConfig(compat="official", compute="bf16")).compute == "bf16"
