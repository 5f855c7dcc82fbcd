"""Builders for small (and deliberately broken) datasets used by the data tests."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, w: int = 64, h: int = 48, colour=(90, 120, 150), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    arr = np.clip(np.array(colour) + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def write_coco(
    folder: Path, images: list[dict], annotations: list[dict], categories: list[dict], name="annotations.json"
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def broken_coco(root: Path) -> Path:
    """One COCO split with every kind of annotation problem plus a missing and a corrupt image."""
    folder = root / "train"
    for n in ("a.jpg", "b.jpg", "d.jpg"):
        write_image(folder / n)
    (folder / "corrupt.jpg").write_bytes(b"this is not a jpeg")
    images = [
        {"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
        {"id": 2, "file_name": "b.jpg", "width": 64, "height": 48},
        {"id": 3, "file_name": "missing.jpg", "width": 64, "height": 48},
        {"id": 4, "file_name": "corrupt.jpg", "width": 64, "height": 48},
        {"id": 5, "file_name": "d.jpg", "width": 64, "height": 48},
    ]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 20, 20], "iscrowd": 0},  # good
        {"id": 2, "image_id": 1, "category_id": 9, "bbox": [5, 5, 0, 10], "iscrowd": 0},  # degenerate
        {
            "id": 3,
            "image_id": 2,
            "category_id": 7,
            "bbox": [50, 30, 30, 30],
            "iscrowd": 0,
        },  # outside: clipped
        {"id": 4, "image_id": 2, "category_id": 42, "bbox": [1, 1, 5, 5], "iscrowd": 0},  # unknown class
        {"id": 4, "image_id": 2, "category_id": 9, "bbox": [2, 2, 8, 8], "iscrowd": 0},  # duplicate ann id
        {"id": 6, "image_id": 5, "category_id": 9, "bbox": [0, 0, 30, 30], "iscrowd": 1},  # crowd
        {"id": 7, "image_id": 5, "category_id": 7, "bbox": [100, 100, 10, 10], "iscrowd": 0},  # fully outside
        {"id": 8, "image_id": 3, "category_id": 7, "bbox": [1, 1, 10, 10], "iscrowd": 0},
        {"id": 9, "image_id": 4, "category_id": 7, "bbox": [1, 1, 10, 10], "iscrowd": 0},
    ]
    cats = [
        {"id": 7, "name": "cat", "supercategory": "animal"},
        {"id": 9, "name": "dog", "supercategory": "animal"},
    ]
    return write_coco(folder, images, anns, cats)


def messy_yolo(root: Path) -> Path:
    """A Roboflow-style YOLO export with the quirks seen in the wild."""
    for split in ("train", "valid"):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "labels").mkdir(parents=True, exist_ok=True)
    write_image(root / "train/images/with space 1.jpg", 100, 50)
    (root / "train/labels/with space 1.txt").write_text("1 0.5 0.5 0.2 0.4\n\n0 0.1 0.2 0.3 0.2 0.2 0.6\n")
    write_image(root / "train/images/neg.png", 100, 50)
    (root / "train/labels/neg.txt").write_text("")  # empty label file: a negative image
    write_image(root / "train/images/bad.jpg", 100, 50)
    (root / "train/labels/bad.txt").write_text("0 0.5 0.5 0.2 0.2\n5 0.5 0.5 0.1 0.1\n0 0.5 0.5\n")
    write_image(root / "valid/images/v.jpg", 80, 80)
    (root / "valid/labels/v.txt").write_text("0 0.5 0.5 0.25 0.25\n")
    yaml_text = (
        "names:\n  0: cat\n  1: dog\nnc: 2\n"
        "train: /Users/someone/exports/my-ds/train/images\n"
        "val: ../valid/images\n"
        "roboflow:\n  workspace: w\n  project: p\n  version: 1\n  license: MIT\n"
    )
    (root / "data.yaml").write_text(yaml_text)
    return root / "data.yaml"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(path: Path, w: int = 30000, h: int = 30000) -> Path:
    """A ~100-byte PNG whose header claims ``w x h`` pixels (a decompression bomb)."""
    import struct

    path.parent.mkdir(parents=True, exist_ok=True)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )
    return path
