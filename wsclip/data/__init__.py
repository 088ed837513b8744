"""Datasets (VOC, COCO, any folder), transforms and batching.

Every dataset is a torch Dataset with `.classes`, `.ids`, `.root` whose items are dicts
{"id", "image", "labels", "mask"?}; see wsclip.data.base. Names are imported lazily so
`import wsclip.data.splits` stays light.
"""

from __future__ import annotations

from wsclip.lazy import lazy_exports

_EXPORTS = {
    "open_dataset": "wsclip.data.factory",
    "open_images": "wsclip.data.factory",
    "detect_layout": "wsclip.data.factory",
    "LabeledImageDataset": "wsclip.data.base",
    "multi_hot": "wsclip.data.base",
    "VOCDataset": "wsclip.data.voc",
    "COCODataset": "wsclip.data.coco",
    "FolderDataset": "wsclip.data.folder",
    "read_split": "wsclip.data.splits",
    "collate": "wsclip.data.transforms",
    "clims_train_transform": "wsclip.data.transforms",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
