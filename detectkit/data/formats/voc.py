"""Pascal VOC XML (``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``).

VOC pixel indices are 1-based and inclusive, so ``xmin..xmax`` covers ``[xmin - 1, xmax]`` in
continuous coordinates (the convention torchvision's and mmdet's VOC readers use).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from tqdm import tqdm

from detectkit.data.images import IMAGE_EXTENSIONS, ImageReadError, image_size
from detectkit.data.records import (
    DatasetError,
    DetectionSplit,
    ImageRecord,
    Problem,
    clean_boxes,
    log_problems,
)

__all__ = ["voc_root", "voc_splits", "voc_class_names", "load_voc"]


def voc_root(path: str | Path) -> Path | None:
    """The folder holding ``Annotations/`` (also inside ``VOCdevkit/VOC20xx``)."""
    path = Path(path)
    if (path / "Annotations").is_dir():
        return path
    for sub in sorted(path.glob("VOC*")) + sorted(path.glob("VOCdevkit/VOC*")):
        if (sub / "Annotations").is_dir():
            return sub
    return None


def voc_splits(root: Path) -> list[str]:
    main = root / "ImageSets" / "Main"
    names = sorted(p.stem for p in main.glob("*.txt") if "_" not in p.stem) if main.is_dir() else []
    return names or ["all"]


def _parse(xml_path: Path) -> ET.Element:
    try:
        return ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as e:
        raise DatasetError(f"{xml_path}: cannot parse VOC XML ({e})") from e


def voc_class_names(root: Path) -> list[str]:
    """Sorted union of object names over ALL annotation files, so every split agrees."""
    names = set()
    for x in sorted((root / "Annotations").glob("*.xml")):
        try:
            names.update((o.findtext("name") or "").strip() for o in _parse(x).iter("object"))
        except DatasetError:
            continue  # reported when the split is loaded
    names.discard("")
    return sorted(names)


def _find_image(root: Path, stem: str, filename: str | None) -> Path:
    images = root / "JPEGImages"
    if filename and (images / filename).exists():
        return images / filename
    for ext in IMAGE_EXTENSIONS:
        if (images / (stem + ext)).exists():
            return images / (stem + ext)
    return images / (filename or stem + ".jpg")


def load_voc(root: str | Path, split: str = "train", class_names: list[str] | None = None) -> DetectionSplit:
    root = voc_root(root) or Path(root)
    names = list(class_names) if class_names is not None else voc_class_names(root)
    index = {n: i for i, n in enumerate(names)}
    list_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if list_file.is_file():
        stems = [ln.split()[0] for ln in list_file.read_text().splitlines() if ln.strip()]
    elif split == "all":
        stems = sorted(p.stem for p in (root / "Annotations").glob("*.xml"))
    else:
        raise DatasetError(f"{root}: no split list {list_file}")
    problems: list[Problem] = []
    records = []
    for stem in tqdm(stems, desc=f"voc {split}", unit="xml", disable=len(stems) < 2000, leave=False):
        xml_path = root / "Annotations" / f"{stem}.xml"
        if not xml_path.is_file():
            problems.append(
                Problem(
                    "missing_annotation", str(xml_path), f"listed in {list_file.name} but missing", "error"
                )
            )
            continue
        try:
            node = _parse(xml_path)
        except DatasetError as e:
            problems.append(Problem("bad_annotation", str(xml_path), str(e), "error"))
            continue
        img = _find_image(root, stem, (node.findtext("filename") or "").strip() or None)
        boxes, labels, difficult, where = [], [], [], []
        for j, obj in enumerate(node.iter("object")):
            name = (obj.findtext("name") or "").strip()
            if name not in index:
                problems.append(
                    Problem("unknown_class", str(xml_path), f"object {j}: class {name!r} not in {names}")
                )
                continue
            bb = obj.find("bndbox")
            try:
                x1, y1, x2, y2 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            except (AttributeError, TypeError, ValueError):
                problems.append(
                    Problem("bad_entry", str(xml_path), f"object {j}: missing or non-numeric bndbox")
                )
                continue
            boxes.append([x1 - 1, y1 - 1, x2, y2])
            labels.append(index[name])
            difficult.append((obj.findtext("difficult") or "0").strip() == "1")
            where.append(f"object {j}")
        size = node.find("size")
        try:
            width, height = int(float(size.findtext("width"))), int(float(size.findtext("height")))
        except (AttributeError, TypeError, ValueError):
            width = height = 0
        if width < 1 or height < 1:
            try:
                width, height = image_size(img)
            except ImageReadError:
                records.append(ImageRecord(img, len(records), 0, 0, np.zeros((0, 4)), np.zeros(0)))
                continue
        b, lab, (dif,) = clean_boxes(
            np.array(boxes),
            np.array(labels),
            width,
            height,
            str(xml_path),
            problems,
            [np.array(difficult, bool)],
            where,
        )
        records.append(ImageRecord(img, len(records), width, height, b, lab, difficult=dif))
    log_problems(problems, f"{root} ({split})")
    return DetectionSplit("voc", split, names, records, problems, str(root))
