"""The one record type every format reader produces, and the box cleaning they all share.

Readers never drop or fix anything silently: each dropped or clipped box, missing image or
unknown class becomes a :class:`Problem` naming the file, kept on the split and logged once
as a summary.
"""

from __future__ import annotations

import json
import logging
import os
import reprlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detectkit import limits

__all__ = [
    "ImageRecord",
    "Problem",
    "DetectionSplit",
    "DatasetError",
    "clean_boxes",
    "log_problems",
    "SPLIT_ALIASES",
    "IMAGE_ROOTS_ENV",
    "image_path",
    "read_json_file",
    "check_box_count",
    "short_repr",
]

#: extra folders (``os.pathsep``-separated) that annotation files may name images in, besides the dataset's own
IMAGE_ROOTS_ENV = "DETECTKIT_IMAGE_ROOTS"

log = logging.getLogger("detectkit.data")

# canonical split -> names datasets use for it (Roboflow writes "valid")
SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    # ``trainval`` last: VOC offers it as a split only without train.txt + val.txt
    "train": ("train", "training", "train2017", "trainval"),
    "val": ("val", "valid", "validation", "val2017"),
    "test": ("test", "testing", "test2017", "test-dev"),
}

# Boxes sticking out by less than this many pixels are rounding noise: clipped without a problem.
OUTSIDE_TOLERANCE_PX = 0.5


class DatasetError(ValueError):
    """Bad input that cannot be skipped: the message names the file and the problem."""

    #: torch's DataLoader re-raises a worker's exception as ``type(message=<worker traceback>)``
    #: when the type has a ``message`` attribute: the traceback is cut back to our one line
    message = "dataset error"

    def __init__(self, *args: Any, message: str | None = None) -> None:
        if message is not None and not args:
            args = (_original_message(message, type(self).__name__),)
        super().__init__(*args)


def _original_message(wrapped: str, name: str) -> str:
    """The last ``...DatasetError: text`` line of a worker's formatted traceback (else all of it)."""
    for line in reversed(wrapped.strip().splitlines()):
        head, sep, text = line.partition(": ")
        if sep and head.split(".")[-1] == name:
            return text
    return wrapped


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict = 3, 80, 80, 6, 6


def short_repr(value: object) -> str:
    """A bounded repr for messages: a hostile entry nested 100 deep or 1 MB wide stays one short line."""
    return _SHORT.repr(value)


def read_json_file(path: Path, what: str) -> Any:
    """One annotation file's JSON: its size checked against ``max_annotation_file_bytes`` before
    it is read and its depth against ``max_json_depth`` (never a RecursionError); errors are a
    :class:`DatasetError` naming the file."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DatasetError(f"{path}: cannot read {what} ({e.strerror or e})") from e
    limits.check(f"{what} size (bytes)", size, "max_annotation_file_bytes", str(path), DatasetError)
    try:
        with open(path, "rb") as f:
            text = f.read()
        return limits.loads_json(text.decode("utf-8-sig"), str(path))  # a BOM is not part of the JSON
    except limits.LimitError as e:
        raise DatasetError(str(e)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read {what} ({e.strerror or e})") from e


def check_box_count(count: int, file: str) -> None:
    """More boxes on one image than ``max_annotations_per_image`` is a :class:`DatasetError`
    (200k boxes on an image make each training step take minutes)."""
    limits.check("annotations on one image", count, "max_annotations_per_image", file, DatasetError)


def image_roots() -> list[Path]:
    """The extra image folders the user allowed (``DETECTKIT_IMAGE_ROOTS``)."""
    return [Path(p) for p in os.environ.get(IMAGE_ROOTS_ENV, "").split(os.pathsep) if p]


def image_path(root: Path, name: str, where: str) -> Path:
    """``root / name`` for an image an annotation file names, which must stay inside ``root`` (or an
    extra folder listed in ``DETECTKIT_IMAGE_ROOTS``): a ``../`` or absolute name pointing out of the
    dataset is a :class:`DatasetError`, never a silent read elsewhere. The check is on the path as
    written (normalised), so symlinked image folders inside the dataset keep working."""
    path = Path(os.path.normpath(os.path.join(root, name)))
    allowed = [Path(os.path.normpath(os.path.abspath(r))) for r in (root, *image_roots())]
    full = Path(os.path.abspath(path))
    if not any(full == r or r in full.parents for r in allowed):
        raise DatasetError(
            f"{where}: image {name!r} resolves outside the dataset folder {root} (to {full}); images must "
            f"stay inside it (allow other folders with {IMAGE_ROOTS_ENV}=/folder{os.pathsep}/other)"
        )
    return path


@dataclass
class Problem:
    """One thing wrong with the input. ``severity``: ``warning`` (fixed: clipped/dropped),
    ``error`` (an image is unusable: fails setup unless ``skip_bad_images``), ``fatal``
    (the annotation file itself cannot be used)."""

    kind: str
    file: str
    message: str
    severity: str = "warning"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "file": self.file, "message": self.message, "severity": self.severity}

    def __str__(self) -> str:
        return f"[{self.severity}] {self.kind}: {self.file}: {self.message}"


@dataclass
class ImageRecord:
    """One image and its boxes in ORIGINAL pixels of the displayed (EXIF-rotated) image."""

    path: Path
    image_id: int
    width: int
    height: int
    boxes: np.ndarray  # float32 [n, 4] xyxy
    labels: np.ndarray  # int64 [n], contiguous 0..C-1
    iscrowd: np.ndarray = None  # bool [n]; crowd boxes are kept for evaluation only
    difficult: np.ndarray = None  # bool [n] (VOC)
    #: the image id as the annotation file wrote it, where that is not ``image_id`` (COCO string
    #: ids are mapped to 1..N in file order; results written for that file need the original)
    source_id: int | str | None = None

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        n = len(self.boxes)
        self.iscrowd = (
            np.zeros(n, bool) if self.iscrowd is None else np.asarray(self.iscrowd, bool).reshape(-1)
        )
        self.difficult = (
            np.zeros(n, bool) if self.difficult is None else np.asarray(self.difficult, bool).reshape(-1)
        )
        if not (len(self.labels) == len(self.iscrowd) == len(self.difficult) == n):
            raise ValueError(f"{self.path}: boxes/labels/iscrowd/difficult lengths differ")

    @property
    def num_boxes(self) -> int:
        return len(self.boxes)

    def train_targets(self) -> tuple[np.ndarray, np.ndarray]:
        """Boxes/labels used for training: crowd regions are not objects to learn."""
        keep = ~self.iscrowd
        return self.boxes[keep], self.labels[keep]


@dataclass
class DetectionSplit:
    """One split of a dataset as read from disk: records plus everything found wrong."""

    format: str
    split: str
    class_names: list[str]
    records: list[ImageRecord]
    problems: list[Problem] = field(default_factory=list)
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_boxes(self) -> int:
        return sum(r.num_boxes for r in self.records)

    def per_class(self) -> dict[str, int]:
        counts = Counter()
        for r in self.records:
            counts.update(r.labels.tolist())
        return {name: int(counts.get(i, 0)) for i, name in enumerate(self.class_names)}

    def fatal_problems(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "fatal"]


def clean_boxes(
    boxes: np.ndarray,
    labels: np.ndarray,
    width: int,
    height: int,
    file: str,
    problems: list[Problem],
    extra: list[np.ndarray] | None = None,
    where: list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Clip boxes to the image and drop degenerate ones, recording a problem for each change.

    ``extra`` arrays (iscrowd, difficult) are filtered alongside; ``where`` names each box's
    origin (line number, annotation id) for the problem messages.
    """
    check_box_count(len(boxes), file)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    extra = list(extra or [])
    n = len(boxes)
    where = where or [f"box {i}" for i in range(n)]
    keep = np.ones(n, bool)
    finite = np.isfinite(boxes).all(1)
    for i in np.flatnonzero(~finite):
        problems.append(
            Problem("degenerate_box", file, f"{where[i]}: non-finite coordinates {boxes[i].tolist()}")
        )
        keep[i] = False
    if n:
        tol = OUTSIDE_TOLERANCE_PX
        outside = finite & (
            (boxes[:, 0] < -tol)
            | (boxes[:, 1] < -tol)
            | (boxes[:, 2] > width + tol)
            | (boxes[:, 3] > height + tol)
        )
        raw = boxes.copy()
        boxes = boxes.copy()
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, width)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, height)
        degenerate = finite & ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
        for i in np.flatnonzero(outside):
            fate = "entirely outside, dropped" if degenerate[i] else "clipped"
            problems.append(
                Problem(
                    "box_outside",
                    file,
                    f"{where[i]}: box {np.round(raw[i], 2).tolist()} outside the {width}x{height} image, {fate}",
                )
            )
        for i in np.flatnonzero(degenerate & ~outside):
            problems.append(
                Problem(
                    "degenerate_box",
                    file,
                    f"{where[i]}: zero or negative size {np.round(raw[i], 2).tolist()}, dropped",
                )
            )
        keep &= ~degenerate
    return boxes[keep], labels[keep], [np.asarray(e)[keep] for e in extra]


def log_problems(problems: list[Problem], context: str, max_lines: int = 5) -> None:
    """One summary line per problem kind plus the first few, so large datasets do not flood logs."""
    if not problems:
        return
    kinds = Counter(p.kind for p in problems)
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items()))
    log.warning("%s: %d problem(s) found (%s)", context, len(problems), summary)
    for p in problems[:max_lines]:
        log.warning("  %s", p)
    if len(problems) > max_lines:
        log.warning(
            "  ... %d more (run `detectkit data inspect` for the full list)", len(problems) - max_lines
        )
