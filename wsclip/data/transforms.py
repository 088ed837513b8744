"""Sample-dict transforms (METHODS.md section 2) and batching.

Each transform takes and returns the whole sample dict, changing "image" and "mask" together
(other keys pass through). Images may be numpy HWC (uint8 or float) or torch CHW tensors;
masks numpy (H, W) or torch (H, W). Random transforms draw from their `generator`
(a torch.Generator, or a seed), else from torch's global RNG, which DataLoader seeds per
worker: pass `seed=` for single-process determinism, torch.manual_seed for loaders.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from wsclip.errors import ShapeError
from wsclip.constants import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 - re-exported



# ----------------------------------------------------------------------------- helpers
def image_size(img) -> tuple[int, int]:
    """(H, W) of a numpy HWC or torch CHW image."""
    return tuple(img.shape[-2:]) if isinstance(img, torch.Tensor) else tuple(img.shape[:2])


def resize_image(img, size: tuple[int, int]):
    """Bicubic resize to (H, W): PIL for uint8 numpy, antialiased torch interpolation otherwise."""
    h, w = size
    if image_size(img) == (h, w):
        return img
    if isinstance(img, np.ndarray) and img.dtype == np.uint8:
        from PIL import Image

        return np.asarray(Image.fromarray(img).resize((w, h), Image.BICUBIC))
    as_numpy = isinstance(img, np.ndarray)
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1) if as_numpy else img
    dtype = t.dtype
    out = F.interpolate(t[None].float(), size=(h, w), mode="bicubic", align_corners=False, antialias=True)[0]
    if dtype == torch.uint8:
        out = out.round().clamp(0, 255).to(torch.uint8)
    else:
        out = out.to(dtype)
    return out.permute(1, 2, 0).numpy() if as_numpy else out


def resize_mask(mask, size: tuple[int, int]):
    """Nearest-neighbour resize of a label mask to (H, W) (pixel-centre sampling)."""
    h, w = size
    if tuple(mask.shape[-2:]) == (h, w):
        return mask
    if isinstance(mask, np.ndarray):
        from PIL import Image

        return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((w, h), Image.NEAREST))
    return F.interpolate(mask[None, None].float(), size=(h, w), mode="nearest-exact")[0, 0].to(mask.dtype)


def _flip(x):
    return x.flip(-1) if isinstance(x, torch.Tensor) else np.ascontiguousarray(x[:, ::-1])


def _make_generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return torch.Generator().manual_seed(int(generator))


class RandomTransform:
    """Base of random transforms: draws from `generator` (Generator or seed) or the global RNG."""

    def __init__(self, generator: torch.Generator | int | None = None):
        self.generator = _make_generator(generator)

    def randint(self, low: int, high: int) -> int:
        """Uniform integer in [low, high] (inclusive)."""
        return int(torch.randint(low, high + 1, (1,), generator=self.generator).item())

    def rand(self) -> float:
        return float(torch.rand(1, generator=self.generator).item())


# ----------------------------------------------------------------------------- transforms
class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[dict], dict]]):
        self.transforms = list(transforms)

    def __call__(self, sample: dict) -> dict:
        for t in self.transforms:
            sample = t(sample)
        return sample

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(type(t).__name__ for t in self.transforms) + ")"


class Resize:
    """Deterministic resize: `size` = exact (H, W) or an int for the long side (`long_side=`)."""

    def __init__(self, size: int | tuple[int, int] | None = None, long_side: int | None = None):
        if (size is None) == (long_side is None):
            raise ValueError("give exactly one of size=(H, W) and long_side=N")
        if isinstance(size, int):
            size, long_side = None, size
        self.size, self.long_side = size, long_side

    def target(self, hw: tuple[int, int]) -> tuple[int, int]:
        if self.size is not None:
            return tuple(self.size)
        return long_side_size(hw, self.long_side)

    def __call__(self, sample: dict) -> dict:
        return _resize_sample(sample, self.target(image_size(sample["image"])))


def long_side_size(hw: tuple[int, int], long_side: int) -> tuple[int, int]:
    """(H, W) scaled so that max(H, W) == long_side (each side rounded, at least 1)."""
    h, w = hw
    scale = long_side / max(h, w)
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def _resize_sample(sample: dict, size: tuple[int, int]) -> dict:
    out = dict(sample)
    out["image"] = resize_image(sample["image"], size)
    if "mask" in sample:
        out["mask"] = resize_mask(sample["mask"], size)
    return out


class RandomLongSideResize(RandomTransform):
    """Resize so the long side is a uniform random integer in [min, max] (IRN/CLIMS: 320..640)."""

    def __init__(self, min: int = 320, max: int = 640, generator=None):  # noqa: A002 - names of the spec
        super().__init__(generator)
        if not 0 < min <= max:
            raise ValueError(f"need 0 < min <= max, got {min}, {max}")
        self.min_long, self.max_long = int(min), int(max)

    def __call__(self, sample: dict) -> dict:
        target = self.randint(self.min_long, self.max_long)
        return _resize_sample(sample, long_side_size(image_size(sample["image"]), target))


class RandomHFlip(RandomTransform):
    """Horizontal flip of image and mask with probability p."""

    def __init__(self, p: float = 0.5, generator=None):
        super().__init__(generator)
        self.p = p

    def __call__(self, sample: dict) -> dict:
        if self.rand() >= self.p:
            return sample
        out = dict(sample)
        out["image"] = _flip(sample["image"])
        if "mask" in sample:
            out["mask"] = _flip(sample["mask"])
        return out


def _place(x, top: int, left: int, size: tuple[int, int], fill, chw: bool):
    """Window (top, left, size) of x, with out-of-image parts set to `fill` (top/left may be < 0)."""
    ch, cw = size
    h, w = (x.shape[-2:] if chw else x.shape[:2])
    if isinstance(x, torch.Tensor):
        shape = (x.shape[0], ch, cw) if (chw and x.ndim == 3) else (ch, cw)
        out = torch.empty(shape, dtype=x.dtype)
        fill_t = torch.as_tensor(fill, dtype=x.dtype)
        out[:] = fill_t.view(-1, 1, 1) if (fill_t.ndim and x.ndim == 3) else fill_t
    else:
        shape = (ch, cw) + tuple(x.shape[2:])
        out = np.empty(shape, dtype=x.dtype)
        out[:] = np.asarray(fill, dtype=x.dtype)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + ch, h), min(left + cw, w)
    if y1 > y0 and x1 > x0:
        if chw and x.ndim == 3:
            out[:, y0 - top:y1 - top, x0 - left:x1 - left] = x[:, y0:y1, x0:x1]
        else:
            out[y0 - top:y1 - top, x0 - left:x1 - left] = x[y0:y1, x0:x1]
    return out


class RandomCrop(RandomTransform):
    """Random `size` crop; smaller images are placed at a random spot on a padded canvas.

    The image is padded with `fill` (0 after normalisation = the mean colour; a per-channel
    tuple is accepted), the mask with `mask_fill` (255 = ignore).
    """

    def __init__(self, size: int | tuple[int, int] = 512, fill=0.0, mask_fill: int = 255, generator=None):
        super().__init__(generator)
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.fill, self.mask_fill = fill, mask_fill

    def offsets(self, hw: tuple[int, int]) -> tuple[int, int]:
        """(top, left) of the window in image coordinates; negative means padding before."""
        out = []
        for n, c in zip(hw, self.size):
            out.append(self.randint(0, n - c) if n >= c else -self.randint(0, c - n))
        return out[0], out[1]

    def __call__(self, sample: dict) -> dict:
        img = sample["image"]
        chw = isinstance(img, torch.Tensor)
        top, left = self.offsets(image_size(img))
        out = dict(sample)
        out["image"] = _place(img, top, left, self.size, self.fill, chw)
        if "mask" in sample:
            out["mask"] = _place(sample["mask"], top, left, self.size, self.mask_fill, False)
        return out


class Normalize:
    """(x - mean) / std per channel; uint8 images are first scaled to [0, 1]. Output float32."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    def __call__(self, sample: dict) -> dict:
        img = sample["image"]
        out = dict(sample)
        if isinstance(img, torch.Tensor):
            x = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
            out["image"] = (x - torch.from_numpy(self.mean).view(-1, 1, 1)) / torch.from_numpy(self.std).view(-1, 1, 1)
        else:
            x = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32)
            out["image"] = (x - self.mean) / self.std
        return out


class ToFloat:
    """uint8 image -> float32 in [0, 1] (same layout)."""

    def __call__(self, sample: dict) -> dict:
        img = sample["image"]
        out = dict(sample)
        if isinstance(img, torch.Tensor):
            out["image"] = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
        else:
            out["image"] = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32)
        return out


class ToTensor:
    """numpy HWC image -> torch CHW float32 (uint8 scaled to [0, 1]); numpy mask -> torch uint8."""

    def __call__(self, sample: dict) -> dict:
        out = dict(sample)
        img = sample["image"]
        if isinstance(img, np.ndarray):
            img = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        out["image"] = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
        if "mask" in sample and isinstance(sample["mask"], np.ndarray):
            out["mask"] = torch.from_numpy(np.array(sample["mask"], dtype=np.uint8))  # a writable copy
        return out


# ----------------------------------------------------------------------------- presets
def clims_train_transform(
    crop: int = 512,
    scale: tuple[int, int] = (320, 640),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    normalize: bool = True,
    generator: torch.Generator | int | None = None,
    seed: int | None = None,
) -> Compose:
    """CAM-network training augmentation (METHODS.md section 2): random long side in `scale`,
    random flip, normalisation, random `crop` with zero padding (mask padded with 255), CHW tensor.

    normalize=False keeps the image in [0, 1] and pads with `mean` instead (the same colour).
    One generator (or `seed`) drives every random step, so outputs are reproducible.
    """
    gen = _make_generator(seed if seed is not None else generator)
    return Compose([
        RandomLongSideResize(scale[0], scale[1], generator=gen),
        RandomHFlip(0.5, generator=gen),
        Normalize(mean, std) if normalize else ToFloat(),
        RandomCrop(crop, fill=0.0 if normalize else tuple(mean), mask_fill=255, generator=gen),
        ToTensor(),
    ])


def eval_transform(
    long_side: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    normalize: bool = True,
) -> Compose:
    """Inference preprocessing: optional long-side resize, normalisation (or [0, 1]), CHW tensor."""
    steps: list = [Resize(long_side=long_side)] if long_side else []
    steps += [Normalize(mean, std) if normalize else ToFloat(), ToTensor()]
    return Compose(steps)


# ----------------------------------------------------------------------------- batching
def collate(samples: Sequence[dict]) -> dict:
    """Stack equal-size samples: arrays/tensors -> one tensor, numbers -> a tensor, strings
    (e.g. "id") and anything else -> a list."""
    if not samples:
        raise ShapeError("cannot collate an empty batch")
    keys = list(samples[0])
    for s in samples[1:]:
        if list(s) != keys and set(s) != set(keys):
            raise ShapeError(f"samples have different keys: {sorted(keys)} vs {sorted(s)}")
    out = {}
    for k in keys:
        vals = [s[k] for s in samples]
        first = vals[0]
        if isinstance(first, (torch.Tensor, np.ndarray)):
            shapes = {tuple(v.shape) for v in vals}
            if len(shapes) > 1:
                ids = [s.get("id") for s in samples]
                raise ShapeError(
                    f"cannot batch '{k}' of different shapes {sorted(shapes)} (ids {ids}): add a crop or "
                    "resize transform, or use batch size 1"
                )
            if all(isinstance(v, np.ndarray) for v in vals):
                out[k] = torch.from_numpy(np.stack(vals))
            else:
                out[k] = torch.stack([torch.as_tensor(np.array(v) if isinstance(v, np.ndarray) else v) for v in vals])
        elif isinstance(first, (bool, int, float)) and not isinstance(first, str):
            out[k] = torch.tensor(vals)
        else:
            out[k] = list(vals)
    return out
