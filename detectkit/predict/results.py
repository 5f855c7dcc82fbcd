"""What ``model.predict`` returns: detections in original-image pixels, drawable and exportable."""

from __future__ import annotations

import urllib.parse
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np
from PIL import Image

from detectkit.data.letterbox import LetterboxInfo
from detectkit.predict.draw import draw_boxes
from detectkit.predict.sources import VIDEO_EXTENSIONS, is_url
from detectkit.predict.writers import VideoWriter, coco_rows

__all__ = ["ImagePrediction", "Predictions"]

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
    #: position in the prediction stream (names images that have no file name)
    index: int = 0
    #: label -> dataset category id (the model's, from its checkpoint); None = ``label + 1``
    category_ids: list[int] | None = None
    #: the highest class score of any anchor before the conf threshold (why an image came back empty)
    best_score: float | None = None
    #: ``[N]`` track IDs when the frames went through a tracker (:mod:`detectkit.predict.track`)
    track_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def name(self) -> str:
        """A file name for this image: the source's (``img.jpg``; ``clip_000012.jpg`` for frame 12
        of ``clip.mp4``), else ``image_000003.jpg`` from its position in the stream."""
        src = self.source
        if src is None:
            return f"image_{self.index:06d}.jpg"
        if self.fps is not None and "#" in src:
            video, frame = src.rsplit("#", 1)
            stem = Path(urllib.parse.urlparse(video).path if is_url(video) else video).stem or "video"
            return f"{stem}_{int(frame):06d}.jpg"
        name = Path(urllib.parse.urlparse(src).path if is_url(src) else src).name
        return name or f"image_{self.index:06d}.jpg"

    @property
    def frame(self) -> int:
        """The frame's index in its video (from the source's ``#N``; with ``vid_stride`` the
        original video's numbering), else its position in the prediction stream."""
        if self.fps is not None and self.source and "#" in self.source:
            return int(self.source.rsplit("#", 1)[1])
        return self.index

    @property
    def names(self) -> list[str]:
        """Class name of every detection."""
        return [self._name(int(c)) for c in self.labels]

    def _name(self, label: int) -> str:
        return self.class_names[label] if 0 <= label < len(self.class_names) else str(label)

    def draw(self, show_confidence: bool = True, line_width: int | None = None) -> np.ndarray:
        """A copy of the image (RGB) with boxes and labels drawn on it (the one drawer)."""
        return draw_boxes(self.image, self.boxes, self.labels, self.scores, self.class_names,
                          line_width=line_width, show_confidence=show_confidence, track_ids=self.track_ids)

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
        """COCO results rows (``bbox = [x, y, w, h]``) through the one writer: ``category_ids``
        (else the model's, recorded at predict time) maps label -> id, else ``label + 1``."""
        ids = category_ids if category_ids is not None else self.category_ids
        return coco_rows(image_id, self.boxes, self.scores, self.labels, ids)


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
        with VideoWriter(path, fps) as writer:
            for pred in self:
                writer.write(pred.draw(show_confidence))
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
