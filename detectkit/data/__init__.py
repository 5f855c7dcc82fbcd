"""Datasets, formats, augmentation and the DataModule.

Everything a training run needs to turn a folder on disk (COCO, Roboflow, YOLO, VOC,
CreateML, or the generated synthetic set) into batches of the data contract. Names are
imported lazily so ``import detectkit.data.letterbox`` stays cheap (no lightning,
no albumentations).
"""

from __future__ import annotations

import importlib

import cv2

# DataLoader workers are forked. OpenCV's thread pool does not survive a fork: a child that
# touches it (any parallel resize/warp, or cv2.setNumThreads) can deadlock on a lock that a pool
# thread held at fork time, which hangs the loader forever. Running OpenCV single-threaded from
# the start means no pool ever exists; the loader's worker processes are the parallelism.
cv2.setNumThreads(1)

_EXPORTS = {
    "AugmentConfig": "detectkit.data.transforms",
    "DatasetError": "detectkit.data.records",
    "DatasetSource": "detectkit.data.formats.detect",
    "DetectionDataModule": "detectkit.data.datamodule",
    "RoboflowDataModule": "detectkit.data.datamodule",
    "DetectionDataset": "detectkit.data.dataset",
    "DetectionSplit": "detectkit.data.records",
    "ImageReadError": "detectkit.data.images",
    "ImageRecord": "detectkit.data.records",
    "LoaderConfig": "detectkit.data.datamodule",
    "Problem": "detectkit.data.records",
    "SyntheticConfig": "detectkit.data.synthetic",
    "check_images": "detectkit.data.images",
    "collate": "detectkit.data.collate",
    "generate_synthetic": "detectkit.data.synthetic",
    "inspect_dataset": "detectkit.data.inspect",
    "convert_dataset": "detectkit.data.convert",
    "load_dataset": "detectkit.data.formats.detect",
    "open_dataset": "detectkit.data.formats.detect",
    "read_image": "detectkit.data.images",
    "synthetic_dataset": "detectkit.data.synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'detectkit.data' has no attribute {name!r}")
