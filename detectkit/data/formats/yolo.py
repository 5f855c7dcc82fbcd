"""YOLO txt datasets (ultralytics / Roboflow ``data.yaml`` layouts) -> records.

Real exports are messy: Roboflow writes ``../train/images`` relative paths, some exporters
write absolute paths from their own machine, ``names`` is a list or a dict, label lines may
be polygons. All of that is resolved here; anything that cannot be is a :class:`Problem`
naming the file and line.

Also reported, never silent: ``nc`` disagreeing with ``names`` (the names win); a split folder
beside data.yaml without its key (old Roboflow exports have ``test/`` but no ``test:``; it is
read); images without a label file and empty label files (both trained as background, as
ultralytics does); label files
without an image (unused); folders reached twice through symlinks (a loop: read once). Image
folders are walked following symlinks; an image that is a broken or looping symlink is kept so
the image check reports it. Label files may start with a UTF-8 BOM.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from detectkit.data.images import IMAGE_EXTENSIONS, ImageReadError, image_size
from detectkit.data.records import (
    SPLIT_ALIASES,
    DatasetError,
    DetectionSplit,
    ImageRecord,
    Problem,
    clean_boxes,
    log_problems,
)
from detectkit.limits import check

__all__ = ["read_data_yaml", "yolo_splits", "yolo_layout", "load_yolo", "label_path_for", "yolo_class_names"]

log = logging.getLogger("detectkit.data")


def read_data_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise DatasetError(f"{path}: cannot read the YOLO data.yaml ({e})") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a mapping with 'names', found {type(data).__name__}")
    return data


def _names_from(data: dict, path: Path) -> tuple[list[str], dict[int, int]]:
    """(names, label id -> contiguous index)."""
    names = data.get("names")
    nc = data.get("nc") if names is None and isinstance(data.get("nc"), int) else 0
    declared = len(names) if isinstance(names, (list, tuple, dict)) else nc
    check("classes (names / nc)", declared, "max_classes", str(path), DatasetError)  # nc: 1e9 builds 1e9 names
    if isinstance(names, dict):
        try:
            keys = sorted(int(k) for k in names)
        except (TypeError, ValueError) as e:
            raise DatasetError(f"{path}: 'names' keys must be integers, found {list(names)}") from e
        lookup = {int(k): str(v) for k, v in names.items()}
        result = [lookup[k] for k in keys], {k: i for i, k in enumerate(keys)}
    elif isinstance(names, (list, tuple)):
        result = [str(n) for n in names], {i: i for i in range(len(names))}
    elif names is None and isinstance(data.get("nc"), int) and data["nc"] > 0:
        result = [str(i) for i in range(data["nc"])], {i: i for i in range(data["nc"])}
    else:
        raise DatasetError(f"{path}: 'names' must be a list or a dict of class names, found {names!r}")
    return result


def _nc_problems(data: dict, path: Path, names: list[str]) -> list[Problem]:
    nc = data.get("nc")
    if nc is None or (isinstance(nc, int) and not isinstance(nc, bool) and nc == len(names)):
        return []
    return [
        Problem(
            "nc_mismatch",
            str(path),
            f"nc: {nc!r} but {len(names)} names are given; the {len(names)} names are used",
        )
    ]


def yolo_class_names(yaml_path: str | Path) -> list[str]:
    yaml_path = Path(yaml_path)
    return _names_from(read_data_yaml(yaml_path), yaml_path)[0]


def _resolve_split_path(value: str, yaml_path: Path, root: Path | None, split: str) -> Path | None:
    """Find a split folder however the exporter wrote it."""
    yaml_dir = yaml_path.parent
    p = Path(value)
    candidates: list[Path] = []
    if p.is_absolute():
        candidates.append(p)
        parts = p.parts[1:]
        # exporter's absolute path: try its tails next to data.yaml, most specific first
        candidates += [yaml_dir.joinpath(*parts[-k:]) for k in range(len(parts), 0, -1)]
    else:
        for base in [b for b in (root, yaml_dir) if b is not None]:
            candidates.append(base / p)
            stripped = value
            while stripped.startswith("../"):
                stripped = stripped[3:]
                candidates.append(base / stripped)
    aliases = next((a for a in SPLIT_ALIASES.values() if split in a), (split,))
    for alias in aliases:
        candidates += [yaml_dir / alias / "images", yaml_dir / "images" / alias]
    for c in candidates:
        if c.exists():
            if c != candidates[0]:
                log.info("%s: %s path %r not found; using %s", yaml_path, split, value, c)
            return c.resolve()
    return None


def _split_folder(yaml_dir: Path, split: str) -> Path | None:
    """A split's image folder where exporters put it, for a data.yaml that does not name it."""
    aliases = next((a for a in SPLIT_ALIASES.values() if split in a), (split,))
    for alias in aliases:
        for c in (yaml_dir / alias / "images", yaml_dir / "images" / alias):
            if c.is_dir() and any(c.iterdir()):
                return c.resolve()
    return None


def yolo_layout(yaml_path: str | Path) -> tuple[dict[str, list[Path]], list[Problem]]:
    """Split name (as written in data.yaml) -> image folders or list files, and dataset-level
    problems (``nc`` vs ``names``, split folders found without a data.yaml key)."""
    yaml_path = Path(yaml_path)
    data = read_data_yaml(yaml_path)
    problems = _nc_problems(data, yaml_path, _names_from(data, yaml_path)[0])
    root = None
    if data.get("path"):
        root = Path(data["path"])
        if not root.is_absolute():
            root = yaml_path.parent / root
        if not root.exists():
            root = None
    out: dict[str, list[Path]] = {}
    for split in ("train", "val", "test"):
        value = data.get(split)
        if not value:
            found = _split_folder(yaml_path.parent, split)
            if found is not None:
                out[split] = [found]
                problems.append(
                    Problem(
                        "split_without_key",
                        str(yaml_path),
                        f"no '{split}:' key, but the {split} folder {found} is beside it: read as the "
                        f"'{split}' split (add '{split}: {os.path.relpath(found, yaml_path.parent)}' to say so)",
                    )
                )
            continue
        values = value if isinstance(value, list) else [value]
        paths = []
        for v in values:
            found = _resolve_split_path(str(v), yaml_path, root, split)
            if found is None:
                raise DatasetError(
                    f"{yaml_path}: {split} path {v!r} does not exist (also not relative to data.yaml)"
                )
            if found in paths:  # listed twice, or a missing entry that fell back to the standard folder
                raise DatasetError(f"{yaml_path}: {split} path {v!r} names {found} a second time")
            paths.append(found)
        out[split] = paths
    return out, problems


def yolo_splits(yaml_path: str | Path) -> dict[str, list[Path]]:
    """Split name (as written in data.yaml) -> image folders or list files."""
    return yolo_layout(yaml_path)[0]


def _walk(folder: Path, suffixes: tuple[str, ...], problems: list[Problem]) -> list[Path]:
    """Files under ``folder`` with these suffixes, following symlinked folders once each.

    ``Path.rglob`` neither follows a symlinked folder nor keeps an image that is a broken
    symlink, so such images vanished without a word; here a folder reached again (a symlink
    loop) is reported and read once, and every entry with an image suffix is kept.
    """
    out: list[Path] = []
    seen: dict[str, str] = {}

    def failed(e: OSError) -> None:
        problems.append(Problem("unreadable_folder", str(e.filename), f"cannot list ({e.strerror})", "error"))

    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=failed):
        real = os.path.realpath(dirpath)
        if real in seen:
            problems.append(
                Problem(
                    "symlink_loop",
                    dirpath,
                    f"a symlinked folder leading back to {seen[real]} (already read): not read again",
                )
            )
            dirnames[:] = []
            continue
        seen[real] = dirpath
        dirnames.sort()
        out += [Path(dirpath) / f for f in filenames if Path(f).suffix.lower() in suffixes]
    return sorted(out)


def label_path_for(image: Path) -> Path:
    """ultralytics convention: the last ``/images/`` in the path becomes ``/labels/``."""
    s = image.as_posix()
    i = s.rfind("/images/")
    if i < 0:
        return image.with_suffix(".txt")
    return Path(s[:i] + "/labels/" + s[i + len("/images/") :]).with_suffix(".txt")


def _list_images(src: Path, problems: list[Problem]) -> list[Path]:
    if src.is_file() and src.suffix == ".txt":
        base = src.parent
        out = []
        for line in src.read_text(encoding="utf-8-sig").splitlines():
            line = line.strip()
            if line:
                p = Path(line)
                out.append(p if p.is_absolute() else (base / p).resolve())
        return out
    return _walk(src, IMAGE_EXTENSIONS, problems)


def _orphan_labels(src: Path, used: set[Path], problems: list[Problem]) -> None:
    """Label files in the split's ``labels/`` folder that no image uses."""
    if not src.is_dir():
        return  # a list file: its label folders are shared with other lists
    label_dir = label_path_for(src / "x.jpg").parent
    if label_dir == src or not label_dir.is_dir():
        return  # labels beside the images: other .txt files there are not necessarily labels
    for label in _walk(label_dir, (".txt",), problems):
        if label not in used and label.name != "classes.txt":
            problems.append(
                Problem(
                    "orphan_label",
                    str(label),
                    f"a label file with no image (no {label.stem}.* under {src}); its boxes are not used",
                )
            )


def parse_label_file(
    label: Path, id_map: dict[int, int], width: int, height: int, problems: list[Problem]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Boxes in pixels of a ``width x height`` image; polygon lines become their bounding box."""
    boxes, labels, where = [], [], []
    try:
        text = label.read_text(encoding="utf-8-sig")  # a BOM would hide the first line's class
    except (OSError, UnicodeDecodeError) as e:
        problems.append(Problem("bad_label_file", str(label), f"cannot read ({e})", "error"))
        return np.zeros((0, 4), np.float32), np.zeros(0, np.int64), []
    if not text.strip():
        problems.append(Problem("empty_label", str(label), "no boxes: trained as a background (negative) image"))
    for lineno, line in enumerate(text.splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        try:
            cls_f = float(tokens[0])
            coords = [float(t) for t in tokens[1:]]
        except ValueError:
            problems.append(
                Problem("bad_line", str(label), f"line {lineno}: not numbers: {line[:60]!r}, skipped")
            )
            continue
        if cls_f != int(cls_f) or int(cls_f) not in id_map:
            problems.append(
                Problem(
                    "unknown_class",
                    str(label),
                    f"line {lineno}: class id {tokens[0]} not in data.yaml names, skipped",
                )
            )
            continue
        if len(coords) == 4:
            cx, cy, w, h = coords
            box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        elif len(coords) >= 6 and len(coords) % 2 == 0:
            xs, ys = coords[0::2], coords[1::2]
            box = [min(xs), min(ys), max(xs), max(ys)]
        else:
            problems.append(
                Problem(
                    "bad_line",
                    str(label),
                    f"line {lineno}: {len(coords)} coordinates (need 4 or a polygon), skipped",
                )
            )
            continue
        boxes.append([box[0] * width, box[1] * height, box[2] * width, box[3] * height])
        labels.append(id_map[int(cls_f)])
        where.append(f"line {lineno}")
    return np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64), where


def load_yolo(yaml_path: str | Path, split: str = "train", start_id: int = 0) -> DetectionSplit:
    """One split of a YOLO dataset; ``split`` is a data.yaml key or an alias (``valid`` -> ``val``)."""
    yaml_path = Path(yaml_path)
    data = read_data_yaml(yaml_path)
    names, id_map = _names_from(data, yaml_path)
    splits = yolo_splits(yaml_path)
    key = (
        split
        if split in splits
        else next((k for k, aliases in SPLIT_ALIASES.items() if split in aliases and k in splits), None)
    )
    if key is None:
        raise DatasetError(f"{yaml_path}: no '{split}' split (has {sorted(splits)})")
    problems: list[Problem] = []
    records: list[ImageRecord] = []
    seen_labels: dict[Path, Path] = {}
    images = [p for src in splits[key] for p in _list_images(src, problems)]
    # a bar only where reading takes a while (one header read + one label file per image)
    for img in tqdm(images, desc=f"yolo {split}", unit="img", disable=len(images) < 2000, leave=False):
        label = label_path_for(img)
        if label in seen_labels:
            problems.append(
                Problem(
                    "duplicate_id",
                    str(img),
                    f"shares its label file {label.name} with {seen_labels[label].name}",
                )
            )
        seen_labels[label] = img
        try:
            width, height = image_size(img)
        except ImageReadError:
            # the image check reports it (missing/unreadable); keep the record so it is counted
            records.append(ImageRecord(img, start_id + len(records), 0, 0, np.zeros((0, 4)), np.zeros(0)))
            continue
        if label.is_file():
            boxes, labels, where = parse_label_file(label, id_map, width, height, problems)
            boxes, labels, _ = clean_boxes(boxes, labels, width, height, str(label), problems, where=where)
        else:
            problems.append(
                Problem(
                    "missing_label",
                    str(img),
                    f"no label file {label}: trained as a background (negative) image",
                )
            )
            boxes, labels = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
        records.append(ImageRecord(img, start_id + len(records), width, height, boxes, labels))
    for src in splits[key]:
        _orphan_labels(src, set(seen_labels), problems)
    log_problems(problems, f"{yaml_path} ({key})")
    return DetectionSplit("yolo", key, names, records, problems, str(yaml_path))
