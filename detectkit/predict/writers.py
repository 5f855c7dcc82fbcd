"""THE COCO results writer (``[{image_id, category_id, bbox [x, y, w, h], score}]`` rows) and THE
video writer (annotated frames -> a video file).

One category-id rule for every writer (``detectkit predict``, the Lightning prediction writer,
``ImagePrediction.to_coco``, the server): ``category_ids[label]`` when the model (or the dataset
it was trained on) maps labels to dataset ids, else ``label + 1``, the ids of detectkit's own COCO
files (synthetic data, ``data convert``) and of Roboflow COCO exports (id 0 is their unused
super-category). COCO 2017's non-contiguous ids need the mapping.

``Predictions.save("out.mp4")`` and ``detectkit predict`` on a video both write through
:class:`VideoWriter`: one FourCC per container, one size check, one error when OpenCV cannot
encode.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detectkit.utils.files import atomic_write

__all__ = ["category_id", "category_ids_of", "coco_rows", "write_coco_results", "mot_lines", "track_rows",
           "VideoWriter"]

# FourCC per container; mp4v/MJPG ship with opencv-python-headless's FFmpeg build.
_FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}


def category_id(label: int, category_ids: Sequence[int] | None) -> int:
    """The dataset category id of a contiguous class ``label``."""
    label = int(label)
    if category_ids is None:
        return label + 1
    if not 0 <= label < len(category_ids):
        raise ValueError(f"label {label} has no category id (the mapping has {len(category_ids)} entries)")
    return int(category_ids[label])


def category_ids_of(model: Any, datamodule: Any = None) -> list[int] | None:
    """The mapping to use: the model's ``category_ids`` (set by ``detectkit.load`` from the
    checkpoint), else the datamodule's (a Lightning run), else None (``label + 1``)."""
    for owner in (model, getattr(model, "model", None), datamodule):
        ids = getattr(owner, "category_ids", None) if owner is not None else None
        if ids is not None:
            return [int(i) for i in ids]
    return None


def _array(values: Any, dtype: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def coco_rows(
    image_id: int | str,
    boxes: Any,
    scores: Any,
    labels: Any,
    category_ids: Sequence[int] | None = None,
    decimals: int | None = None,
) -> list[dict[str, Any]]:
    """Rows for one image from xyxy ``boxes [N,4]`` (original pixels), ``scores [N]``, ``labels [N]``.
    ``decimals`` rounds bbox (and score to ``decimals + 3``) to keep large JSON files small."""
    b = _array(boxes, np.float64).reshape(-1, 4)
    s = _array(scores, np.float64).reshape(-1)
    lab = _array(labels, np.int64).reshape(-1)
    rows = []
    for (x1, y1, x2, y2), score, label in zip(b.tolist(), s.tolist(), lab.tolist()):
        bbox = [x1, y1, x2 - x1, y2 - y1]
        if decimals is not None:
            bbox, score = [round(v, decimals) for v in bbox], round(score, decimals + 3)
        rows.append({"image_id": image_id, "category_id": category_id(label, category_ids), "bbox": bbox,
                     "score": score})
    return rows


def write_coco_results(path: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """Write the rows as JSON, atomically (a reader never sees half a file)."""
    return atomic_write(path, json.dumps(rows))


def mot_lines(frame: int, boxes: Any, track_ids: Any, scores: Any) -> list[str]:
    """MOT-challenge rows ``frame,id,x,y,w,h,conf,-1,-1,-1`` (frame 1-based, boxes xyxy pixels):
    what TrackEval, ``trackers.eval`` and motmetrics read."""
    b = _array(boxes, np.float64).reshape(-1, 4)
    ids = _array(track_ids, np.int64).reshape(-1)
    s = _array(scores, np.float64).reshape(-1)
    return [f"{int(frame)},{int(i)},{x1:.2f},{y1:.2f},{x2 - x1:.2f},{y2 - y1:.2f},{score:.4f},-1,-1,-1"
            for (x1, y1, x2, y2), i, score in zip(b.tolist(), ids.tolist(), s.tolist())]


def track_rows(frame: int, boxes: Any, track_ids: Any, scores: Any, labels: Any,
               category_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """The JSON form of the same tracks: ``{frame, track_id, category_id, bbox [x, y, w, h], score}``
    (category ids by the one rule of :func:`category_id`)."""
    rows = coco_rows(frame, boxes, scores, labels, category_ids)
    ids = _array(track_ids, np.int64).reshape(-1).tolist()
    return [{"frame": row.pop("image_id"), "track_id": int(i), **row} for row, i in zip(rows, ids)]


class VideoWriter:
    """Annotated RGB frames -> ``path`` at ``fps``; the first frame's size is the video's.

    The container follows the suffix (``.mp4``/``.mov``/``.m4v`` as mp4v, ``.avi``/``.mkv`` as
    MJPG). Opened at the first frame, so a stream of unknown size can be written as it comes;
    use as a context manager (or call :meth:`close`) so the file is finalised.
    """

    def __init__(self, path: str | os.PathLike, fps: float) -> None:
        self.path = Path(path)
        self.fps = float(fps)
        self._writer: Any = None
        self._size: tuple[int, int] | None = None

    def write(self, frame: np.ndarray) -> None:
        """Append one HWC RGB uint8 frame."""
        import cv2

        h, w = frame.shape[:2]
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fourcc = cv2.VideoWriter_fourcc(*_FOURCC.get(self.path.suffix.lower(), "mp4v"))
            self._writer = cv2.VideoWriter(str(self.path), fourcc, self.fps, (w, h))
            self._size = (h, w)
            if not self._writer.isOpened():
                raise OSError(f"OpenCV cannot open a video writer for {self.path}; try a .mp4 or .avi path")
        elif (h, w) != self._size:
            raise ValueError(f"cannot write {self.path}: a {h}x{w} frame in a {self._size[0]}x{self._size[1]} video")
        self._writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
