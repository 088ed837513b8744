"""Prompt text and sharpness-based prompt selection on a tiny random CLIP."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from PIL import Image

from wsclip.cli import main
from wsclip.errors import WsclipError
from wsclip.label import prompts as P
from wsclip.models.clip import ClipModel, save_clip

TEXT = {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
VISION = {"image_size": 32, "layers": 2, "width": 48, "patch_size": 8, "head_width": 16}
CFG = {"embed_dim": 16, "quick_gelu": True, "vision_cfg": VISION, "text_cfg": TEXT}
TEMPLATES = ["a photo of a {}.", "a clean origami {}.", "itap of a {}.", "a blurry photo of the {}."]
NAMES = ["cat", "dog", "bird avian", "person with clothes,people,human", "boat"]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return ClipModel(CLIP(**CFG), "tiny", CFG)


def test_text_presets_and_synonyms():
    t = P.clip_es_text("voc")
    assert t["template"] == "a clean origami {}."
    assert "a clean origami person with clothes,people,human." in t["foreground"]
    assert len(t["foreground"]) == 20 and len(t["background"]) == 25
    assert len(P.clip_es_text("coco")["background"]) == 23
    custom = P.clip_es_text("mine", classes=[["car", "automobile"], "tree"], template="a {} here.")
    assert custom["foreground"] == ["a car,automobile here.", "a tree here."]
    assert P.fuse_synonyms(["person", "people", " person ", "human"]) == "person,people,human"
    with pytest.raises(WsclipError):
        P.clip_es_text("voc", template="no slot")


def test_read_templates(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# ImageNet-style\na photo of a {}.\n\n a photo of a {}.\nitap of a {}.\n")
    assert P.read_templates(f) == ["a photo of a {}.", "itap of a {}."]
    f.write_text("a photo of a {}.\nbroken template\n")
    with pytest.raises(WsclipError, match=":2:"):
        P.read_templates(f)


def test_sharpness_formula():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(7), size=11)
    direct = sum(np.var(p) / np.mean(p) for p in probs)
    assert P.sharpness(torch.from_numpy(probs)) == pytest.approx(direct, rel=1e-12)
    one_hot = torch.eye(4)[[0, 1]]
    flat = torch.full((2, 4), 0.25)
    assert P.sharpness(one_hot) > P.sharpness(flat) == 0.0


def test_rank_templates_matches_direct_computation(clip):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8) for h, w in [(32, 32), (40, 29), (17, 50)]]
    ranking = P.rank_templates(clip, images, NAMES, TEMPLATES, batch_size=2)
    assert sorted(t for t, _ in ranking) == sorted(TEMPLATES)
    scores = [s for _, s in ranking]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
    # direct: open_clip's own encoders, no cache, numpy statistics
    with torch.no_grad():
        pix = torch.cat([clip.preprocess_tensor(im) for im in images])
        img = F.normalize(clip.model.encode_image(pix), dim=-1)
        for template, score in ranking:
            txt = F.normalize(clip.model.encode_text(clip.tokenize([template.format(n) for n in NAMES])), dim=-1)
            p = (100.0 * img @ txt.T).softmax(-1).double().numpy()
            assert score == pytest.approx(sum(np.var(r) / np.mean(r) for r in p), rel=1e-5)


def test_cli_prompts_select(tmp_path, clip, capsys):
    ckpt = tmp_path / "clip.safetensors"
    save_clip(ckpt, clip, CFG, "tiny")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(2)
    for n in range(3):
        Image.fromarray(rng.integers(0, 256, (24 + n, 30, 3), dtype=np.uint8)).save(imgs / f"{n}.png")
    (tmp_path / "t.txt").write_text("\n".join(TEMPLATES) + "\n")
    (tmp_path / "names.txt").write_text("\n".join(["cat", "dog", "boat"]) + "\n")
    out = tmp_path / "rank.json"
    argv = ["prompts", "select", "--templates", str(tmp_path / "t.txt"), "--images", str(imgs), "--clip", str(ckpt),
            "--dataset", str(tmp_path / "names.txt"), "--device", "cpu", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    got = json.loads(out.read_text())["ranking"]
    assert [r["template"] for r in got][0] in printed.splitlines()[1]  # the winner is rank 1 in the table
    from wsclip.io import read_image

    direct = P.rank_templates(clip, [read_image(p) for p in sorted(imgs.iterdir())], ["cat", "dog", "boat"], TEMPLATES)
    assert [r["template"] for r in got] == [t for t, _ in direct]
    assert main(["prompts", "select", "--templates", str(tmp_path / "none.txt"), "--images", str(imgs),
                 "--clip", str(ckpt)]) == 2
