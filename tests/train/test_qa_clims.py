"""QA-CLIMS training on the synthetic world with a tiny random CLIP and the tiny backbone: text features
as specified, training from a JSON corpus (CLI) and from the original .npy pair (same weights),
missing pairs and malformed corpora as clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wsclip.cli import main
from wsclip.config import QaClimsConfig, from_preset
from wsclip.models.camnet import load_camnet
from wsclip.train.qa_corpus import QACorpus, QAEntry, save_corpus
from wsclip.vocab import QA_BACKGROUND_QUESTIONS, QA_FOREGROUND_QUESTIONS

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
FG = ["kind", "big", "old", "{}", "small", "red"]
BG = ["water", "sky", "grass", "water", "{}", "road", "tree", "sky", "rails", "cloud"]


def _answers(i: int, name: str) -> tuple[list[str], list[str]]:
    fg = [a.format(name) if "{}" in a else f"{a}{i % 3}" for a in FG]
    bg = [a.format(name) for a in BG]
    return fg, bg


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """8 synthetic images in VOC layout, a tiny random CLIP, and a full corpus as JSON and as the .npy pair."""
    from job_helpers import synth_world_and_clip

    from wsclip.data import open_dataset

    root = synth_world_and_clip(tmp_path_factory.mktemp("qa"), 8, TINY_CLIP_CFG, "tiny-qa")
    ds = open_dataset(str(root / "synth"), split="train", masks=False)
    images, fg_npy, bg_npy = {}, {}, {}
    for i, image_id in enumerate(ds.ids):
        images[image_id], fg_npy[image_id], bg_npy[image_id] = {}, {}, {}
        for k in ds.label_vector(i).nonzero().flatten().tolist():
            name = ds.classes[k]
            fg, bg = _answers(i, name)
            images[image_id][name] = QAEntry(fg, bg)
            fg_npy[image_id][name] = {"vqa": [(q.format(name), a) for q, a in zip(QA_FOREGROUND_QUESTIONS, fg)],
                                      "answers": fg}
            bg_npy[image_id][name] = {"vqa": [(q.format(name), a) for q, a in zip(QA_BACKGROUND_QUESTIONS, bg)],
                                      "answers": bg}
    save_corpus(root / "corpus.json", QACorpus(images))
    np.save(root / "fg.npy", fg_npy, allow_pickle=True)
    np.save(root / "bg.npy", bg_npy, allow_pickle=True)
    return root


@pytest.fixture(scope="module")
def clip(world):
    from wsclip.train.clims import load_frozen_clip

    return load_frozen_clip(str(world / "clip.safetensors"), "cpu")


def _cfg(world, out, **kw):
    base = dict(data=str(world / "synth"), split="train", out=str(out), clip=str(world / "clip.safetensors"),
                batch_size=4, max_steps=2, crop=64, resize_long=(48, 80), num_workers=0, ckpt_every=0,
                log_every=1, device="cpu", seed=0, lr=0.05, kernel_backend="torch",
                corpus=(str(world / "corpus.json"),))
    base.update(kw)
    return from_preset(QaClimsConfig, "synth", **base)


def test_text_table_follows_the_spec(clip):
    from wsclip.train.qa_clims import build_text_table

    names = ["boat", "dining table"]
    entries = {
        ("a", 0): QAEntry(["sail", "boat", ""], ["water", "Water", "boat", "sky"]),
        ("a", 1): QAEntry(["coffee table", "wooden"], ["dining table"]),  # no background left: skipped later
        ("b", 0): QAEntry([], ["sea"]),
    }
    table = build_text_table(clip, entries, names, "a photo of {}.", 0.5, 10)
    e = lambda texts: clip.encode_text([f"a photo of {t}." for t in texts])  # noqa: E731
    rows = table.lookup(["a", "b"], torch.tensor([[0, 0], [0, 1], [1, 0]]))
    t_fg, t_bg, mask = table.gather(rows)
    want0 = 0.5 * e(["boat"])[0] + 0.5 * e(["sail boat", "boat", "boat"]).mean(0)
    want1 = 0.5 * e(["dining table"])[0] + 0.5 * e(["coffee table", "wooden dining table"]).mean(0)
    torch.testing.assert_close(t_fg[0], want0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t_fg[1], want1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t_fg[2], e(["boat"])[0], rtol=1e-5, atol=1e-6)  # no answers: the label alone
    assert mask.tolist() == [[True, True], [False, False], [True, False]]
    torch.testing.assert_close(t_bg[0], e(["water", "sky"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t_bg[2, 0], e(["sea"])[0], rtol=1e-5, atol=1e-6)
    # pairs the corpus lacks: an error by default, the label-only row (no contrast) with "skip"
    from wsclip.train.qa_clims import MissingPairError

    with pytest.raises(MissingPairError, match="'c'"):
        table.lookup(["c"], torch.tensor([[0, 1]]))
    table.missing = "skip"
    t, _, m = table.gather(table.lookup(["c"], torch.tensor([[0, 1]])))
    torch.testing.assert_close(t[0], e(["dining table"])[0], rtol=1e-5, atol=1e-6)
    assert not m.any()


def test_trains_from_json_via_cli_and_from_npy_pair_identically(world, clip, tmp_path, capsys):
    from wsclip.train.qa_clims import train_qa_clims

    out_json = tmp_path / "json"
    argv = ["train", "qa-clims", "--preset", "synth", "--data", str(world / "synth"), "--split", "train",
            "--out", str(out_json), "--clip", str(world / "clip.safetensors"), "--corpus", str(world / "corpus.json"),
            "--batch-size", "4", "--max-steps", "2", "--crop", "64", "--resize-long", "48", "80",
            "--num-workers", "0", "--ckpt-every", "0", "--log-every", "1", "--device", "cpu", "--seed", "0",
            "--lr", "0.05", "--kernel-backend", "torch"]
    assert main(argv) == 0
    assert "saved" in capsys.readouterr().out
    npy = train_qa_clims(_cfg(world, tmp_path / "npy", corpus=(str(world / "fg.npy"), str(world / "bg.npy"))),
                         clip=clip)
    a, meta = load_camnet(out_json / "camnet.safetensors")
    b, _ = load_camnet(npy)
    assert meta["trained"] == "qa-clims" and meta["classes"] == ["boat", "train", "bird", "car", "cow", "plane"]
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        # the JSON corpus is embedded here, the .npy pair was embedded in another batch: float
        # rounding of the text features (1e-7) grows over two SGD steps, most with one thread
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    torch.manual_seed(0)  # training seeds 0 right before building the network
    from wsclip.models.camnet import build_camnet

    init = build_camnet(a.backbone_name, 6)  # the synth preset's backbone, freshly initialised
    assert init.classifier.weight.shape == a.classifier.weight.shape
    assert not torch.allclose(a.classifier.weight, init.classifier.weight)
    log = [json.loads(x) for x in (out_json / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    for r in log:
        assert r["frc"] > 0 and r["brc"] > 0 and 0 < r["reg"] < 1
        assert r["loss"] == pytest.approx(10 * r["frc"] + 8 * r["brc"] + 0.2 * r["reg"], rel=1e-5)


def test_missing_pairs_fail_early_or_are_skipped(world, clip, tmp_path):
    from wsclip.train.qa_clims import MissingPairError, train_qa_clims
    from wsclip.train.qa_corpus import load_corpus

    corpus = load_corpus(world / "corpus.json")
    dropped = sorted(corpus.images)[0]
    del corpus.images[dropped]
    with pytest.raises(MissingPairError, match=dropped):
        train_qa_clims(_cfg(world, tmp_path / "a"), clip=clip, corpus=corpus)
    assert not (tmp_path / "a" / "log.jsonl").exists()
    final = train_qa_clims(_cfg(world, tmp_path / "b", missing="skip", max_steps=1), clip=clip, corpus=corpus)
    assert final.is_file()


@pytest.mark.parametrize("content,message", [
    ('{"images": {"train_000000": {"boat": {"fg": ["x"]}}}}', "malformed QA corpus"),
    ('{"images": {"train_000000": {"sub": {"fg": [], "bg": []}}}}', "not a class of the dataset"),
    ("[1, 2", "not valid JSON"),
])
def test_malformed_corpus_is_a_clear_cli_error(world, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    rc = main(["train", "qa-clims", "--preset", "synth", "--data", str(world / "synth"), "--split", "train",
               "--out", str(tmp_path / "o"), "--clip", str(world / "clip.safetensors"), "--corpus", str(bad),
               "--device", "cpu", "--num-workers", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
