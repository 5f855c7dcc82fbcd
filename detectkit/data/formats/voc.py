"""Pascal VOC XML (``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``).

VOC pixel indices are 1-based and inclusive, so ``xmin..xmax`` covers ``[xmin - 1, xmax]`` in
continuous coordinates (the convention torchvision's and mmdet's VOC readers use). A box
with ``xmax <= xmin`` or ``ymax <= ymin`` (a click without a drag: a point or a line) is no
object: it is dropped and reported, not kept as a 1-pixel box.

Classes come from the set's class list when it has one (``labelmap.txt`` as CVAT writes it, or
``classes.txt``, beside ``Annotations/`` or above it; or a ``class_names`` argument): an object
named otherwise is a problem naming the XML file and the name, never a new class. Without a
list, the classes are the names found in the XML files in sorted order (``voc_class_order`` says
which of the three gave the order), and a likely typo among them is flagged
(:func:`detectkit.data.classnames.likely_typos`).

``ImageSets/Main/trainval.txt`` is train + val, not a split of its own: it is offered only when
``train.txt`` and ``val.txt`` are not both there.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from detectkit.data.classnames import typo_problems
from detectkit.data.images import IMAGE_EXTENSIONS, ImageReadError, image_size
from detectkit.data.records import (
    DatasetError,
    DetectionSplit,
    ImageRecord,
    Problem,
    clean_boxes,
    image_path,
    log_problems,
)

__all__ = [
    "voc_root",
    "voc_splits",
    "voc_split_layout",
    "voc_class_names",
    "voc_class_list",
    "voc_classes",
    "voc_class_order",
    "load_voc",
]

CLASS_LIST_FILES = ("labelmap.txt", "classes.txt")


def voc_root(path: str | Path) -> Path | None:
    """The folder holding ``Annotations/`` (also inside ``VOCdevkit/VOC20xx``)."""
    path = Path(path)
    if (path / "Annotations").is_dir():
        return path
    for sub in sorted(path.glob("VOC*")) + sorted(path.glob("VOCdevkit/VOC*")):
        if (sub / "Annotations").is_dir():
            return sub
    return None


def _read_list(path: Path) -> list[str]:
    """First word of each line (a BOM is not part of the first name)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read the list ({e})") from e
    return [ln.split()[0] for ln in text.splitlines() if ln.strip()]


def voc_split_layout(root: Path) -> tuple[list[str], list[Problem]]:
    """The split lists of ``ImageSets/Main`` (``all`` when there are none), and what was noticed."""
    main = root / "ImageSets" / "Main"
    names = sorted(p.stem for p in main.glob("*.txt") if "_" not in p.stem) if main.is_dir() else []
    problems: list[Problem] = []
    if {"train", "val", "trainval"} <= set(names):
        names.remove("trainval")
        both = set(_read_list(main / "train.txt")) | set(_read_list(main / "val.txt"))
        trainval = set(_read_list(main / "trainval.txt"))
        if trainval != both:
            problems.append(
                Problem(
                    "trainval_differs",
                    str(main / "trainval.txt"),
                    f"is not train.txt + val.txt ({len(trainval - both)} image(s) only in trainval, "
                    f"{len(both - trainval)} only in train/val); train and val are used, trainval is not",
                )
            )
    return names or ["all"], problems


def voc_splits(root: Path) -> list[str]:
    return voc_split_layout(root)[0]
def _parse(xml_path: Path) -> ET.Element:
    try:
        return ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as e:
        raise DatasetError(f"{xml_path}: cannot parse VOC XML ({e})") from e


def _object_names(root: Path) -> tuple[Counter, dict[str, Path]]:
    """Object count per name over ALL annotation files, and the first file naming each."""
    counts: Counter = Counter()
    first: dict[str, Path] = {}
    for x in sorted((root / "Annotations").glob("*.xml")):
        try:
            node = _parse(x)
        except DatasetError:
            continue  # reported when the split is loaded
        for o in node.iter("object"):
            name = (o.findtext("name") or "").strip()
            if name:
                counts[name] += 1
                first.setdefault(name, x)
    return counts, first


def voc_class_names(root: Path) -> list[str]:
    """Sorted union of object names over ALL annotation files, so every split agrees."""
    return sorted(_object_names(root)[0])


def voc_class_list(root: Path) -> tuple[list[str], Path] | None:
    """The set's own class list (``labelmap.txt`` / ``classes.txt``) and its file, if it has one."""
    folders = [root, root / "Annotations"]
    # the folder the user named (holding VOC2012/ or VOCdevkit/VOC2012/), never an unrelated one above
    if root.name.startswith("VOC"):
        folders.append(root.parent)
        if root.parent.name == "VOCdevkit":
            folders.append(root.parent.parent)
    for folder in folders:
        for fname in CLASS_LIST_FILES:
            f = folder / fname
            if not f.is_file():
                continue
            try:
                lines = f.read_text(encoding="utf-8-sig").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise DatasetError(f"{f}: cannot read the class list ({e})") from e
            names = []
            for ln in lines:
                ln = ln.strip()
                if not ln or ln.startswith("#"):
                    continue
                # CVAT's labelmap.txt: ``name:r,g,b:parts:actions``; ``background`` is the
                # segmentation mask's index 0, not an object class
                name = ln.split(":")[0].strip() if ":" in ln else ln
                if ":" in ln and name == "background":
                    continue
                names.append(name)
            if not names:
                raise DatasetError(f"{f}: the class list is empty")
            dupes = sorted(n for n, c in Counter(names).items() if c > 1)
            if dupes:
                raise DatasetError(f"{f}: class list names {dupes} more than once")
            return names, f
    return None


def voc_classes(root: Path, class_names: list[str] | None = None) -> tuple[list[str], list[Problem]]:
    """(class names, problems): the given list, the set's class list, or the names found (sorted;
    a likely typo among them is a problem naming the first file that spells it)."""
    if class_names is not None:
        return list(class_names), []
    listed = voc_class_list(root)
    if listed is not None:
        return listed[0], []
    counts, first = _object_names(root)
    return sorted(counts), typo_problems(counts, first, "class", "fix the name or add a classes.txt")


def voc_class_order(root: Path, class_names: list[str] | None = None) -> dict[str, str]:
    """Where the class order comes from: ``{"source": "given" | "file" | "sorted", "detail"}``
    (VOC XML has no class ids, so without a list the order is the names' sorted order)."""
    if class_names is not None:
        return {"source": "given", "detail": "the class_names / --classes list"}
    listed = voc_class_list(root)
    if listed is not None:
        return {"source": "file", "detail": str(listed[1])}
    return {
        "source": "sorted",
        "detail": f"the object names found in the XML files (no {' or '.join(CLASS_LIST_FILES)} "
        "beside Annotations/: add one to fix the order)",
    }


def _find_image(root: Path, stem: str, filename: str | None, xml_path: Path | None = None) -> Path:
    images = root / "JPEGImages"
    named = image_path(images, filename, str(xml_path or images)) if filename else None  # never outside the set
    if named is not None and named.exists():
        return named
    for ext in IMAGE_EXTENSIONS:
        if (images / (stem + ext)).exists():
            return images / (stem + ext)
    return named or images / (stem + ".jpg")


def load_voc(root: str | Path, split: str = "train", class_names: list[str] | None = None) -> DetectionSplit:
    root = voc_root(root) or Path(root)
    names = list(class_names) if class_names is not None else voc_classes(root)[0]
    index = {n: i for i, n in enumerate(names)}
    list_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if list_file.is_file():
        stems = _read_list(list_file)
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
        try:
            img = _find_image(root, stem, (node.findtext("filename") or "").strip() or None, xml_path)
        except DatasetError as e:
            problems.append(Problem("image_outside_dataset", str(xml_path), str(e).split(": ", 1)[1], "fatal"))
            continue
        boxes, labels, difficult, where = [], [], [], []
        for j, obj in enumerate(node.iter("object")):
            name = (obj.findtext("name") or "").strip()
            if name not in index:
                problems.append(
                    Problem(
                        "unknown_class",
                        str(xml_path),
                        f"object {j}: class {name!r} is not one of the dataset's classes {names}; dropped",
                    )
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
            if x2 <= x1 or y2 <= y1:
                problems.append(
                    Problem(
                        "degenerate_box",
                        str(xml_path),
                        f"object {j} ({name}): bndbox ({x1:g}, {y1:g}, {x2:g}, {y2:g}) has xmax <= xmin or "
                        "ymax <= ymin (a point or a line, not an object), dropped",
                    )
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
