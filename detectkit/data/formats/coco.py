"""COCO JSON (also Roboflow's per-split ``_annotations.coco.json``) -> records.

Category ids can be anything; they map to contiguous indices in id order. A category that
other categories name as their ``supercategory`` and that no annotation uses is a grouping
node (Roboflow writes the dataset name as id 0), not a class.

:func:`write_coco` is the other direction, the one COCO annotation writer (``data convert``, the
synthetic datasets): category ids 1..C in class order, the ids these readers (and Roboflow
exports, where id 0 is the unused super-category) map back to 0..C-1.

Image ids may be strings (some exporters write file stems): they are mapped to 1..N in file
order and the original is kept as ``ImageRecord.source_id``. Two image entries naming the same
file are fatal: the boxes of one picture would be split over two samples, each teaching the
other's objects as background, and no automatic merge is right (two annotators' boxes would be
doubled). An empty annotation list is reported (every image becomes a negative).
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detectkit.data.records import (
    DatasetError,
    DetectionSplit,
    ImageRecord,
    Problem,
    check_box_count,
    clean_boxes,
    image_path,
    log_problems,
    read_json_file,
    short_repr,
)
from detectkit.limits import check
from detectkit.utils.files import atomic_write

__all__ = ["load_coco_json", "coco_categories", "load_coco", "write_coco"]


def load_coco_json(path: str | Path) -> dict:
    """Parse and shape-check a COCO file; a broken file is a :class:`DatasetError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: COCO annotation file not found")
    data = read_json_file(path, "COCO annotation file")  # size and depth limits checked
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: a COCO file holds a JSON object, found {type(data).__name__}")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: missing the '{key}' list of a COCO file")
    if not isinstance(data.get("annotations", []), list):
        raise DatasetError(f"{path}: 'annotations' must be a list")
    return data


def coco_categories(data: dict, path: str | Path = "") -> tuple[list[str], dict[int, int]]:
    """(class names, category id -> contiguous index), grouping-only categories removed."""
    check("categories", len(data["categories"]), "max_classes", str(path), DatasetError)
    cats = []
    for c in data["categories"]:
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise DatasetError(f"{path}: malformed category entry {short_repr(c)} (needs 'id' and 'name')")
        cats.append(c)
        if _int_key(c["id"]) is None:
            raise DatasetError(f"{path}: category id {c['id']!r} of {c['name']!r} is not an integer")
    cats.sort(key=lambda c: int(c["id"]))
    used = {_int_key(a.get("category_id")) for a in data.get("annotations", []) if isinstance(a, dict)}
    supers = {c.get("supercategory") for c in cats}
    classes = [c for c in cats if not (c["name"] in supers and int(c["id"]) not in used and len(cats) > 1)]
    names = [str(c["name"]) for c in classes]
    return names, {int(c["id"]): i for i, c in enumerate(classes)}


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_key(v: object) -> int | None:
    """An integer id, also when written as a string ("3"); else None."""
    if _is_int(v):
        return int(v)
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    return None


def _number(v: object) -> float | None:
    """A JSON number, or a string holding one (some exporters quote them); else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def _dim(v: object) -> int:
    """A width/height as written, or 0 (then read from the image header)."""
    n = _number(v)
    return int(n) if n is not None and math.isfinite(n) and n >= 1 else 0


def _hashable(v: object) -> bool:
    try:
        hash(v)
    except TypeError:
        return False
    return True


def load_coco(
    json_path: str | Path,
    image_dir: str | Path | None = None,
    split: str = "train",
    class_names: list[str] | None = None,
    format_name: str = "coco",
) -> DetectionSplit:
    """Read one COCO annotation file; images are looked up under ``image_dir`` (default: the
    JSON's folder). ``class_names`` (e.g. from another split) must match the file's classes."""
    json_path = Path(json_path)
    image_dir = Path(image_dir) if image_dir is not None else json_path.parent
    data = load_coco_json(json_path)
    names, cat_to_idx = coco_categories(data, json_path)
    if class_names is not None and list(class_names) != names:
        raise DatasetError(
            f"{json_path}: classes {names} differ from the dataset's classes {list(class_names)}"
        )
    problems: list[Problem] = []
    file = str(json_path)

    entries: list[dict] = []
    for im in data["images"]:
        if (
            not isinstance(im, dict)
            or "id" not in im
            or not isinstance(im.get("file_name"), str)
            or not _hashable(im["id"])
        ):
            problems.append(
                Problem(
                    "bad_entry", file, f"image entry {short_repr(im)} lacks an 'id' or a string 'file_name'", "fatal"
                )
            )
            continue
        entries.append(im)
    # string (or mixed) ids: 1..N in file order; the original stays on the record
    remap = not all(_is_int(im["id"]) for im in entries)
    images: dict[int, dict] = {}
    id_of: dict = {}  # id as written -> int id
    by_name: dict[str, object] = {}
    for im in entries:
        raw = im["id"]
        if raw in id_of:
            problems.append(
                Problem(
                    "duplicate_id",
                    file,
                    f"image id {raw!r} used by both {images[id_of[raw]]['file_name']!r} and {im['file_name']!r}",
                    "fatal",
                )
            )
            continue
        if im["file_name"] in by_name:
            problems.append(
                Problem(
                    "duplicate_file",
                    file,
                    f"image ids {by_name[im['file_name']]!r} and {raw!r} both name the file "
                    f"{im['file_name']!r}: its boxes would be split over two samples, each teaching the "
                    "other's objects as background; merge them into one image entry",
                    "fatal",
                )
            )
            continue
        by_name[im["file_name"]] = raw
        iid = len(images) + 1 if remap else raw
        id_of[raw] = iid
        images[iid] = im

    anns_by_image: dict[int, list[dict]] = defaultdict(list)
    seen_ann_ids: set = set()
    annotations = data.get("annotations", [])
    if images and not annotations:
        problems.append(
            Problem(
                "no_annotations",
                file,
                f"{'an empty' if 'annotations' in data else 'no'} annotation list: all {len(images)} "
                "image(s) are negatives (background only)",
            )
        )
    for a in annotations:
        if not isinstance(a, dict) or "image_id" not in a:
            problems.append(Problem("bad_entry", file, f"annotation {short_repr(a)} lacks 'image_id'"))
            continue
        aid = a.get("id")
        if aid is not None and _hashable(aid):
            if aid in seen_ann_ids:
                problems.append(Problem("duplicate_id", file, f"annotation id {aid} appears more than once"))
            seen_ann_ids.add(aid)
        raw = a["image_id"]
        if remap and _hashable(raw) and raw not in id_of and str(raw) in id_of:
            raw = str(raw)  # image id "7" written as 7 in the annotation
        if not _hashable(raw) or raw not in id_of:
            problems.append(
                Problem("unknown_image", file, f"annotation {aid} refers to unknown image id {raw!r}")
            )
            continue
        anns_by_image[id_of[raw]].append(a)

    records = []
    for iid, im in images.items():
        img_file = f"{file} (image {im['file_name']})"
        try:
            path = image_path(image_dir, im["file_name"], file)
        except DatasetError as e:
            problems.append(Problem("image_outside_dataset", file, str(e).split(": ", 1)[1], "fatal"))
            continue
        check_box_count(len(anns_by_image.get(iid, [])), img_file)
        boxes, labels, crowd, where = [], [], [], []
        for a in anns_by_image.get(iid, []):
            aid = a.get("id")
            cid = _int_key(a.get("category_id"))
            if cid not in cat_to_idx:
                problems.append(
                    Problem(
                        "unknown_class",
                        img_file,
                        f"annotation {aid}: category id {a.get('category_id')!r} is not a class",
                    )
                )
                continue
            bb = a.get("bbox")
            if not isinstance(bb, (list, tuple)) or len(bb) != 4:
                problems.append(
                    Problem("bad_entry", img_file, f"annotation {aid}: bbox {bb!r} is not [x, y, w, h]")
                )
                continue
            values = [_number(v) for v in bb]
            if any(v is None for v in values):
                problems.append(
                    Problem(
                        "bad_entry",
                        img_file,
                        f"annotation {aid}: bbox {bb!r} has coordinates that are not numbers, dropped",
                    )
                )
                continue
            if any(isinstance(v, str) for v in bb):
                problems.append(
                    Problem(
                        "string_number",
                        img_file,
                        f"annotation {aid}: bbox {bb!r} holds numbers written as strings; read as numbers",
                    )
                )
            x, y, w, h = values
            boxes.append([x, y, x + w, y + h])
            labels.append(cat_to_idx[cid])
            crowd.append(bool(a.get("iscrowd", 0)))
            where.append(f"annotation {aid}")
        width, height = (_dim(im.get(k)) for k in ("width", "height"))
        if width < 1 or height < 1:
            from detectkit.data.images import ImageReadError, image_size

            try:
                width, height = image_size(path)
            except ImageReadError:
                width = height = 0  # reported by the image check; boxes cannot be validated yet
        if width > 0 and height > 0:
            b, lab, (cr,) = clean_boxes(
                np.array(boxes),
                np.array(labels),
                width,
                height,
                img_file,
                problems,
                [np.array(crowd, bool)],
                where,
            )
        else:
            b, lab, cr = np.array(boxes, np.float32), np.array(labels, np.int64), np.array(crowd, bool)
        source_id = im["id"] if remap else None
        records.append(ImageRecord(path, iid, width, height, b, lab, iscrowd=cr, source_id=source_id))
    records.sort(key=lambda r: r.image_id)
    log_problems(problems, f"{json_path} ({split})")
    return DetectionSplit(format_name, split, names, records, problems, str(json_path))


def write_coco(
    path: str | os.PathLike,
    records: Sequence[ImageRecord],
    class_names: Sequence[str],
    info: dict[str, Any],
    file_names: Sequence[str] | None = None,
    supercategory: str = "none",
    decimals: int | None = None,
) -> Path:
    """Write ``records`` (boxes xyxy in original pixels) as a COCO annotation file, atomically.

    ``file_names``: each image's ``file_name`` (default: its path's name); ``decimals`` rounds
    ``bbox`` and ``area`` (generated data keeps its files small and stable).
    """
    names = [r.path.name for r in records] if file_names is None else list(file_names)
    images, annotations = [], []
    for rec, name in zip(records, names, strict=True):
        images.append({"id": int(rec.image_id), "file_name": name, "width": int(rec.width), "height": int(rec.height)})
        for box, label, crowd in zip(rec.boxes.tolist(), rec.labels.tolist(), rec.iscrowd.tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            bbox, area = [box[0], box[1], w, h], w * h
            if decimals is not None:
                bbox, area = [round(v, decimals) for v in bbox], round(area, decimals)
            annotations.append({"id": len(annotations) + 1, "image_id": int(rec.image_id), "category_id": int(label) + 1,
                                "bbox": bbox, "area": area, "iscrowd": int(crowd)})
    coco = {
        "info": info,
        "licenses": [],
        "categories": [{"id": i + 1, "name": n, "supercategory": supercategory} for i, n in enumerate(class_names)],
        "images": images,
        "annotations": annotations,
    }
    return atomic_write(path, json.dumps(coco))
