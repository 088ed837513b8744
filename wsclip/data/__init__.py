"""Datasets (VOC, COCO, any folder), transforms and batching.

Every dataset is a torch Dataset with `.classes`, `.ids`, `.root` whose items are dicts
{"id", "image", "labels", "mask"?}; see wsclip.data.base. Names are imported lazily so
`import wsclip.data.splits` stays light.
"""

from __future__ import annotations

from wsclip.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "wsclip.data.factory": "open_dataset open_images detect_layout", "wsclip.data.base": "LabeledImageDataset multi_hot",
    "wsclip.data.voc": "VOCDataset", "wsclip.data.coco": "COCODataset", "wsclip.data.folder": "FolderDataset",
    "wsclip.data.splits": "read_split", "wsclip.data.transforms": "collate clims_train_transform",
})
