"""QA-CLIMS corpus: lemmatiser, text sets, JSON and original .npy formats (safe loading),
malformed files, and the `wsclip qa-corpus` builder with a tiny random BLIP VQA model."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from wsclip.cli import main
from wsclip.errors import BadFileError, MissingFileError, UnknownClassError
from wsclip.train.qa_corpus import (
    QACorpus,
    QAEntry,
    bg_texts,
    fg_texts,
    lemmatize,
    load_corpus,
    load_npy_dict,
    mentions_label,
    parse_corpus,
    qa_label_name,
    save_corpus,
    singular,
)
from wsclip.vocab import QA_BACKGROUND_QUESTIONS, QA_FOREGROUND_QUESTIONS, VOC_CLASSES


# ----------------------------------------------------------------------------- lemmatiser and texts
@pytest.mark.parametrize("word,expect", [
    ("boats", "boat"), ("boxes", "box"), ("benches", "bench"), ("dishes", "dish"), ("glasses", "glasses"),
    ("ponies", "pony"), ("movies", "movie"), ("tomatoes", "tomato"), ("shoes", "shoe"), ("horseshoes", "horseshoe"),
    ("leaves", "leaf"), ("waves", "wave"), ("knives", "knife"), ("men", "man"), ("children", "child"),
    ("geese", "goose"), ("buses", "bus"), ("bus", "bus"), ("grass", "grass"), ("tennis", "tennis"),
    ("sheep", "sheep"), ("species", "species"), ("sofas", "sofa"), ("cars", "car"), ("sky", "sky"),
    ("houses", "house"), ("cactus", "cactus"), ("lens", "lens"), ("toys", "toy"),
])
def test_singular(word, expect):
    assert singular(word) == expect


def test_lemmatize_cleans_and_singularises_the_head_noun():
    assert lemmatize("Wooden Boats.") == "wooden boat"
    assert lemmatize("  trees  and   bushes!") == "trees and bush"
    assert lemmatize("?!") == ""
    assert lemmatize("man's bikes") == "man's bike"


def test_fg_texts_append_the_label_unless_named():
    assert fg_texts(["jet", "jet aeroplane", "", "aeroplanes"], "aeroplane") == [
        "jet aeroplane", "jet aeroplane", "aeroplane", "aeroplanes aeroplane"]
    # synonym exceptions: table / monitor / plant count for labels containing them
    assert fg_texts(["coffee table", "desk"], "dining table") == ["coffee table", "desk dining table"]
    assert fg_texts(["computer monitor"], "tv monitor") == ["computer monitor"]
    assert fg_texts(["plant"], "potted plant") == ["plant"]
    # whole words only ("cat" is not in "catamaran"), and an exception word needs the label to contain it
    assert fg_texts(["catamaran"], "cat") == ["catamaran cat"]
    assert not mentions_label("table", "chair")


def test_bg_texts_deduplicate_drop_label_and_cap():
    answers = ["sky", "Sky", "cloud", "aeroplane", "", "sky", "aero plane", "runway"]
    assert bg_texts(answers, "aeroplane") == ["sky", "cloud", "runway"]
    many = [f"thing{i}" for i in range(15)]
    assert bg_texts(many, "cat") == many[:10]
    assert bg_texts(many, "cat", limit=3) == many[:3]


def test_qa_label_names():
    assert qa_label_name("diningtable") == "dining table"
    assert qa_label_name("tvmonitor") == "tv monitor"
    assert qa_label_name("hair_drier") == "hair drier"
    assert qa_label_name("person") == "person"


# ----------------------------------------------------------------------------- formats
def _entry(label):
    fg_qa = [(q.format(label), f"{label}s") for q in QA_FOREGROUND_QUESTIONS]
    bg_qa = [(q.format(label), a) for q, a in zip(QA_BACKGROUND_QUESTIONS, ["sky", "floor"] * 5)]
    return QAEntry([lemmatize(a) for _, a in fg_qa], [a for _, a in bg_qa], fg_qa, bg_qa)


def _original_dicts(images: dict[str, list[str]]):
    """The original QA-CLIMS layout: two dicts with 'vqa' pairs and 'answers' (plus an extra question)."""
    fg, bg = {}, {}
    for image_id, labels in images.items():
        fg[image_id], bg[image_id] = {}, {}
        for lb in labels:
            e = _entry(lb)
            fg[image_id][lb] = {"vqa": e.fg_qa + [(f"what color is the {lb}?", "red")],
                                "answers": e.fg_answers + ["red"]}
            bg[image_id][lb] = {"vqa": e.bg_qa, "answers": e.bg_answers}
    return fg, bg


def test_json_round_trip_and_class_resolution(tmp_path):
    corpus = QACorpus({"2007_000032": {"dining table": _entry("dining table"), "person": _entry("person")}},
                      {"model": "tiny"})
    save_corpus(tmp_path / "c.json", corpus)
    back = load_corpus(tmp_path / "c.json")
    assert back.images == corpus.images and back.meta["model"] == "tiny"
    resolved = back.resolve(VOC_CLASSES)
    assert set(resolved) == {("2007_000032", VOC_CLASSES.index("diningtable")), ("2007_000032", 14)}
    with pytest.raises(UnknownClassError, match="dinning"):
        QACorpus({"x": {"dinning table": _entry("x")}}).resolve(VOC_CLASSES)


def test_original_npy_pair_loads_like_json_in_either_order(tmp_path):
    fg, bg = _original_dicts({"2008_000032": ["dining table", "cat"], "2008_000033": ["tv monitor"]})
    np.save(tmp_path / "fg.npy", fg, allow_pickle=True)
    np.save(tmp_path / "bg.npy", bg, allow_pickle=True)
    a = load_corpus([tmp_path / "fg.npy", tmp_path / "bg.npy"])
    b = load_corpus([tmp_path / "bg.npy", tmp_path / "fg.npy"])  # swapped: recognised by the questions
    assert a.images == b.images
    e = a.images["2008_000032"]["dining table"]
    assert e == _entry("dining table")  # the extra colour question's answer is dropped
    assert len(a) == 3
    # converting to JSON keeps everything
    save_corpus(tmp_path / "c.json", a)
    assert load_corpus(tmp_path / "c.json").images == a.images


def test_npy_loading_never_runs_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    np.save(tmp_path / "evil.npy", np.array({"x": Evil()}, dtype=object), allow_pickle=True)
    with pytest.raises(BadFileError, match="refusing to load"):
        load_npy_dict(tmp_path / "evil.npy")
    assert not marker.exists()
    np.save(tmp_path / "nums.npy", np.arange(4))
    with pytest.raises(BadFileError, match="not a pickled dict"):
        load_npy_dict(tmp_path / "nums.npy")
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(BadFileError):
        load_npy_dict(tmp_path / "junk.npy")


@pytest.mark.parametrize("obj,where", [
    ([1, 2], "top level"),
    ({"images": []}, "\"images\""),
    ({"format": "other", "images": {}}, "\"format\""),
    ({"version": 9, "images": {}}, "version 9"),
    ({"images": {"a": []}}, 'images["a"]'),
    ({"images": {"a": {"cat": {"fg": ["x"]}}}}, '["cat"]'),
    ({"images": {"a": {"cat": {"fg": {"qa": []}, "bg": []}}}}, '["cat"].fg'),
    ({"images": {"a": {"cat": {"fg": ["x", 3], "bg": []}}}}, "fg[1]"),
    ({"images": {"a": {"cat": {"fg": {"answers": ["x"], "qa": [["q"]]}, "bg": []}}}}, "fg.qa[0]"),
])
def test_malformed_json_corpus_names_the_field(tmp_path, obj, where):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(BadFileError) as info:
        load_corpus(path)
    assert where in str(info.value) and "malformed QA corpus" in str(info.value)


def test_wrong_files_are_clear_errors(tmp_path):
    with pytest.raises(MissingFileError, match="wsclip qa-corpus"):
        load_corpus(tmp_path / "none.json")
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(BadFileError, match="not valid JSON"):
        load_corpus(tmp_path / "c.json")
    np.save(tmp_path / "fg.npy", {"a": {}}, allow_pickle=True)
    with pytest.raises(BadFileError, match="two"):
        load_corpus(tmp_path / "fg.npy")
    assert parse_corpus({"images": {}}).images == {}


# ----------------------------------------------------------------------------- builder
WORDS = ("what is the a of in photo kind type this also called usually another word name for above under "
         "behind around next to left right side scene environment place sky boats boat water trees tree "
         "cat cats dog horses person people table chairs plant monitor bus buses aeroplane bottle").split()


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    """A randomly initialised tiny BLIP VQA model + processor saved with save_pretrained (offline)."""
    transformers = pytest.importorskip("transformers")
    import torch

    folder = tmp_path_factory.mktemp("tiny_blip")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "?", "'"] + WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    proc = transformers.BlipProcessor(
        image_processor=transformers.BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    cfg = transformers.BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, encoder_hidden_size=32,
                         pad_token_id=0, bos_token_id=5, sep_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
    )
    torch.manual_seed(0)
    model = transformers.BlipForQuestionAnswering(cfg).eval()
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def test_batched_answers_equal_one_question_at_a_time(tiny_blip, voc14):
    import torch
    from wsclip.io import read_image
    from wsclip.train.qa_corpus import VQAAnswerer, _load_vqa

    proc, model = _load_vqa(tiny_blip, "cpu")
    ask = VQAAnswerer(proc, model, num_beams=1, max_new_tokens=6)
    images = [np.array(read_image(voc14 / "JPEGImages" / f"{i}.jpg")) for i in ("2007_000033", "2007_000332")]
    questions = ["what is the boat?", "what is above the dining table in the photo?", "what is next to the cat?"]
    batched = ask(images, questions, [0, 1, 1])
    single = []
    for q, i in zip(questions, [0, 1, 1]):
        inputs = proc(images=images[i], text=q, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, num_beams=1, max_new_tokens=6, min_length=1, do_sample=False)
        single.append(proc.tokenizer.decode(out[0], skip_special_tokens=True).strip())
    assert batched == single
    assert all(isinstance(a, str) for a in batched)


def test_qa_corpus_command_builds_and_resumes(tiny_blip, voc14, tmp_path, capsys):
    out = tmp_path / "corpus.json"
    base = ["qa-corpus", "--data", str(voc14), "--split", "val", "--model", str(tiny_blip), "--out", str(out),
            "--device", "cpu", "--max-new-tokens", "4"]
    assert main(base + ["--limit", "2", "--images-per-batch", "2", "--num-beams", "2"]) == 0
    assert "wrote" in capsys.readouterr().out
    obj = json.loads(out.read_text())
    assert obj["format"] == "wsclip-qa-corpus" and obj["complete"] is True
    labels = json.loads((voc14 / "labels.json").read_text())
    ids = [ln.strip() for ln in (voc14 / "val.txt").read_text().splitlines() if ln.strip()][:2]
    assert sorted(obj["images"]) == sorted(ids)
    corpus = load_corpus(out)
    for image_id in ids:
        expect = {VOC_CLASSES[c - 1] for c in labels[image_id]}
        assert set(corpus.images[image_id]) == expect
        for cls, e in corpus.images[image_id].items():
            name = qa_label_name(cls)
            assert [q for q, _ in e.fg_qa] == [q.format(name) for q in QA_FOREGROUND_QUESTIONS]
            assert [q for q, _ in e.bg_qa] == [q.format(name) for q in QA_BACKGROUND_QUESTIONS]
            assert e.fg_answers == [lemmatize(a) for _, a in e.fg_qa]
            assert e.bg_answers == [lemmatize(a) for _, a in e.bg_qa]
    assert set(corpus.resolve(VOC_CLASSES))  # the labels map back onto the VOC classes

    # resume: finished images are kept as they are (a marker survives), the next one is added
    first = ids[0]
    cls0 = next(iter(obj["images"][first]))
    obj["images"][first][cls0]["fg"]["answers"][0] = "sentinel"
    out.write_text(json.dumps(obj))
    assert main(base + ["--limit", "3", "--num-beams", "1"]) == 0
    again = json.loads(out.read_text())
    assert len(again["images"]) == 3
    assert again["images"][first][cls0]["fg"]["answers"][0] == "sentinel"


def test_qa_corpus_missing_model_folder(tmp_path, voc14, capsys):
    pytest.importorskip("transformers")
    rc = main(["qa-corpus", "--data", str(voc14), "--split", "val", "--model", str(tmp_path / "no_model"),
               "--out", str(tmp_path / "c.json"), "--device", "cpu"])
    assert rc == 2
    assert "VQA model folder not found" in capsys.readouterr().err
