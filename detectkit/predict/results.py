"""What ``model.predict`` returns: detections in original-image pixels, drawable and exportable."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import cv2
import numpy as np
from PIL import Image

from detectkit.data.letterbox import LetterboxInfo
from detectkit.predict.draw import draw_boxes

__all__ = ["ImagePrediction", "Predictions", "VIDEO_EXTENSIONS"]

#: suffixes read with cv2.VideoCapture and written by Predictions.save(video_path)
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
# FourCC per container for writing; mp4v/MJPG ship with opencv-python-headless's FFmpeg build.
_FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}


@dataclass
class ImagePrediction:
    """Detections on one image. ``boxes [N,4]`` are xyxy in original-image pixels."""

    image: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    source: str | None = None
    letterbox: LetterboxInfo | None = None
    fps: float | None = None  # frame rate of the video this frame came from
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def names(self) -> list[str]:
        """Class name of every detection."""
        return [self._name(int(c)) for c in self.labels]

    def _name(self, label: int) -> str:
        return self.class_names[label] if 0 <= label < len(self.class_names) else str(label)

    def draw(self, show_confidence: bool = True, line_width: int | None = None) -> np.ndarray:
        """A copy of the image (RGB) with boxes and labels drawn on it (the one drawer)."""
        return draw_boxes(self.image, self.boxes, self.labels, self.scores, self.class_names,
                          line_width=line_width, show_confidence=show_confidence)

    def save(self, path: str | Path, show_confidence: bool = True) -> Path:
        """Write the drawn image (original size) to ``path``; the suffix picks the format."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(self.draw(show_confidence)).save(path)
        return path

    def show(self, show_confidence: bool = True) -> None:
        """Display with matplotlib; on a headless backend it warns instead of failing."""
        _show([self.draw(show_confidence)], [self.source or "prediction"])

    def to_coco(self, image_id: int | str, category_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """COCO results rows (``bbox = [x, y, w, h]``); ``category_ids`` maps label -> COCO id."""
        rows = []
        for box, score, label in zip(self.boxes, self.scores, self.labels):
            x1, y1, x2, y2 = (float(v) for v in box)
            cat = int(category_ids[int(label)]) if category_ids is not None else int(label)
            rows.append({"image_id": image_id, "category_id": cat, "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "score": float(score)})
        return rows


class Predictions(Sequence[ImagePrediction]):
    """Results for several images or the frames of a video (``fps`` set for videos)."""

    def __init__(self, items: list[ImagePrediction], fps: float | None = None) -> None:
        self._items = list(items)
        self.fps = fps

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> ImagePrediction: ...
    @overload
    def __getitem__(self, index: slice) -> Predictions: ...
    def __getitem__(self, index):
        if isinstance(index, slice):
            return Predictions(self._items[index], self.fps)
        return self._items[index]

    def __iter__(self) -> Iterator[ImagePrediction]:
        return iter(self._items)

    def __repr__(self) -> str:
        kind = f"video frames at {self.fps:g} fps" if self.fps else "images"
        return f"Predictions({len(self)} {kind}, {sum(len(p) for p in self)} detections)"

    def show(self, show_confidence: bool = True) -> None:
        _show([p.draw(show_confidence) for p in self], [p.source or f"#{i}" for i, p in enumerate(self)])

    def save(self, path: str | Path, show_confidence: bool = True, fps: float | None = None) -> Path:
        """A video file when ``path`` has a video suffix, else a folder of drawn images."""
        path = Path(path)
        if path.suffix.lower() in VIDEO_EXTENSIONS:
            return self._save_video(path, show_confidence, fps or self.fps or 25.0)
        path.mkdir(parents=True, exist_ok=True)
        used: set[str] = set()
        for i, pred in enumerate(self):
            stem = Path(pred.source).stem if pred.source and pred.fps is None else f"{i:06d}"
            if stem in used:  # the same file name from two folders or URLs
                stem = f"{stem}_{i:06d}"
            used.add(stem)
            pred.save(path / f"{stem}.jpg", show_confidence)
        return path

    def _save_video(self, path: Path, show_confidence: bool, fps: float) -> Path:
        if not self._items:
            raise ValueError(f"cannot write {path}: there are no frames")
        sizes = {p.image.shape[:2] for p in self}
        if len(sizes) != 1:
            raise ValueError(f"cannot write {path}: frames have different sizes {sorted(sizes)}")
        (h, w), = sizes
        path.parent.mkdir(parents=True, exist_ok=True)
        fourcc = cv2.VideoWriter_fourcc(*_FOURCC.get(path.suffix.lower(), "mp4v"))
        writer = cv2.VideoWriter(str(path), fourcc, float(fps), (w, h))
        if not writer.isOpened():
            raise RuntimeError(f"OpenCV cannot open a video writer for {path}; try a .mp4 or .avi path")
        try:
            for pred in self:
                writer.write(cv2.cvtColor(pred.draw(show_confidence), cv2.COLOR_RGB2BGR))
        finally:
            writer.release()
        return path


def _show(images: list[np.ndarray], titles: list[str]) -> None:
    import matplotlib
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend().lower()
    if backend in {"agg", "pdf", "ps", "svg", "cairo", "template"}:
        warnings.warn(f"matplotlib backend {backend!r} cannot display images; use .save(path) instead",
                      stacklevel=3)
        return
    for image, title in zip(images, titles):
        fig = plt.figure(figsize=(image.shape[1] / 100, image.shape[0] / 100), dpi=100)
        plt.imshow(image)
        plt.title(title)
        plt.axis("off")
        fig.tight_layout()
    plt.show()
