"""Numbers and names every stage shares, each defined once (ARCHITECTURE.md)."""

from __future__ import annotations

# Pixel normalisation (RGB, images in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# CAM inference (METHODS.md section 2) and evaluation (section 3).
CAM_SCALES = (1.0, 0.5, 1.5, 2.0)
CAM_BG_THRESHOLD = 0.15
CAM_EPS = 1e-5
CAM_STRIDE = 4  # the low-resolution "cam" maps of a CAM file are at stride 4
CAM_NET_STRIDE = 16  # output stride of the papers' CAM network (CAMNet.stride tells each backbone's)

# Label masks.
IGNORE_INDEX = 255
BACKGROUND = 0

# File suffixes.
CAM_SUFFIX = ".npz"
MASK_SUFFIX = ".png"
