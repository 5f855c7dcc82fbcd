"""`detectkit data convert`: any supported format -> COCO JSON (or YOLO txt), per split.

Records are written as the readers cleaned them (clipped boxes, dropped degenerate ones) and
images are copied, so the output is self-contained and re-reads to the same boxes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from tqdm import tqdm

from detectkit.data.formats.coco import write_coco
from detectkit.data.formats.detect import canonical_split, open_dataset
from detectkit.data.images import check_images
from detectkit.data.records import DatasetError, DetectionSplit, log_problems

__all__ = ["convert_dataset", "write_coco_split", "write_yolo_split"]


def _unique_names(split: DetectionSplit) -> list[str]:
    """Flat file names for the copied images; clashes (same name in two folders) get a prefix."""
    seen: set[str] = set()
    out = []
    for i, r in enumerate(split.records):
        name = r.path.name
        if name in seen:
            name = f"{i:06d}_{name}"
        seen.add(name)
        out.append(name)
    return out


def _copy(src: Path, dst: Path, copy_images: bool) -> None:
    if copy_images and src.resolve() != dst.resolve():
        shutil.copy2(src, dst)


def write_coco_split(
    split: DetectionSplit, out_dir: Path, copy_images: bool = True, progress: bool = True
) -> Path:
    """``out_dir/annotations.json`` (the one COCO writer: category ids 1..C in class order) + images."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = _unique_names(split)
    for rec, name in tqdm(
        list(zip(split.records, names)), desc=f"coco {split.split}", unit="img", disable=not progress
    ):
        _copy(rec.path, out_dir / name, copy_images)
    info = {"description": f"converted by detectkit from {split.format} ({split.source})"}
    return write_coco(out_dir / "annotations.json", split.records, split.class_names, info, file_names=names)


def write_yolo_split(
    split: DetectionSplit, out_dir: Path, copy_images: bool = True, progress: bool = True
) -> Path:
    """``out_dir/images`` + ``out_dir/labels`` (normalised cx cy w h; crowd boxes are left out)."""
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "labels").mkdir(parents=True, exist_ok=True)
    names = _unique_names(split)
    for rec, name in tqdm(
        list(zip(split.records, names)), desc=f"yolo {split.split}", unit="img", disable=not progress
    ):
        _copy(rec.path, out_dir / "images" / name, copy_images)
        boxes, labels = rec.train_targets()
        lines = []
        for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist()):
            cx, cy = (x1 + x2) / 2 / rec.width, (y1 + y2) / 2 / rec.height
            w, h = (x2 - x1) / rec.width, (y2 - y1) / rec.height
            lines.append(f"{label} {cx:.8f} {cy:.8f} {w:.8f} {h:.8f}")
        (out_dir / "labels" / Path(name).with_suffix(".txt")).write_text(
            "\n".join(lines) + ("\n" if lines else "")
        )
    return out_dir


def convert_dataset(
    src: str | Path,
    dst: str | Path,
    to: str = "coco",
    copy_images: bool = True,
    progress: bool = True,
    class_names: list[str] | None = None,
) -> dict:
    """Convert every split of ``src``; images that cannot be read are left out and reported.

    ``class_names``: the class list of a VOC or CreateML source (see :func:`open_dataset`).
    Returns ``{"format", "splits": {name: {"images", "boxes", "skipped"}}, "output", "problems"}``
    (``problems``: dataset-level ones, e.g. a split folder read without its data.yaml key).
    """
    if to not in ("coco", "yolo"):
        raise ValueError(f"--to must be 'coco' or 'yolo', got {to!r}")
    source = open_dataset(src, class_names)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    problems = source.problems
    log_problems(problems, str(src))
    summary: dict = {
        "format": source.format,
        "to": to,
        "splits": {},
        "output": str(dst),
        "problems": [p.to_dict() for p in problems],
    }
    for name in source.splits:
        split = source.load(name)
        if split.fatal_problems():
            raise DatasetError("; ".join(str(p) for p in split.fatal_problems()))
        bad = {p.file for p in check_images(split) if p.severity == "error"}
        skipped = len(bad)
        split.records = [r for r in split.records if str(r.path) not in bad]
        if to == "coco":
            write_coco_split(split, dst / name, copy_images, progress)
        else:
            write_yolo_split(split, dst / name, copy_images, progress)
        summary["splits"][name] = {"images": len(split.records), "boxes": split.num_boxes, "skipped": skipped}
    if to == "yolo":
        # ultralytics joins relative split paths onto ``path``, and resolves a relative ``path``
        # (or, in some versions, the folder of a relative yaml path when ``path`` is left out)
        # against its DATASETS_DIR or the current directory, never the yaml's folder: only an
        # absolute ``path`` works from any directory. (detectkit's reader falls back to the
        # yaml's folder if the output is moved and that path is gone.)
        data = {
            "path": str(dst.resolve()),
            "names": {i: n for i, n in enumerate(source.class_names)},
            "nc": len(source.class_names),
        }
        for name in source.splits:
            data[canonical_split(name)] = f"{name}/images"
        (dst / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return summary
