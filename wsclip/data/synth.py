"""A procedural multi-label segmentation world with co-occurring backgrounds.

Every scene is a function of (seed, split, index): 1 to 3 objects of the K = 6
classes in SYNTH_CLASSES (distinct shapes and textures, random colours so colour
alone does not tell the class) on one of the L = 5 background textures in
SYNTH_BACKGROUNDS. Each class sits on its preferred background most of the time
(boat on water, train on rails, bird and plane in the sky, cow on grass, car on a
road), which recreates the co-occurrence problem CLIMS's CBS loss addresses.

`SynthDataset` serves scenes on the fly with the common dataset interface;
`write_voc_layout` writes a VOC-style folder so every file-based command works on it.
"""

from __future__ import annotations

import colorsys
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsclip.data.base import LabeledImageDataset, multi_hot
from wsclip.errors import WsclipError

# ----------------------------------------------------------------------------- vocabulary
SYNTH_CLASSES: tuple[str, ...] = ("boat", "train", "bird", "car", "cow", "plane")
SYNTH_BACKGROUNDS: tuple[str, ...] = ("water", "rails", "sky", "grass", "road")
#: background words for CLIMS's CBS loss (the co-occurring backgrounds of this world)
SYNTH_BACKGROUND_WORDS: tuple[str, ...] = SYNTH_BACKGROUNDS
#: class index -> index of its preferred background
SYNTH_PREFERRED: dict[int, int] = {0: 0, 1: 1, 2: 2, 3: 4, 4: 3, 5: 2}
#: how the full caption names each background ("a photo of a boat on water.")
BACKGROUND_PHRASES: dict[str, str] = {
    "water": "on water", "rails": "on rails", "sky": "in the sky", "grass": "on grass", "road": "on a road",
}

P_PREFERRED = 0.8  # probability that a scene's background is its first object's preferred one
P_COMPANION = 0.7  # probability that a further object is a class preferring the same background
# the "pretrain" split (the tiny CLIP's corpus) is broader, as web data is for a real CLIP:
# objects meet their usual background less often, so shapes must be learned, not just scenes
PRETRAIN_P_PREFERRED = 0.35
PRETRAIN_P_COMPANION = 0.35
NUM_OBJECTS_P = (0.45, 0.35, 0.20)  # 1, 2 or 3 objects
MIN_VISIBLE = 0.6  # an object must keep this fraction of its pixels after occlusion
#: image side of the world the demo, the ablation and the tiny CLIPs use: at 128 px an object is 48..80 px
#: long (0.37..0.62 of the side) and a stride-8 CAM (16x16) resolves it (64 px at stride 16 gave 4x4 maps)
SYNTH_SIZE = 128

_SPLITS = {"train": 0, "val": 1, "pretrain": 2}


def caption_for(classes, background: str | None = None) -> str:
    """Scene caption: caption_for(['boat', 'bird'], 'water') -> 'a photo of a boat and a bird on water.'

    Without classes it names the background ('a photo of water.'); without a background
    it names the objects only ('a photo of a boat and a bird.').
    """
    if not classes:
        if background is None:
            raise ValueError("a caption needs classes or a background")
        return f"a photo of {background}."
    names = [f"{'an' if c[0] in 'aeiou' else 'a'} {c}" for c in classes]
    joined = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    where = f" {BACKGROUND_PHRASES[background]}" if background is not None else ""
    return f"a photo of {joined}{where}."


# ----------------------------------------------------------------------------- small helpers
def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells_y: int, cells_x: int) -> np.ndarray:
    """Random field in about [-1, 1], bilinearly upsampled from a (cells_y+1, cells_x+1) grid."""
    grid = rng.uniform(-1.0, 1.0, size=(cells_y + 1, cells_x + 1)).astype(np.float32)
    ys = np.linspace(0, cells_y, size, dtype=np.float32)
    xs = np.linspace(0, cells_x, size, dtype=np.float32)
    y0 = np.minimum(ys.astype(int), cells_y - 1)
    x0 = np.minimum(xs.astype(int), cells_x - 1)
    fy = (ys - y0)[:, None]
    fx = (xs - x0)[None, :]
    g00 = grid[y0][:, x0]
    g01 = grid[y0][:, x0 + 1]
    g10 = grid[y0 + 1][:, x0]
    g11 = grid[y0 + 1][:, x0 + 1]
    return (g00 * (1 - fy) * (1 - fx) + g01 * (1 - fy) * fx + g10 * fy * (1 - fx) + g11 * fy * fx).astype(np.float32)


def _convex(u: np.ndarray, v: np.ndarray, pts) -> np.ndarray:
    """Points (u, v) inside the convex polygon `pts` (either orientation)."""
    pos = np.ones(u.shape, bool)
    neg = np.ones(u.shape, bool)
    n = len(pts)
    for i in range(n):
        (ax, ay), (bx, by) = pts[i], pts[(i + 1) % n]
        cross = (bx - ax) * (v - ay) - (by - ay) * (u - ax)
        pos &= cross >= 0
        neg &= cross <= 0
    return pos | neg


def _ellipse(u, v, cu, cv, ru, rv, power: float = 2.0) -> np.ndarray:
    return (np.abs((u - cu) / ru) ** power + np.abs((v - cv) / rv) ** power) <= 1.0


def _rect(u, v, u0, u1, v0, v1) -> np.ndarray:
    return (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)


def _mix(a: np.ndarray, b, t: float) -> np.ndarray:
    return (1 - t) * a + t * np.asarray(b, np.float32)


# ----------------------------------------------------------------------------- backgrounds
def _bg_water(rng, yy, xx, k):
    base = _hsv(rng.uniform(0.53, 0.62), rng.uniform(0.45, 0.85), rng.uniform(0.4, 0.75))
    period = rng.uniform(5, 9) * k
    wob = rng.uniform(14, 26) * k
    w = np.sin(2 * np.pi * (yy / period + 0.18 * np.sin(2 * np.pi * xx / wob + rng.uniform(0, 6.3))) + rng.uniform(0, 6.3))
    img = base[None, None] * (1 + 0.22 * w)[..., None]
    crest = np.clip((w - 0.8) * 4, 0, 1)[..., None]
    return img * (1 - 0.5 * crest) + 0.5 * crest * 0.95


def _bg_rails(rng, yy, xx, k):
    ballast = _hsv(rng.uniform(0.04, 0.12), rng.uniform(0.15, 0.4), rng.uniform(0.35, 0.6))
    img = ballast[None, None] * (1 + rng.normal(0, 0.15, yy.shape).astype(np.float32))[..., None]
    period = rng.uniform(20, 28) * k
    ty = (yy + rng.uniform(0, period)) % period
    sleeper_pitch = rng.uniform(6, 9) * k
    tx = (xx + rng.uniform(0, sleeper_pitch)) % sleeper_pitch
    sleepers = (ty > 1 * k) & (ty < 15 * k) & (tx < 0.38 * sleeper_pitch)
    wood = _hsv(rng.uniform(0.05, 0.1), rng.uniform(0.4, 0.7), rng.uniform(0.18, 0.32))
    img[sleepers] = wood
    rail = ((ty > 3 * k) & (ty < 5 * k)) | ((ty > 11 * k) & (ty < 13 * k))
    img[rail] = rng.uniform(0.7, 0.85) * np.array([1.0, 1.0, 1.02], np.float32)
    return img


def _bg_sky(rng, yy, xx, k):
    size = yy.shape[0]
    h = rng.uniform(0.55, 0.61)
    top = _hsv(h, rng.uniform(0.5, 0.75), rng.uniform(0.75, 0.95))
    bottom = _hsv(h, rng.uniform(0.15, 0.3), rng.uniform(0.9, 1.0))
    t = (yy / size)[..., None]
    img = top[None, None] * (1 - t) + bottom[None, None] * t
    cloud = _smooth_noise(rng, size, 3, 4) + 0.5 * _smooth_noise(rng, size, 7, 9)
    c = np.clip((cloud - rng.uniform(0.35, 0.7)) * 3, 0, 1)[..., None]
    return img * (1 - c) + 0.97 * c


def _bg_grass(rng, yy, xx, k):
    size = yy.shape[0]
    base = _hsv(rng.uniform(0.22, 0.33), rng.uniform(0.5, 0.85), rng.uniform(0.35, 0.65))
    cols = max(8, int(size / (1.6 * k)))
    blades = _smooth_noise(rng, size, max(2, size // 16), cols)
    patches = _smooth_noise(rng, size, 3, 3)
    img = base[None, None] * (1 + 0.35 * blades + 0.12 * patches)[..., None]
    return img


def _bg_road(rng, yy, xx, k):
    size = yy.shape[0]
    v = rng.uniform(0.2, 0.4)
    img = np.full((size, size, 3), v, np.float32) * (1 + rng.normal(0, 0.08, (size, size)).astype(np.float32))[..., None]
    paint = np.array([0.95, 0.95, 0.92] if rng.random() < 0.6 else [0.95, 0.8, 0.2], np.float32)
    period = rng.uniform(22, 30) * k
    dash = rng.uniform(10, 14) * k
    ly = (yy + rng.uniform(0, period)) % period
    lx = (xx + rng.uniform(0, dash)) % dash
    img[(ly < 2 * k) & (lx < 0.6 * dash)] = paint
    return img


_BACKGROUNDS = (_bg_water, _bg_rails, _bg_sky, _bg_grass, _bg_road)


# ----------------------------------------------------------------------------- objects
# Each draws one object in local coordinates (u, v): u along the object (about [-1, 1]),
# v downwards; `px` is the object's half-length in pixels, so textures keep a fixed pixel
# period. Shapes and textures identify a class; the colour is random. Returns (mask, colour).
def _obj_boat(rng, u, v, col, px):
    hull = (v >= 0.05) & (v <= 0.45) & (np.abs(u) <= 0.95 - 0.8 * (v - 0.05))
    mast = _rect(u, v, -0.1, 0.0, -0.9, 0.05)
    sail = _convex(u, v, [(0.02, -0.85), (0.02, 0.0), (0.75, 0.0)])
    img = np.broadcast_to(col, u.shape + (3,)).copy()
    img[hull & (((v * px) // 2) % 2 == 0)] = col * 0.5  # striped hull
    img[sail] = _mix(col, 1.0, 0.75) * (1 - 0.08 * (np.sin(u[sail] * 40) > 0))[:, None]
    img[mast] = col * 0.3
    return hull | mast | sail, img


def _obj_train(rng, u, v, col, px):
    body = _rect(u, v, -1.0, 1.0, -0.5, 0.3)
    wheels = np.zeros(u.shape, bool)
    for cu in (-0.75, -0.45, 0.45, 0.75):
        wheels |= _ellipse(u, v, cu, 0.36, 0.13, 0.13)
    img = np.broadcast_to(col, u.shape + (3,)).copy()
    img[_rect(u, v, -1.0, 1.0, -0.5, -0.4)] = col * 0.45
    windows = _rect(u, v, -0.92, 0.92, -0.3, -0.05) & (((u + 1.0) % 0.36) > 0.08) & (((u + 1.0) % 0.36) < 0.28)
    img[windows] = _mix(col, [0.85, 0.92, 1.0], 0.7)
    img[_rect(u, v, -1.0, 1.0, 0.12, 0.2)] = col * 0.45
    img[wheels & ~body] = 0.15
    return body | wheels, img


def _obj_bird(rng, u, v, col, px):
    body = _ellipse(u, v, 0.0, 0.1, 0.55, 0.3)
    head = _ellipse(u, v, 0.55, -0.12, 0.2, 0.2)
    beak = _convex(u, v, [(0.7, -0.18), (0.7, -0.04), (0.95, -0.1)])
    wing = _convex(u, v, [(-0.35, 0.05), (0.25, 0.05), (-0.5, -0.85)])
    tail = _convex(u, v, [(-0.45, 0.05), (-0.95, -0.15), (-0.95, 0.3)])
    mask = body | head | beak | wing | tail
    img = np.broadcast_to(col, u.shape + (3,)).copy()
    feathers = (((u + v) * px / 3.0) % 1.0) < 0.45  # diagonal feather stripes all over
    img[feathers] = col * 0.5
    img[beak] = [0.95, 0.6, 0.1]
    img[_ellipse(u, v, 0.6, -0.16, 0.06, 0.06)] = 0.05
    return mask, img


def _obj_car(rng, u, v, col, px):
    body = _rect(u, v, -0.95, 0.95, -0.05, 0.3)
    cabin = _convex(u, v, [(-0.55, -0.05), (-0.35, -0.45), (0.3, -0.45), (0.55, -0.05)])
    glass = _convex(u, v, [(-0.45, -0.08), (-0.3, -0.38), (0.25, -0.38), (0.45, -0.08)]) & (np.abs(u + 0.02) > 0.04)
    wheels = _ellipse(u, v, -0.55, 0.32, 0.2, 0.2) | _ellipse(u, v, 0.55, 0.32, 0.2, 0.2)
    hubs = _ellipse(u, v, -0.55, 0.32, 0.08, 0.08) | _ellipse(u, v, 0.55, 0.32, 0.08, 0.08)
    img = np.broadcast_to(col, u.shape + (3,)).copy()
    img[_rect(u, v, -0.95, 0.95, 0.02, 0.06)] = _mix(col, 1.0, 0.5)
    img[glass] = _mix(col, [0.7, 0.85, 0.95], 0.8)
    img[wheels] = 0.08
    img[hubs] = 0.6
    img[_ellipse(u, v, 0.9, 0.05, 0.06, 0.05)] = [1.0, 0.95, 0.6]
    return body | cabin | wheels, img


def _obj_cow(rng, u, v, col, px):
    body = _ellipse(u, v, -0.1, 0.0, 0.7, 0.33, power=4.0)
    legs = np.zeros(u.shape, bool)
    for cu in (-0.62, -0.42, 0.2, 0.4):
        legs |= _rect(u, v, cu - 0.06, cu + 0.06, 0.1, 0.75)
    head = _ellipse(u, v, 0.75, -0.22, 0.2, 0.16, power=3.0)
    ear = _convex(u, v, [(0.6, -0.32), (0.5, -0.45), (0.68, -0.36)])
    tail = _rect(u, v, -0.86, -0.8, -0.05, 0.4)
    mask = body | legs | head | ear | tail
    light = _mix(col, 1.0, 0.55)
    img = np.broadcast_to(light, u.shape + (3,)).copy()
    # dark spots: a random blob field fixed in the object's frame
    n = 7
    cu = rng.uniform(-0.8, 0.8, n)
    cv = rng.uniform(-0.3, 0.3, n)
    r = rng.uniform(0.1, 0.2, n)
    spots = np.zeros(u.shape, bool)
    for a, b, c in zip(cu, cv, r):
        spots |= _ellipse(u, v, a, b, c * 1.3, c)
    img[spots & (body | head)] = col * 0.3
    img[(legs & (v > 0.65))] = 0.1
    img[_ellipse(u, v, 0.82, -0.25, 0.04, 0.04)] = 0.05
    return mask, img


def _obj_plane(rng, u, v, col, px):
    fuselage = _ellipse(u, v, 0.0, 0.0, 0.95, 0.13)
    wings = _convex(u, v, [(0.25, -0.05), (-0.15, -0.8), (-0.35, -0.8), (-0.15, -0.05)])
    wings |= _convex(u, v, [(0.25, 0.05), (-0.15, 0.8), (-0.35, 0.8), (-0.15, 0.05)])
    tail = _convex(u, v, [(-0.65, -0.03), (-0.88, -0.35), (-0.98, -0.35), (-0.9, -0.03)])
    tail |= _convex(u, v, [(-0.65, 0.03), (-0.88, 0.35), (-0.98, 0.35), (-0.9, 0.03)])
    mask = fuselage | wings | tail
    img = np.broadcast_to(col, u.shape + (3,)).copy()
    img[wings | tail] = _mix(col, 1.0, 0.35)
    img[fuselage & (np.abs(v) < 0.035)] = col * 0.4
    img[_ellipse(u, v, 0.78, 0.0, 0.1, 0.06)] = 0.08
    return mask, img


_OBJECTS = (_obj_boat, _obj_train, _obj_bird, _obj_car, _obj_cow, _obj_plane)
_ROTATES = (False, False, True, False, False, True)  # birds and planes fly at an angle


def _draw_object(rng, cls: int, yy, xx, size: int):
    k = size / 64.0
    s = rng.uniform(12.0, 20.0) * k  # half-length in pixels: objects are about 24..40 px long at 64 px
    cx = rng.uniform(0.7 * s, size - 0.7 * s)
    cy = rng.uniform(0.6 * s, size - 0.6 * s)
    angle = rng.uniform(-0.35, 0.35) if _ROTATES[cls] else 0.0
    flip = -1.0 if rng.random() < 0.5 else 1.0
    aspect = rng.uniform(0.85, 1.15)
    dx, dy = xx - cx, yy - cy
    ca, sa = np.cos(angle), np.sin(angle)
    u = flip * (dx * ca + dy * sa) / s
    v = (-dx * sa + dy * ca) / (s * aspect)
    col = _hsv(rng.uniform(0, 1), rng.uniform(0.35, 0.95), rng.uniform(0.45, 0.95))
    mask, img = _OBJECTS[cls](rng, u, v, col, s)
    # dark outline, so objects stay visible on any background
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    img = img.copy()
    img[mask & ~inner] *= 0.45
    return mask, img


# ----------------------------------------------------------------------------- scenes
@dataclass
class SynthScene:
    """One generated scene. `instances` numbers the objects 1..n (0 = background)."""

    image: np.ndarray  # uint8 (S, S, 3)
    mask: np.ndarray  # uint8 (S, S): 0 background, k + 1 for class k
    instances: np.ndarray  # uint8 (S, S)
    object_classes: list  # class index of instance i + 1
    background: int
    caption: str

    @property
    def classes(self) -> list[int]:
        """Distinct class indices present, in order of first appearance."""
        return list(dict.fromkeys(self.object_classes))


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in _SPLITS:
        raise WsclipError(f"unknown synth split '{split}': use one of {', '.join(_SPLITS)}")
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, _SPLITS[split], int(index)])


def generate_scene(seed: int, split: str, index: int, size: int = 64) -> SynthScene:
    """The scene number `index` of `split` for `seed` (identical on every call and machine).

    Splits: "train", "val" and "pretrain" (the tiny CLIP's corpus, weaker co-occurrence).
    """
    if size < 32:
        raise WsclipError(f"synth images must be at least 32 px, got {size}")
    rng = scene_rng(seed, split, index)
    K, L = len(SYNTH_CLASSES), len(SYNTH_BACKGROUNDS)
    p_pref, p_comp = (PRETRAIN_P_PREFERRED, PRETRAIN_P_COMPANION) if split == "pretrain" else (P_PREFERRED, P_COMPANION)
    n_obj = 1 + int(rng.choice(3, p=NUM_OBJECTS_P))
    first = int(rng.integers(K))
    if rng.random() < p_pref:
        bg = SYNTH_PREFERRED[first]
    else:
        bg = int(rng.choice([b for b in range(L) if b != SYNTH_PREFERRED[first]]))
    companions = [c for c in range(K) if SYNTH_PREFERRED[c] == bg]
    wanted = [first]
    for _ in range(n_obj - 1):
        wanted.append(int(rng.choice(companions)) if rng.random() < p_comp else int(rng.integers(K)))

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    k = size / 64.0
    img = np.clip(_BACKGROUNDS[bg](rng, yy, xx, k), 0, 1).astype(np.float32)
    inst = np.zeros((size, size), np.uint8)
    areas: list[int] = []
    classes: list[int] = []
    for cls in wanted:
        for _attempt in range(8):
            m, colour = _draw_object(rng, cls, yy, xx, size)
            area = int(m.sum())
            if area < 20 * k * k:
                continue
            trial = inst.copy()
            trial[m] = len(classes) + 1
            ok = all((trial == i + 1).sum() >= MIN_VISIBLE * a for i, a in enumerate(areas))
            if ok:
                inst = trial
                img[m] = colour[m]
                areas.append(area)
                classes.append(cls)
                break
    # global lighting and sensor noise
    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05)
    img = img + rng.normal(0, 0.02, img.shape).astype(np.float32)
    image = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)

    lut = np.zeros(256, np.uint8)
    for i, c in enumerate(classes):
        lut[i + 1] = c + 1
    mask = lut[inst]
    present = list(dict.fromkeys(classes))
    caption = caption_for([SYNTH_CLASSES[c] for c in present], SYNTH_BACKGROUNDS[bg])
    return SynthScene(image, mask, inst, classes, bg, caption)


def scene_id(split: str, index: int) -> str:
    return f"{split}_{index:06d}"


# ----------------------------------------------------------------------------- dataset
class SynthDataset(LabeledImageDataset):
    """The synthetic world as a dataset (common interface: .classes, .ids, .root; dict items).

    Items: {"id", "image" uint8 (S,S,3), "labels" float32 (K,), "mask" uint8 (S,S),
    "caption" str, "background" str}; `transform` takes and returns the whole dict.
    Scenes are generated on the fly from (seed, split, index); `root` is None.
    """

    classes = SYNTH_CLASSES
    with_masks = True

    def __init__(self, split: str = "train", n: int | None = None, seed: int = 0, size: int = 64, transform=None):
        super().__init__(transform)
        if split not in _SPLITS:
            raise WsclipError(f"synth split must be one of {', '.join(_SPLITS)}, got '{split}'")
        self.split = split
        self.n = int(n if n is not None else (2000 if split == "train" else 200))
        self.seed = int(seed)
        self.size = int(size)
        self.backgrounds = SYNTH_BACKGROUNDS
        self.background_words = SYNTH_BACKGROUND_WORDS
        self.ids = [scene_id(split, i) for i in range(self.n)]
        self.root = None

    def scene(self, i: int) -> SynthScene:
        return generate_scene(self.seed, self.split, int(i) % self.n, self.size)

    def load_image(self, i: int) -> np.ndarray:
        return self.scene(i).image

    def load_mask(self, i: int) -> np.ndarray:
        return self.scene(i).mask

    def label_vector(self, i: int, mask: np.ndarray | None = None):
        return multi_hot(self.scene(i).classes, len(self.classes))

    def __getitem__(self, i: int) -> dict:
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} synth scenes")
        i = int(i) % self.n
        sc = self.scene(i)
        item = {
            "id": self.ids[i],
            "image": sc.image,
            "labels": multi_hot(sc.classes, len(self.classes)),
            "mask": sc.mask,
            "caption": sc.caption,
            "background": SYNTH_BACKGROUNDS[sc.background],
        }
        return self.transform(item) if self.transform is not None else item

    def __repr__(self) -> str:
        return f"SynthDataset(split={self.split!r}, n={self.n}, seed={self.seed}, size={self.size})"


# ----------------------------------------------------------------------------- VOC layout
def write_voc_layout(out_dir, n_train: int = 2000, n_val: int = 200, seed: int = 0, size: int = 64,
                     image_format: str = "jpg") -> Path:
    """Write the world as a VOC-style folder; existing images are kept, so a re-run resumes.

    Layout: JPEGImages/<id>.jpg (quality 95; or lossless .png with image_format="png"),
    SegmentationClass/<id>.png palette masks, ImageSets/Segmentation/{train,val}.txt,
    labels.json (id -> class indices 1..K), classes.txt, captions.json,
    backgrounds.txt (the CBS background words) and synth.json (generator settings).
    """
    from PIL import Image

    from wsclip.io import atomic_path, atomic_write_json, atomic_write_text, write_mask
    from wsclip.progress import progress

    if image_format not in ("jpg", "png"):
        raise WsclipError(f"image_format must be 'jpg' or 'png', got '{image_format}'")
    out = Path(out_dir)
    settings = {"seed": int(seed), "size": int(size), "n_train": int(n_train), "n_val": int(n_val),
                "image_format": image_format, "classes": list(SYNTH_CLASSES)}
    info_path = out / "synth.json"
    if info_path.is_file():
        old = json.loads(info_path.read_text())
        if any(old.get(k) != settings[k] for k in ("seed", "size", "image_format")):
            raise WsclipError(
                f"{out} already holds a synth world with seed={old.get('seed')} size={old.get('size')} "
                f"format={old.get('image_format')}; choose another --out or delete it"
            )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(info_path, settings)
    labels: dict[str, list[int]] = {}
    captions: dict[str, str] = {}
    todo = [("train", i) for i in range(n_train)] + [("val", i) for i in range(n_val)]
    for split, i in progress(todo, desc="synth", unit="img"):
        sid = scene_id(split, i)
        img_path = out / "JPEGImages" / f"{sid}.{image_format}"
        mask_path = out / "SegmentationClass" / f"{sid}.png"
        sc = generate_scene(seed, split, i, size)
        labels[sid] = [c + 1 for c in sorted(sc.classes)]
        captions[sid] = sc.caption
        if img_path.is_file() and mask_path.is_file():
            continue
        with atomic_path(img_path) as tmp:
            if image_format == "jpg":
                Image.fromarray(sc.image).save(tmp, format="JPEG", quality=95, subsampling=0)
            else:
                Image.fromarray(sc.image).save(tmp, format="PNG")
        write_mask(mask_path, sc.mask)
    sets = out / "ImageSets" / "Segmentation"
    atomic_write_text(sets / "train.txt", "".join(f"{scene_id('train', i)}\n" for i in range(n_train)))
    atomic_write_text(sets / "val.txt", "".join(f"{scene_id('val', i)}\n" for i in range(n_val)))
    atomic_write_json(out / "labels.json", labels)
    atomic_write_json(out / "captions.json", captions)
    atomic_write_text(out / "classes.txt", "".join(f"{c}\n" for c in SYNTH_CLASSES))
    atomic_write_text(out / "backgrounds.txt", "".join(f"{w}\n" for w in SYNTH_BACKGROUND_WORDS))
    return out
