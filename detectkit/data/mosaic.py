"""Dataset-level mixing transforms (they need several samples, so they are not albumentations
ops): 4-image mosaic and mixup."""

from __future__ import annotations

import cv2
import numpy as np

from detectkit.data.transforms import pad_outside

__all__ = ["mosaic4", "mixup"]


def _resize_longest(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    h, w = image.shape[:2]
    r = size / max(h, w)
    if r != 1:
        image = cv2.resize(
            image, (max(1, round(w * r)), max(1, round(h * r))), interpolation=cv2.INTER_LINEAR
        )
    return image, r


def mosaic4(
    samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    size: int,
    rng: np.random.Generator,
    pad_value: int = 114,
    min_visibility: float = 0.1,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Four (image, boxes xyxy, labels) around a random centre of a 2S canvas, then the S x S
    window around that centre: every tile shows, objects keep their scale (YOLOX-style).

    ``out``: an S x S x 3 uint8 buffer to build the window in (and return), e.g. one scratch
    buffer reused for every sample of a worker when the next step copies out of it anyway; only
    the parts no tile covers are padded."""
    if len(samples) != 4:
        raise ValueError(f"mosaic4 needs 4 samples, got {len(samples)}")
    s = size
    xc, yc = (int(v) for v in rng.uniform(0.5 * s, 1.5 * s, 2))
    ox, oy = xc - s // 2, yc - s // 2  # the S x S output window inside the (virtual) 2S canvas
    # Tiles are copied straight into the window: no 2S x 2S canvas is filled and cropped (4x the
    # memory traffic); the pixels are the same as cropping that canvas.
    if out is None or out.shape != (s, s, 3) or out.dtype != np.uint8:
        out = np.empty((s, s, 3), np.uint8)
    cx, cy = xc - ox, yc - oy  # the centre in window coordinates; tile k fills part of quadrant k
    quadrants = ((0, 0, cx, cy), (cx, 0, s, cy), (0, cy, cx, s), (cx, cy, s, s))
    all_boxes, all_labels = [], []
    for k, (img, boxes, labels) in enumerate(samples):
        img, r = _resize_longest(img, s)
        h, w = img.shape[:2]
        # quadrant placement in the 2S canvas: tile k touches the centre with its inner corner
        if k == 0:
            x1, y1, x2, y2 = max(xc - w, 0), max(yc - h, 0), xc, yc
            sx1, sy1 = w - (x2 - x1), h - (y2 - y1)
        elif k == 1:
            x1, y1, x2, y2 = xc, max(yc - h, 0), min(xc + w, 2 * s), yc
            sx1, sy1 = 0, h - (y2 - y1)
        elif k == 2:
            x1, y1, x2, y2 = max(xc - w, 0), yc, xc, min(yc + h, 2 * s)
            sx1, sy1 = w - (x2 - x1), 0
        else:
            x1, y1, x2, y2 = xc, yc, min(xc + w, 2 * s), min(yc + h, 2 * s)
            sx1, sy1 = 0, 0
        # the part of the tile inside the window
        vx1, vy1, vx2, vy2 = max(x1, ox), max(y1, oy), min(x2, ox + s), min(y2, oy + s)
        pad_outside(out, quadrants[k], (vx1 - ox, vy1 - oy, vx2 - ox, vy2 - oy), pad_value)
        if vx2 > vx1 and vy2 > vy1:
            out[vy1 - oy : vy2 - oy, vx1 - ox : vx2 - ox] = img[
                sy1 + vy1 - y1 : sy1 + vy2 - y1, sx1 + vx1 - x1 : sx1 + vx2 - x1
            ]
        if len(boxes):
            b = np.asarray(boxes, np.float32) * r
            b[:, 0::2] += x1 - sx1
            b[:, 1::2] += y1 - sy1
            all_boxes.append(b)
            all_labels.append(np.asarray(labels, np.int64))
    if not all_boxes:
        return out, np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    boxes = np.concatenate(all_boxes) - np.array([ox, oy, ox, oy], np.float32)
    labels = np.concatenate(all_labels)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    clipped = boxes.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, s)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, s)
    w, h = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    keep = (w > 1) & (h > 1) & (w * h >= min_visibility * np.maximum(area, 1e-6))
    return out, clipped[keep], labels[keep]


def mixup(
    a: tuple[np.ndarray, np.ndarray, np.ndarray],
    b: tuple[np.ndarray, np.ndarray, np.ndarray],
    ratio: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blend two same-size samples and keep both box sets (super-gradients / YOLOX use 0.5)."""
    (ia, ba, la), (ib, bb, lb) = a, b
    if ia.shape != ib.shape:
        raise ValueError(f"mixup needs equal image shapes, got {ia.shape} and {ib.shape}")
    img = (ia.astype(np.float32) * ratio + ib.astype(np.float32) * (1 - ratio)).round().astype(np.uint8)
    return img, np.concatenate([ba, bb]).astype(np.float32), np.concatenate([la, lb]).astype(np.int64)
