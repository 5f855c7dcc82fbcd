"""The one box drawer: predictions, ground truth, validation grids and annotated CLI output all
come from :func:`draw_boxes`, so every picture detectkit writes looks the same.

OpenCV rather than ``torchvision.utils.draw_bounding_boxes``: the latter needs a TrueType font
file for legible captions (its bitmap default is tiny and unscalable), works on CHW tensors, and
cannot place a filled caption background; cv2's Hershey font scales with the image and ships
inside opencv-python-headless.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

__all__ = ["caption", "class_color", "draw_boxes"]


def class_color(label: int) -> tuple[int, int, int]:
    """A stable RGB colour per class id (golden-ratio hue walk: neighbouring ids differ clearly)."""
    r, g, b = colorsys.hsv_to_rgb((int(label) * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _as_array(values: Any, dtype: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor, without importing torch here
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def draw_boxes(
    image: np.ndarray,
    boxes: Any,
    labels: Any,
    scores: Any | None = None,
    class_names: Sequence[str] | None = None,
    color: tuple[int, int, int] | None = None,
    line_width: int | None = None,
    show_confidence: bool = True,
    caption_below: bool = False,
    track_ids: Any | None = None,
) -> np.ndarray:
    """A copy of the HWC RGB uint8 ``image`` with ``boxes [N,4]`` (xyxy pixels) and captions drawn.

    ``labels [N]`` pick the class colour and name (``class_names``, else the number); ``scores``
    are appended to captions when ``show_confidence``. ``color`` draws every box in one colour
    (e.g. ground truth green, predictions red in validation grids); ``caption_below`` puts the
    caption inside the box's bottom edge so two layers drawn on one image do not overlap.
    ``track_ids [N]`` (tracking) prefix captions with ``#ID`` and colour each box by its ID, so
    one object keeps its colour through a video. Boxes and labels may be numpy arrays, tensors or lists.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"draw_boxes expects an HWC RGB uint8 image, got {shape} {getattr(image, 'dtype', '')}")
    boxes_a = _as_array(boxes, np.float64).reshape(-1, 4)
    labels_a = _as_array(labels, np.int64).reshape(-1)
    scores_a = None if scores is None else _as_array(scores, np.float64).reshape(-1)
    ids_a = None if track_ids is None else _as_array(track_ids, np.int64).reshape(-1)
    if (len(labels_a) != len(boxes_a) or (scores_a is not None and len(scores_a) != len(boxes_a))
            or (ids_a is not None and len(ids_a) != len(boxes_a))):
        raise ValueError(f"draw_boxes: {len(boxes_a)} boxes, {len(labels_a)} labels, "
                         f"{'no' if scores_a is None else len(scores_a)} scores")
    names = list(class_names or [])
    canvas = np.ascontiguousarray(image.copy())
    h, w = canvas.shape[:2]
    lw = line_width or max(1, round((h + w) / 600))
    font_scale = max(0.35, lw / 3)
    thickness = max(1, lw - 1)
    for i, (box, label) in enumerate(zip(boxes_a, labels_a)):
        c = color or class_color(int(label) if ids_a is None else int(ids_a[i]))
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), c, lw, cv2.LINE_AA)
        text = names[int(label)] if 0 <= int(label) < len(names) else str(int(label))
        if ids_a is not None:
            text = f"#{int(ids_a[i])} {text}"
        if scores_a is not None and show_confidence:
            text += f" {float(scores_a[i]):.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
        if caption_below:  # baseline just inside the bottom edge
            ty = max(th + base, min(h - 1, y2) - base // 2)
        else:  # above the box, or inside its top when there is no room
            ty = y1 - 2 if y1 - th - base - 2 >= 0 else min(h - 1, y1 + th + base + 2)
        cv2.rectangle(canvas, (x1, ty - th - base), (x1 + tw, ty + base // 2), c, -1)
        ink = (0, 0, 0) if 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] > 150 else (255, 255, 255)
        cv2.putText(canvas, text, (x1, ty - base // 2), cv2.FONT_HERSHEY_SIMPLEX, font_scale, ink, thickness,
                    cv2.LINE_AA)
    return canvas


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def caption(image: np.ndarray, text: str) -> np.ndarray:
    """``image`` (HWC uint8) under a white strip holding ``text`` (wrapped): a note a reader sees
    with the picture, e.g. why no box was drawn."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    lines = _wrap(text, max(20, image.shape[1] // 7)).split("\n")
    strip = Image.new("RGB", (image.shape[1], 6 + 14 * len(lines)), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
        draw.text((4, 3 + 14 * i), line, fill=(170, 20, 20), font=font)
    return np.concatenate([np.asarray(strip), image[..., :3]], axis=0)
