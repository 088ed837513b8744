"""QA-CLIMS VQA corpus (METHODS.md section 4): file formats, answer cleaning, text sets, builder.

A corpus holds, for every (image, positive class), the answers of a VQA model to the 6
foreground and 10 background questions of `wsclip.vocab`. wsclip's own format is JSON:

    {
      "format": "wsclip-qa-corpus", "version": 1,
      "model": "<the VQA model used, informational>",
      "questions": {"fg": [...], "bg": [...]},            # optional, informational
      "complete": true,                                    # false while a build is running
      "images": {
        "2007_000032": {
          "aeroplane": {
            "fg": {"qa": [["What kind of aeroplane is in the photo?", "jets"], ...],
                   "answers": ["jet", ...]},
            "bg": {"qa": [["what is above the aeroplane?", "sky"], ...],
                   "answers": ["sky", ...]}
          }
        }
      }
    }

Only "images" and, per label, "fg"/"bg" "answers" (lists of strings: the cleaned
answers) are required; "qa" keeps the raw (question, answer) pairs; a bare list is
accepted in place of {"answers": [...]}. Label keys are class names of the dataset,
compared without case, spaces, '_' and '-' ("dining table" = "diningtable").

The original QA-CLIMS release instead ships two `.npy` files (foreground and background),
each a pickled dict {image: {label: {"vqa": [(q, a), ...], "answers": [...]}}}.
`load_corpus` reads them too, through a restricted unpickler that only rebuilds numpy
arrays and plain Python containers (a pickle naming any other class is refused).

Text sets (`fg_texts`, `bg_texts`) follow METHODS.md: a foreground answer lacking the
label gets the label appended (answers containing "table", "monitor" or "plant" count for
labels having that word, `QA_SYNONYM_EXCEPTIONS`); background texts are the de-duplicated
answers minus the label, at most 10. Label and answer tests are on whole words (the public
code tests substrings, so "cat" counted as present in "catamaran").
"""

from __future__ import annotations

import io
import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from wsclip.errors import BadFileError, MissingFileError, UnknownClassError
from wsclip.vocab import QA_BACKGROUND_QUESTIONS, QA_FOREGROUND_QUESTIONS, QA_SYNONYM_EXCEPTIONS

FORMAT = "wsclip-qa-corpus"
VERSION = 1
#: background texts kept per (image, class) pair
MAX_BACKGROUND_TEXTS = 10
#: readable names the VQA questions and prompts use for VOC's joined class names
READABLE_NAMES: dict[str, str] = {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}


# ============================================================================ lemmatiser
#: irregular plurals (checked on the last word of an answer)
_IRREGULAR: dict[str, str] = {
    "men": "man", "women": "woman", "children": "child", "feet": "foot", "teeth": "tooth",
    "geese": "goose", "mice": "mouse", "oxen": "ox", "people": "people", "dice": "die",
    "knives": "knife", "leaves": "leaf", "wolves": "wolf", "shelves": "shelf", "halves": "half",
    "calves": "calf", "lives": "life", "wives": "wife", "loaves": "loaf", "thieves": "thief",
    "scarves": "scarf", "hooves": "hoof", "elves": "elf", "selves": "self",
    "buses": "bus", "gases": "gas", "lenses": "lens", "cacti": "cactus", "fungi": "fungus",
    "criteria": "criterion", "phenomena": "phenomenon", "bacteria": "bacterium",
    "indices": "index", "matrices": "matrix", "vertices": "vertex", "axes": "axis",
}
#: words that end in s but are not plurals (or whose plural is the same word)
_INVARIANT: frozenset[str] = frozenset(
    "sheep fish deer moose series species aircraft news pants jeans shorts scissors clothes "
    "trousers goggles glasses sunglasses headphones electronics athletics physics mathematics "
    "tennis lens gas atlas canvas christmas texas alias bias pampas chaos corps plus bus "
    "always perhaps this thus yes his hers its ours yours whereas overalls pajamas pyjamas "
    "binoculars tongs pliers stairs outdoors indoors downstairs upstairs savannas".split()
)
#: words in -ies that singularise to -ie, and in -oes to -oe
_IE_WORDS: frozenset[str] = frozenset(
    "movies cookies pies ties lies zombies hippies brownies selfies rookies calories "
    "goalies freebies magpies pixies prairies boogies collies".split()
)
_OE_WORDS: frozenset[str] = frozenset("shoes toes tiptoes canoes hoes oboes floes foes".split())


def singular(word: str) -> str:
    """Singular of an English noun by rules and exceptions ("boxes" -> "box", "ponies" -> "pony").

    Rules, in order: irregular table; invariant words; words of at most 3 letters and
    endings -ss, -us, -is unchanged; -ies -> -y (except the -ie words); -oes -> -o (except
    shoe, toe, canoe ...); -sses, -xes, -zzes, -ches, -shes drop "es"; otherwise a final
    "s" is dropped. Words not ending in "s" are returned as they are.
    """
    w = word.lower()
    if w in _IRREGULAR:
        return _IRREGULAR[w]
    if w in _INVARIANT or len(w) <= 3 or not w.endswith("s") or w.endswith(("ss", "us", "is")):
        return w
    if w.endswith("ies"):
        return w[:-1] if w in _IE_WORDS else w[:-3] + "y"
    if w.endswith("oes"):
        return w[:-1] if w in _OE_WORDS or w.endswith("shoes") else w[:-2]
    if w.endswith(("sses", "xes", "zzes", "ches", "shes")):
        return w[:-2]
    return w[:-1]


_PUNCT = re.compile(r"[^\w\s'-]+")


def clean_answer(answer: str) -> str:
    """Lower-case, strip punctuation, collapse spaces; '' for non-answers."""
    text = _PUNCT.sub(" ", str(answer).lower())
    return " ".join(text.split())


def lemmatize(answer: str) -> str:
    """Cleaned answer with its last word (the head noun of a short VQA answer) made singular.

    A small rule-based stand-in for WordNet's noun lemmatiser that the public QA-CLIMS code
    uses (nltk is not a dependency): "Wooden Boats." -> "wooden boat", "grass" -> "grass".
    """
    words = clean_answer(answer).split()
    if not words:
        return ""
    words[-1] = singular(words[-1])
    return " ".join(words)


# ============================================================================ names and text sets
def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", str(name).lower())


def qa_label_name(class_name: str) -> str:
    """The readable name used in questions and prompts: 'diningtable' -> 'dining table', 'hair_drier' -> 'hair drier'."""
    return READABLE_NAMES.get(class_name, class_name.replace("_", " "))


def _has_word(text: str, phrase: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(phrase)}(?![\w])", text) is not None


def mentions_label(answer: str, label: str) -> bool:
    """Whether an answer names the label: the label as whole words, or an exception word it contains.

    `QA_SYNONYM_EXCEPTIONS` ('table', 'monitor', 'plant'): "coffee table" counts for
    "dining table", "computer monitor" for "tv monitor", "plant" for "potted plant".
    """
    answer, label = answer.lower(), label.lower()
    if _has_word(answer, label):
        return True
    label_words = label.split()
    return any(w in label_words and _has_word(answer, w) for w in QA_SYNONYM_EXCEPTIONS)


def fg_texts(answers: Sequence[str], label: str) -> list[str]:
    """Foreground answer texts: each answer, with " {label}" appended when it does not name the label.

    An empty answer becomes the label itself. ("jet", "aeroplane") -> "jet aeroplane".
    """
    out = []
    for a in answers:
        a = " ".join(str(a).split())
        if not a:
            out.append(label)
        elif mentions_label(a, label):
            out.append(a)
        else:
            out.append(f"{a} {label}")
    return out


def bg_texts(answers: Sequence[str], label: str, limit: int = MAX_BACKGROUND_TEXTS) -> list[str]:
    """Background texts: the answers de-duplicated (first occurrence kept), minus empty ones and the label, at most `limit`."""
    seen, out = set(), []
    skip = {_norm(label)}
    for a in answers:
        a = " ".join(str(a).split())
        key = a.lower()
        if not a or key in seen or _norm(a) in skip:
            continue
        seen.add(key)
        out.append(a)
    return out[:limit]


# ============================================================================ data model
@dataclass
class QAEntry:
    """Answers for one (image, label): cleaned answers and, when known, the raw (question, answer) pairs."""

    fg_answers: list[str]
    bg_answers: list[str]
    fg_qa: list[tuple[str, str]] = field(default_factory=list)
    bg_qa: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "fg": {"qa": [list(p) for p in self.fg_qa], "answers": list(self.fg_answers)},
            "bg": {"qa": [list(p) for p in self.bg_qa], "answers": list(self.bg_answers)},
        }


@dataclass
class QACorpus:
    """images: {image id: {label as written in the file: QAEntry}}; meta: the file's other fields."""

    images: dict[str, dict[str, QAEntry]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return sum(len(v) for v in self.images.values())

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            **{k: v for k, v in self.meta.items() if k not in ("format", "version", "images")},
            "images": {i: {lb: e.to_json() for lb, e in labels.items()} for i, labels in self.images.items()},
        }

    def resolve(self, classes: Sequence[str], ids: Iterable[str] | None = None) -> dict[tuple[str, int], QAEntry]:
        """{(image id, 0-based class index): entry}, matching label keys to `classes` by normalised name.

        With `ids`, only those images are resolved (labels of other images are not checked).
        """
        keep = None if ids is None else set(map(str, ids))
        index = {}
        for k, c in enumerate(classes):
            index.setdefault(_norm(c), k)
            index.setdefault(_norm(qa_label_name(c)), k)
        out: dict[tuple[str, int], QAEntry] = {}
        for image_id, labels in self.images.items():
            if keep is not None and str(image_id) not in keep:
                continue
            for label, entry in labels.items():
                k = index.get(_norm(label))
                if k is None:
                    import difflib

                    close = difflib.get_close_matches(label, list(classes), n=3)
                    hint = f" (did you mean {', '.join(close)}?)" if close else ""
                    raise UnknownClassError(
                        f"{self.source or 'QA corpus'}: image '{image_id}' has label '{label}', which is not a "
                        f"class of the dataset{hint}; classes: {', '.join(classes)}"
                    )
                out[(str(image_id), k)] = entry
        return out


def save_corpus(path, corpus: QACorpus) -> None:
    """Write a corpus as wsclip JSON, atomically."""
    from wsclip.io import atomic_write_text

    atomic_write_text(path, json.dumps(corpus.to_json(), ensure_ascii=False, indent=1) + "\n")


# ============================================================================ reading
def _bad(where: str, what: str) -> BadFileError:
    return BadFileError(f"malformed QA corpus {where}: {what}. See wsclip.train.qa_corpus for the format")


def _str_list(value, where: str) -> list[str]:
    if not isinstance(value, (list, tuple)):
        raise _bad(where, f"expected a list of strings, got {type(value).__name__}")
    out = []
    for n, v in enumerate(value):
        if not isinstance(v, str):
            raise _bad(f"{where}[{n}]", f"expected a string, got {type(v).__name__} {v!r}")
        out.append(v)
    return out


def _qa_list(value, where: str) -> list[tuple[str, str]]:
    if not isinstance(value, (list, tuple)):
        raise _bad(where, f"expected a list of [question, answer] pairs, got {type(value).__name__}")
    out = []
    for n, p in enumerate(value):
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(s, str) for s in p)):
            raise _bad(f"{where}[{n}]", f"expected a [question, answer] pair of strings, got {p!r}")
        out.append((p[0], p[1]))
    return out


def _side(value, where: str) -> tuple[list[str], list[tuple[str, str]]]:
    if isinstance(value, (list, tuple)):
        return _str_list(value, where), []
    if not isinstance(value, dict):
        raise _bad(where, f"expected {{\"answers\": [...]}} or a list of answers, got {type(value).__name__}")
    if "answers" not in value:
        raise _bad(where, "has no \"answers\" list")
    qa = _qa_list(value["qa"], f"{where}.qa") if value.get("qa") is not None else []
    return _str_list(value["answers"], f"{where}.answers"), qa


def parse_corpus(obj, source: str = "") -> QACorpus:
    """Validate a decoded wsclip JSON corpus; BadFileError naming the first wrong field."""
    where = source or "QA corpus"
    if not isinstance(obj, dict):
        raise _bad(where, f"top level is a {type(obj).__name__}, expected an object with \"images\"")
    if obj.get("format", FORMAT) != FORMAT:
        raise _bad(where, f"\"format\" is {obj.get('format')!r}, expected {FORMAT!r}")
    if obj.get("version", VERSION) != VERSION:
        raise _bad(where, f"version {obj.get('version')!r} is not supported (this wsclip reads version {VERSION})")
    images = obj.get("images")
    if not isinstance(images, dict):
        raise _bad(where, "has no \"images\" object ({image id: {label: {\"fg\": ..., \"bg\": ...}}})")
    out: dict[str, dict[str, QAEntry]] = {}
    for image_id, labels in images.items():
        w = f'{where}: images["{image_id}"]'
        if not isinstance(labels, dict):
            raise _bad(w, f"expected an object {{label: answers}}, got {type(labels).__name__}")
        out[str(image_id)] = {}
        for label, entry in labels.items():
            wl = f'{w}["{label}"]'
            if not isinstance(entry, dict) or "fg" not in entry or "bg" not in entry:
                raise _bad(wl, "expected an object with \"fg\" and \"bg\" answers")
            fg, fg_qa = _side(entry["fg"], f"{wl}.fg")
            bg, bg_qa = _side(entry["bg"], f"{wl}.bg")
            out[str(image_id)][str(label)] = QAEntry(fg, bg, fg_qa, bg_qa)
    meta = {k: v for k, v in obj.items() if k != "images"}
    return QACorpus(out, meta, source)


# ---------------------------------------------------------------------------- safe .npy
_SAFE_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
}


class _DataOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and Python containers only; any other global is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy"):
            import numpy as np

            if name in ("ndarray", "dtype"):
                return getattr(np, name)
            try:
                from numpy._core import multiarray
            except ImportError:  # numpy < 2
                from numpy.core import multiarray
            return getattr(multiarray, name)
        return super().find_class(module, name)


def load_npy_dict(path) -> dict:
    """A dict saved with np.save(path, dict) (a pickled 0-d object array), loaded without running code."""
    import numpy as np
    from numpy.lib import format as npformat

    path = Path(path)
    try:
        with open(path, "rb") as f:
            version = npformat.read_magic(f)
            if version == (1, 0):
                _, _, dtype = npformat.read_array_header_1_0(f)
            else:
                _, _, dtype = npformat.read_array_header_2_0(f)
            if dtype != np.dtype(object):
                raise BadFileError(f"{path} holds a {dtype} array, not a pickled dict of VQA answers")
            obj = _DataOnlyUnpickler(io.BufferedReader(f)).load()
    except BadFileError:
        raise
    except pickle.UnpicklingError as exc:
        raise BadFileError(f"{path}: {exc}; only plain data (dicts, lists, strings, numpy arrays) is accepted") from exc
    except (ValueError, EOFError, OSError, TypeError, AttributeError) as exc:
        raise BadFileError(f"{path} is not a readable .npy file: {exc}") from exc
    if isinstance(obj, np.ndarray) and obj.shape == () and obj.dtype == object:
        obj = obj.item()
    if not isinstance(obj, dict):
        raise BadFileError(f"{path} holds a {type(obj).__name__}, expected a dict {{image: {{label: ...}}}}")
    return obj


def _template_regex(templates: Sequence[str]) -> re.Pattern:
    parts = [re.escape(t.lower()).replace(re.escape("{}"), ".+") for t in templates]
    return re.compile("^(?:" + "|".join(parts) + ")$")


_FG_RE = _template_regex(QA_FOREGROUND_QUESTIONS)
_BG_RE = _template_regex(QA_BACKGROUND_QUESTIONS)


def _npy_side(obj: dict, path: Path, wanted: re.Pattern) -> dict[str, dict[str, tuple[list, list]]]:
    """{image: {label: (answers, qa pairs)}} from one original file; answers to other questions dropped."""
    out: dict[str, dict[str, tuple[list, list]]] = {}
    for image_id, labels in obj.items():
        w = f'{path}: ["{image_id}"]'
        if not isinstance(labels, dict):
            raise _bad(w, f"expected a dict {{label: {{'vqa', 'answers'}}}}, got {type(labels).__name__}")
        out[str(image_id)] = {}
        for label, entry in labels.items():
            wl = f'{w}["{label}"]'
            if not isinstance(entry, dict) or "answers" not in entry:
                raise _bad(wl, "expected a dict with 'answers' (and 'vqa')")
            answers = _str_list(entry["answers"], f"{wl}['answers']")
            qa = _qa_list(entry.get("vqa") or [], f"{wl}['vqa']")
            if qa and len(qa) == len(answers) and any(wanted.match(q.lower()) for q, _ in qa):
                keep = [n for n, (q, _) in enumerate(qa) if wanted.match(q.lower())]
                answers, qa = [answers[n] for n in keep], [qa[n] for n in keep]
            out[str(image_id)][str(label)] = ([str(a) for a in answers], [(str(q), str(a)) for q, a in qa])
    return out


def _first_question(obj: dict) -> str | None:
    for labels in obj.values():
        for entry in labels.values() if isinstance(labels, dict) else ():
            for p in (entry.get("vqa") or []) if isinstance(entry, dict) else ():
                if isinstance(p, (list, tuple)) and p and isinstance(p[0], str):
                    return p[0].lower()
    return None


def load_npy_corpus(fg_path, bg_path) -> QACorpus:
    """The original QA-CLIMS pair of `.npy` files (foreground, background) as a QACorpus.

    When the files store their questions, only answers to the QA-CLIMS questions are kept,
    and swapped files (background first) are put right.
    """
    fg_path, bg_path = Path(fg_path), Path(bg_path)
    fg, bg = load_npy_dict(fg_path), load_npy_dict(bg_path)
    q_fg, q_bg = _first_question(fg), _first_question(bg)
    if q_fg and q_bg and _BG_RE.match(q_fg) and _FG_RE.match(q_bg):
        fg, bg, fg_path, bg_path = bg, fg, bg_path, fg_path
    fg_side = _npy_side(fg, fg_path, _FG_RE)
    bg_side = _npy_side(bg, bg_path, _BG_RE)
    images: dict[str, dict[str, QAEntry]] = {}
    for image_id in dict.fromkeys([*fg_side, *bg_side]):
        images[image_id] = {}
        for label in dict.fromkeys([*fg_side.get(image_id, {}), *bg_side.get(image_id, {})]):
            fa, fq = fg_side.get(image_id, {}).get(label, ([], []))
            ba, bq = bg_side.get(image_id, {}).get(label, ([], []))
            images[image_id][label] = QAEntry(fa, ba, fq, bq)
    return QACorpus(images, {"converted_from": [str(fg_path), str(bg_path)]}, f"{fg_path} + {bg_path}")


def load_corpus(paths: str | Path | Sequence[str | Path]) -> QACorpus:
    """Read a corpus: one wsclip JSON file, or the original (foreground, background) `.npy` pair."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.is_file():
            raise MissingFileError(f"QA corpus not found: {p}; build one with `wsclip qa-corpus`")
    if len(paths) == 1 and paths[0].suffix.lower() != ".npy":
        try:
            obj = json.loads(paths[0].read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadFileError(f"QA corpus {paths[0]} is not valid JSON: {exc}") from exc
        return parse_corpus(obj, str(paths[0]))
    if len(paths) == 2 and all(p.suffix.lower() == ".npy" for p in paths):
        return load_npy_corpus(paths[0], paths[1])
    if len(paths) == 1:
        raise BadFileError(
            f"{paths[0]} is one file of the original QA-CLIMS layout, which has two: pass the "
            "foreground and the background .npy files together"
        )
    raise BadFileError(
        f"a QA corpus is one wsclip JSON file or two .npy files (foreground, background); got {', '.join(map(str, paths))}"
    )


def __getattr__(name: str):
    """The builder (BLIP VQA questions over a dataset) lives in qa_vqa.py; its names resolve here too."""
    if name in ("VQAAnswerer", "_load_vqa", "build_corpus"):
        from wsclip.train import qa_vqa

        return getattr(qa_vqa, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__: Iterable[str] = (
    "QACorpus", "QAEntry", "VQAAnswerer", "bg_texts", "build_corpus", "clean_answer", "fg_texts",
    "lemmatize", "load_corpus", "load_npy_corpus", "load_npy_dict", "mentions_label", "parse_corpus",
    "qa_label_name", "save_corpus", "singular",
)
