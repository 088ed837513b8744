"""Class names, synonyms, background words, prompt templates and VQA questions (data only).

Everything here is from METHODS.md sections 1 and 4. Index i of a class list is
label i + 1 in the masks (0 = background, 255 = ignore).
"""

from __future__ import annotations

from typing import Sequence

from wsclip.errors import UnknownClassError

# ----------------------------------------------------------------------------- class lists
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)

# ----------------------------------------------------------------------------- CLIMS text
CLIMS_TEMPLATE = "a photo of {}."

#: readable names of the improved public CLIMS code ("person" is spelled "player" there)
CLIMS_VOC_NAMES: tuple[str, ...] = tuple(
    {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor",
     "person": "player"}.get(c, c)
    for c in VOC_CLASSES
)

#: the public CLIMS COCO code's names (clip_utils.py): the standard COCO names, "person" spelled "player" as for VOC
CLIMS_COCO_NAMES: tuple[str, ...] = tuple("player" if c == "person" else c for c in COCO_CLASSES)

CLIMS_VOC_BACKGROUND: tuple[str, ...] = (
    "tree", "river", "sea", "lake", "water", "railway", "railroad", "track", "stone", "rocks",
)

CLIMS_COCO_BACKGROUND: tuple[str, ...] = (
    "street sign", "mountain", "video game", "men", "track", "bus stop", "cabinet", "tray",
    "plate", "shirt", "city street", "runway", "tower", "ramp", "grass", "pillow", "urinal",
    "lake", "brick", "fence", "shower", "airport", "animal", "shower curtain", "road",
    "mirror", "jacket", "church", "snow", "fruit", "hay", "floor", "field", "street", "mouth",
    "steam engine", "cheese", "river", "tree branch", "suit", "child", "soup", "desk", "tub",
    "tennis court", "teeth", "bridge", "sky", "officer", "sidewalk", "dock", "tree", "court",
    "rock", "board", "branch", "pan", "box", "body", "salad", "dirt", "leaf", "hand",
    "highway", "vegetable", "computer monitor", "door", "meat", "pair", "beach", "harbor",
    "ocean", "baseball player", "girl", "market", "window", "blanket", "boy", "woman", "bat",
    "baby", "flower", "wall", "bath tub", "tarmac", "tennis ball", "roll", "park",
)

#: CLIMS paper version: per-class background lists (only boat and train have any)
CLIMS_PAPER_VOC_BACKGROUND: dict[str, tuple[str, ...]] = {
    "boat": ("river", "water", "lake", "sea", "building"),
    "train": ("railroad", "railway", "branches", "tree"),
}

# ----------------------------------------------------------------------------- CLIP-ES text
CLIP_ES_TEMPLATE = "a clean origami {}."

CLIP_ES_VOC_NAMES: tuple[str, ...] = tuple(
    {"bird": "bird avian", "chair": "chair seat", "person": "person with clothes,people,human",
     "tvmonitor": "tvmonitor screen"}.get(c, c)
    for c in VOC_CLASSES
)

_CLIP_ES_COCO_RENAMES = {
    "person": "person with clothes,people,human",
    "bird": "bird avian",
    "backpack": "backpack,bag",
    "umbrella": "umbrella,parasol",
    "handbag": "handbag,purse",
    "tie": "necktie",
    "baseball glove": "glove",
    "spoon": "dessertspoon",
    "chair": "chair seat",
    "tv": "tvmonitor screen",
    "remote": "remote control",
    "hair drier": "hairdrier,blowdrier",
    "motorcycle": "motorbike",
    "airplane": "aeroplane",
    "couch": "sofa",
    "potted plant": "pottedplant",
    "dining table": "diningtable",
}
CLIP_ES_COCO_NAMES: tuple[str, ...] = tuple(_CLIP_ES_COCO_RENAMES.get(c, c) for c in COCO_CLASSES)

CLIP_ES_VOC_BACKGROUND: tuple[str, ...] = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river",
    "sea", "railway", "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean",
    "road", "rock", "street", "valley", "bridge", "sign",
)
CLIP_ES_COCO_BACKGROUND: tuple[str, ...] = tuple(
    w for w in CLIP_ES_VOC_BACKGROUND if w not in ("keyboard", "sign")
)

# ----------------------------------------------------------------------------- QA-CLIMS questions
QA_FOREGROUND_QUESTIONS: tuple[str, ...] = (
    "What kind of {} is in the photo?",
    "What type of {} is in the photo?",
    "What is this {} also called?",
    "What is this {} usually called?",
    "What is another word for this {}?",
    "What is another name for this {}?",
)
QA_BACKGROUND_QUESTIONS: tuple[str, ...] = (
    "what is above the {}?",
    "what is under the {}?",
    "what is behind the {}?",
    "what is around the {}?",
    "what is next to the {}?",
    "what is the left side of {}?",
    "what is the right side of {}?",
    "what scene is the {} in?",
    "what environment is the {} in?",
    "what place is the {} in?",
)
#: labels whose answers count as containing the label even when the word differs
QA_SYNONYM_EXCEPTIONS: tuple[str, ...] = ("table", "monitor", "plant")

# ----------------------------------------------------------------------------- lookup
DATASET_CLASSES: dict[str, tuple[str, ...]] = {"voc": VOC_CLASSES, "coco": COCO_CLASSES}

_METHOD_TEXT = {
    # (dataset, method) -> (class names, background words, template)
    ("voc", "clims"): (CLIMS_VOC_NAMES, CLIMS_VOC_BACKGROUND, CLIMS_TEMPLATE),
    ("coco", "clims"): (CLIMS_COCO_NAMES, CLIMS_COCO_BACKGROUND, CLIMS_TEMPLATE),
    ("voc", "clip-es"): (CLIP_ES_VOC_NAMES, CLIP_ES_VOC_BACKGROUND, CLIP_ES_TEMPLATE),
    ("coco", "clip-es"): (CLIP_ES_COCO_NAMES, CLIP_ES_COCO_BACKGROUND, CLIP_ES_TEMPLATE),
}


def class_names(dataset: str) -> tuple[str, ...]:
    """Canonical class list of a known dataset ('voc' or 'coco')."""
    try:
        return DATASET_CLASSES[dataset]
    except KeyError:
        raise UnknownClassError(
            f"unknown dataset '{dataset}': known are {sorted(DATASET_CLASSES)}; "
            "for your own data pass the class list explicitly"
        ) from None


def class_index(name: str, classes: Sequence[str]) -> int:
    """Index of `name` in `classes` (0-based), with a helpful error listing close names."""
    try:
        return list(classes).index(name)
    except ValueError:
        import difflib

        close = difflib.get_close_matches(name, list(classes), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownClassError(
            f"unknown class name '{name}'.{hint} Known classes: {', '.join(classes)}"
        ) from None


def method_text(dataset: str, method: str, classes: Sequence[str] | None = None):
    """(class prompt names, background words, template) for a dataset and method.

    method is 'clims' or 'clip-es'. For a custom dataset pass `classes`; its names are
    used as written, with the method's template and the VOC background words.
    """
    if method not in ("clims", "clip-es"):
        raise UnknownClassError(f"unknown method '{method}': use 'clims' or 'clip-es'")
    key = (dataset, method)
    if key in _METHOD_TEXT and classes is None:
        return _METHOD_TEXT[key]
    if classes is None:
        class_names(dataset)  # raises a clear error for an unknown dataset
    base_bg = CLIMS_VOC_BACKGROUND if method == "clims" else CLIP_ES_VOC_BACKGROUND
    template = CLIMS_TEMPLATE if method == "clims" else CLIP_ES_TEMPLATE
    return tuple(classes), base_bg, template


def prompts(names: Sequence[str], template: str) -> list[str]:
    """Fill `template` with each name: prompts(['cat'], 'a photo of {}.') -> ['a photo of cat.']."""
    if "{}" not in template:
        raise ValueError(f"prompt template must contain '{{}}': {template!r}")
    return [template.format(n) for n in names]


def build_prompts(dataset: str, method: str, classes: Sequence[str] | None = None) -> dict:
    """The text prompts a method uses: {'foreground': [...], 'background': [...]}."""
    names, bg, template = method_text(dataset, method, classes)
    return {"foreground": prompts(names, template), "background": prompts(bg, template)}
