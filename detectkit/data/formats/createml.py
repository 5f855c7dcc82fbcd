"""Apple CreateML JSON (Roboflow export): a list of ``{image, annotations: [{label,
coordinates: {x, y, width, height}}]}`` with box CENTRES in pixels."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from detectkit.data.classnames import typo_problems
from detectkit.data.images import ImageReadError, image_size
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
)

__all__ = ["read_createml", "createml_labels", "createml_label_counts", "createml_typos", "load_createml"]


def read_createml(path: str | Path) -> list:
    path = Path(path)
    data = read_json_file(path, "CreateML JSON")  # size and depth limits checked
    if not isinstance(data, list):
        raise DatasetError(f"{path}: a CreateML file holds a JSON list, found {type(data).__name__}")
    return data


def createml_label_counts(paths: list[Path]) -> tuple[Counter, dict[str, Path]]:
    """Objects per label over all files, and the first file naming each label."""
    counts: Counter = Counter()
    first: dict[str, Path] = {}
    for p in paths:
        for entry in read_createml(p):
            for a in (entry or {}).get("annotations", []) or []:
                if isinstance(a, dict) and "label" in a:
                    counts[str(a["label"])] += 1
                    first.setdefault(str(a["label"]), p)
    return counts, first


def createml_labels(paths: list[Path]) -> list[str]:
    """The class list: CreateML stores names only, so classes are the sorted union over files."""
    return sorted(createml_label_counts(paths)[0])


def createml_typos(paths: list[Path]) -> list[Problem]:
    """Likely typos among the labels (see :func:`detectkit.data.classnames.likely_typos`)."""
    counts, first = createml_label_counts(paths)
    return typo_problems(counts, first, "label", "fix the label or pass the class list")


def load_createml(path: str | Path, split: str, class_names: list[str], start_id: int = 0) -> DetectionSplit:
    path = Path(path)
    index = {n: i for i, n in enumerate(class_names)}
    problems: list[Problem] = []
    records = []
    for k, entry in enumerate(read_createml(path)):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            problems.append(Problem("bad_entry", str(path), f"entry {k} lacks 'image'", "fatal"))
            continue
        try:
            img = image_path(path.parent, entry["image"], str(path))
        except DatasetError as e:
            problems.append(Problem("image_outside_dataset", str(path), str(e).split(": ", 1)[1], "fatal"))
            continue
        where_file = f"{path} (image {entry['image']})"
        check_box_count(len(entry.get("annotations") or []), where_file)
        boxes, labels, where = [], [], []
        for j, a in enumerate(entry.get("annotations") or []):
            c = a.get("coordinates") if isinstance(a, dict) else None
            if not isinstance(c, dict) or not all(key in c for key in ("x", "y", "width", "height")):
                problems.append(Problem("bad_entry", where_file, f"annotation {j}: missing coordinates"))
                continue
            if a.get("label") not in index:
                problems.append(
                    Problem(
                        "unknown_class",
                        where_file,
                        f"annotation {j}: label {a.get('label')!r} is not a class",
                    )
                )
                continue
            try:
                x, y, w, h = (float(c[key]) for key in ("x", "y", "width", "height"))
            except (TypeError, ValueError):
                problems.append(
                    Problem("bad_entry", where_file, f"annotation {j}: coordinates {c!r} are not numbers")
                )
                continue
            boxes.append([x - w / 2, y - h / 2, x + w / 2, y + h / 2])
            labels.append(index[a["label"]])
            where.append(f"annotation {j}")
        try:
            width, height = image_size(img)
        except ImageReadError:
            records.append(ImageRecord(img, start_id + len(records), 0, 0, np.zeros((0, 4)), np.zeros(0)))
            continue
        b, lab, _ = clean_boxes(
            np.array(boxes), np.array(labels), width, height, where_file, problems, where=where
        )
        records.append(ImageRecord(img, start_id + len(records), width, height, b, lab))
    log_problems(problems, f"{path} ({split})")
    return DetectionSplit("createml", split, list(class_names), records, problems, str(path))
