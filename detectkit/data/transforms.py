"""Augmentation: super-gradients' YOLO-NAS COCO train recipe (as albumentations 2 implements it).

Recipe (``coco_detection_yolo_nas_dataset_params.yaml``): random affine (degrees 0,
translate 0.25, scales 0.5-1.5, shear 0, boxes filtered at 2 px / 10% area / aspect 20),
HSV (p 0.5, gains 18/30/30 in OpenCV units), horizontal flip (p 0.5), mixup (p 0.5, 0.5
blend), padded rescale to the input size with 114 (top-left). It has NO mosaic; mosaic is
available here (``mosaic_prob``) because it helps small datasets. The recipe's random
RGB<->BGR swap is left out: colour is a class cue on many datasets. Every strength scales
with ``magnitude`` (0..1) so progressive resizing can start gently.
Validation: :func:`detectkit.data.letterbox.letterbox` (the one letterbox), centred or not.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from detectkit.data.letterbox import LetterboxInfo, letterbox, letterbox_boxes  # noqa: E402

__all__ = [
    "AugmentConfig",
    "sample_affine",
    "warp_boxes",
    "filter_boxes",
    "random_affine",
    "random_hsv",
    "letterbox_sample",
    "pad_outside",
]


@dataclass
class AugmentConfig:
    """Train augmentation. Defaults follow super-gradients' YOLO-NAS COCO recipe."""

    mosaic_prob: float = 0.0
    mixup_prob: float = 0.5
    degrees: float = 0.0
    translate: float = 0.25
    scale: tuple[float, float] = (0.5, 1.5)
    shear: float = 0.0
    hsv_prob: float = 0.5
    hsv_h: float = 18.0
    hsv_s: float = 30.0
    hsv_v: float = 30.0
    #: how ``hsv_h``/``hsv_s``/``hsv_v`` are read. ``"add"``: OpenCV units added to hue (0-180),
    #: saturation and value (0-255), the super-gradients / albumentations recipe (defaults 18/30/30).
    #: ``"gain"``: fractions as in ultralytics / YOLOv5 recipes (``hsv_h: 0.015, hsv_s: 0.7, hsv_v:
    #: 0.4``): hue shifted by up to ``hsv_h * 180``, saturation and value multiplied by ``1 +- gain``.
    #: Both run through the same one lookup table, so the choice costs nothing.
    hsv_mode: str = "add"
    flip_prob: float = 0.5
    min_box_size: float = 2.0
    min_visibility: float = 0.1
    max_aspect_ratio: float = 20.0
    pad_value: int = 114
    #: where mosaic and mixup draw their partner images from: ``"batch"`` (the other images of the
    #: batch being built, so each image is decoded once per batch instead of ~5 times; the choice
    #: still depends only on the seed, the epoch and the batch, not on the number of workers) or
    #: ``"dataset"`` (the whole split: every partner is a fresh decode). ultralytics draws them from
    #: its last ``batch * 8`` loaded images for the same reason. Batches under ``MIN_BATCH_POOL``
    #: images, and single ``dataset[i]`` reads, use the whole split.
    mix_pool: str = "batch"
    #: mosaic and mixup off for the last N epochs of the run (the Trainer's ``max_epochs``), so the
    #: model finishes on images like the ones it will see (ultralytics' ``close_mosaic``)
    close_mosaic: int = 0
    #: albumentations transforms applied to every train sample (``{name: HorizontalFlip, p: 0.5}``
    #: or albumentations' serialized form; see :mod:`detectkit.data.user_transforms`). ``None``: the
    #: built-in pipeline alone, and albumentations is never imported
    extra: list[dict[str, Any]] | None = None
    #: ``"after"``: ``extra`` runs on the built-in pipeline's output; ``"replace"``: the built-in
    #: pipeline (mosaic, affine, mixup, HSV, flip) is skipped and ``extra`` runs on the letterboxed image
    extra_mode: str = "after"

    def __post_init__(self) -> None:
        self.scale = (float(self.scale[0]), float(self.scale[1]))
        if self.close_mosaic < 0:
            raise ValueError(f"close_mosaic must be >= 0, got {self.close_mosaic}")
        for name in ("mosaic_prob", "mixup_prob", "hsv_prob", "flip_prob", "min_visibility"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.mix_pool not in ("batch", "dataset"):
            raise ValueError(f"mix_pool must be 'batch' or 'dataset', got {self.mix_pool!r}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {self.scale}")
        if self.hsv_mode not in ("add", "gain"):
            raise ValueError(f"hsv_mode must be 'add' or 'gain', got {self.hsv_mode!r}")
        if self.extra_mode not in ("after", "replace"):
            raise ValueError(f"extra_mode must be 'after' or 'replace', got {self.extra_mode!r}")
        if self.extra:  # named errors (unknown transform, bad argument) when the recipe is read
            self.extra = [dict(s) if isinstance(s, dict) else s for s in self.extra]
            self.build_extra()

    def build_extra(self) -> Any:
        """The user pipeline (an ``A.Compose``), or ``None`` without ``extra``."""
        if not self.extra:
            return None
        from detectkit.data.user_transforms import build_pipeline

        return build_pipeline(self.extra, self.min_box_size, self.min_visibility, self.max_aspect_ratio)

    def to_dict(self) -> dict:
        return asdict(self)


# Why not albumentations here: the train path used A.Affine / A.HueSaturationValue / A.HorizontalFlip
# in two Compose calls per sample. On a 640 mosaic about a third of the sample's time went to
# albumentations' per-call bookkeeping (bbox normalise / check / filter, parameter objects, seeding),
# not to pixels; the flip was a separate full-image copy and HSV split / merged the channels. Here the
# same operations are done directly: ONE cv2.warpAffine per image (affine with the flip folded in),
# box corners through the same matrix, HSV through one 3-channel lookup table. Parameter ranges,
# box filtering rules (min size, min visibility, max aspect ratio, clipping) and the HSV semantics
# (OpenCV units, hue wraps at 180, grey pixels keep saturation 0) are albumentations' as configured
# before; tests check boxes land where the matrix says and the pixels follow.


def pad_outside(out: np.ndarray, area: tuple[int, int, int, int], keep: tuple[int, int, int, int], value: int) -> None:
    """Fill ``area`` (x1, y1, x2, y2) of ``out`` with ``value`` except the rectangle ``keep`` inside
    it (empty allowed), in at most four strips: padding written once, never under pixels that the
    caller writes anyway."""
    ax1, ay1, ax2, ay2 = area
    kx1, ky1, kx2, ky2 = keep
    if kx2 <= kx1 or ky2 <= ky1:
        out[ay1:ay2, ax1:ax2] = value
        return
    out[ay1:ky1, ax1:ax2] = value
    out[ky2:ay2, ax1:ax2] = value
    out[ky1:ky2, ax1:kx1] = value
    out[ky1:ky2, kx2:ax2] = value


def sample_affine(
    cfg: AugmentConfig, magnitude: float, rng: np.random.Generator, size: int, flip: bool
) -> np.ndarray:
    """A random 2x3 affine on a ``size`` x ``size`` image at ``magnitude``: scale (one factor for
    both axes), rotation and shear about the centre, translation as a fraction of the size, then
    an optional horizontal flip. Pixel-edge coordinates (a box edge at x goes to ``mat @ x``)."""
    m = float(np.clip(magnitude, 0.0, 1.0))
    lo, hi = cfg.scale
    scale = rng.uniform(1 - (1 - lo) * m, 1 + (hi - 1) * m)
    angle = np.deg2rad(rng.uniform(-cfg.degrees * m, cfg.degrees * m))
    shx, shy = np.tan(np.deg2rad(rng.uniform(-cfg.shear * m, cfg.shear * m, 2)))
    tx, ty = rng.uniform(-cfg.translate * m, cfg.translate * m, 2) * size
    c = size / 2.0
    centre = np.array([[1, 0, -c], [0, 1, -c], [0, 0, 1]], np.float64)
    rot = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]], np.float64
    )
    shear = np.array([[1, shx, 0], [shy, 1, 0], [0, 0, 1]], np.float64)
    back = np.array([[scale, 0, c + tx], [0, scale, c + ty], [0, 0, 1]], np.float64)
    mat = back @ rot @ shear @ centre
    if flip:
        mat = np.array([[-1, 0, size], [0, 1, 0], [0, 0, 1]], np.float64) @ mat
    return mat[:2]


def warp_boxes(boxes: np.ndarray, mat: np.ndarray) -> np.ndarray:
    """xyxy boxes through a 2x3 affine: the box around the four transformed corners."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    if not len(b):
        return b
    corners = b[:, [0, 1, 2, 1, 2, 3, 0, 3]].reshape(-1, 4, 2)
    pts = corners @ mat[:, :2].T.astype(np.float32) + mat[:, 2].astype(np.float32)
    return np.concatenate([pts.min(1), pts.max(1)], 1)


def filter_boxes(
    boxes: np.ndarray, labels: np.ndarray, size: int, cfg: AugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Clip to the image, then drop boxes under ``min_box_size`` px, with less than
    ``min_visibility`` of their area left after clipping, or thinner than ``max_aspect_ratio``."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    labels = np.asarray(labels, np.int64).reshape(-1)
    if not len(b):
        return b, labels
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    c = b.clip(0, size)
    w, h = c[:, 2] - c[:, 0], c[:, 3] - c[:, 1]
    keep = (w >= cfg.min_box_size) & (h >= cfg.min_box_size)
    keep &= w * h >= cfg.min_visibility * np.maximum(area, 1e-6)
    keep &= np.maximum(w / np.maximum(h, 1e-6), h / np.maximum(w, 1e-6)) <= cfg.max_aspect_ratio
    return c[keep], labels[keep]


def random_affine(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    cfg: AugmentConfig,
    magnitude: float,
    rng: np.random.Generator,
    flip: bool = False,
    colour: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random affine (+ optional flip) of a square image in one warp; boxes follow and are filtered.

    ``colour`` is a per-pixel colour transform (the HSV jitter) done inside the warp: for an
    axis-aligned warp on whichever is smaller, the visible source crop (zoomed in) or the resized
    patch (zoomed out), so it never runs on the padding, which keeps ``pad_value`` as the
    letterbox padding at inference does; after a general warp, on the whole output."""
    size = image.shape[0]
    if image.shape[1] != size:
        raise ValueError(f"random_affine needs a square image, got {image.shape[:2]}")
    mat = sample_affine(cfg, magnitude, rng, size, flip)
    if mat[0, 1] == 0 and mat[1, 0] == 0:  # no rotation or shear (the default recipe)
        return _scale_translate(image, boxes, labels, mat, cfg, colour)
    # cv2 maps pixel centres; the matrix maps pixel edges: shift by half a pixel on both sides
    half = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
    centres = (np.linalg.inv(half) @ np.vstack([mat, [0, 0, 1]]) @ half)[:2]
    out = cv2.warpAffine(
        image,
        centres,
        (size, size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(cfg.pad_value,) * 3,
    )
    if colour is not None:
        out = colour(out)
    b, lab = filter_boxes(warp_boxes(boxes, mat), labels, size, cfg)
    return out, b, lab


def _scale_translate(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    mat: np.ndarray,
    cfg: AugmentConfig,
    colour: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An axis-aligned affine (scale, translation, flip) as ONE resize of the visible source crop
    pasted into the padded output: a separable resize costs a fraction of a general warpAffine.
    The crop and paste are snapped to whole pixels, so the applied map differs from ``mat`` by
    under a pixel; boxes go through the map actually applied, so they stay exact."""
    size = image.shape[0]
    out = np.empty((size, size, 3), np.uint8)
    sx, tx, sy, ty = mat[0, 0], mat[0, 2], mat[1, 1], mat[1, 2]
    flip = sx < 0
    spans = []
    for scale, shift in ((abs(sx), size - tx if flip else tx), (sy, ty)):
        # unflipped: dst = scale * src + shift; visible dst part, then the src part that fills it
        d0, d1 = max(0, round(shift)), min(size, round(scale * size + shift))
        if d1 - d0 < 1:
            out.fill(cfg.pad_value)
            return out, np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
        s0 = max(0, int(np.floor((d0 - shift) / scale)))
        s1 = min(size, int(np.ceil((d1 - shift) / scale)))
        spans.append((d0, d1, s0, max(s1, s0 + 1)))
    (dx0, dx1, sx0, sx1), (dy0, dy1, sy0, sy1) = spans
    crop = image[sy0:sy1, sx0:sx1]
    # colour on the smaller of the source crop and the patch: same pixels up to the interpolation
    # order, and on average ~40% fewer of them at scales 0.5-1.5 than on the whole output
    early = colour is not None and (sx1 - sx0) * (sy1 - sy0) <= (dx1 - dx0) * (dy1 - dy0)
    if early:
        crop = colour(crop)
    patch = cv2.resize(crop, (dx1 - dx0, dy1 - dy0), interpolation=cv2.INTER_LINEAR)
    if colour is not None and not early:
        patch = colour(patch)
    x0 = size - dx1 if flip else dx0
    pad_outside(out, (0, 0, size, size), (x0, dy0, x0 + dx1 - dx0, dy1), cfg.pad_value)
    if flip:
        out[dy0:dy1, x0 : x0 + dx1 - dx0] = cv2.flip(patch, 1)
    else:
        out[dy0:dy1, dx0:dx1] = patch
    # the map applied: edge x -> dx0 + (x - sx0) * kx (then mirrored when flipped)
    kx, ky = (dx1 - dx0) / (sx1 - sx0), (dy1 - dy0) / (sy1 - sy0)
    applied = np.array([[kx, 0, dx0 - sx0 * kx], [0, ky, dy0 - sy0 * ky]], np.float64)
    if flip:
        applied = np.array([[-1, 0, size], [0, 1, 0]], np.float64) @ np.vstack([applied, [0, 0, 1]])
    b, lab = filter_boxes(warp_boxes(boxes, applied), labels, size, cfg)
    return out, b, lab


def random_hsv(image: np.ndarray, cfg: AugmentConfig, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """HSV jitter (``cfg.hsv_mode``: additive OpenCV units or ultralytics-style gains; hue wraps at
    180; saturation 0 stays 0, so grey stays grey) with probability ``hsv_prob``, through one
    lookup table on the uint8 HSV image."""
    m = float(np.clip(magnitude, 0.0, 1.0))
    if rng.random() >= cfg.hsv_prob:
        return image
    dh, ds, dv = rng.uniform(-1, 1, 3) * np.array([cfg.hsv_h, cfg.hsv_s, cfg.hsv_v]) * m
    if dh == 0 and ds == 0 and dv == 0:
        return image
    x = np.arange(256, dtype=np.float64)
    lut = np.empty((256, 1, 3), np.uint8)
    if cfg.hsv_mode == "gain":
        lut[:, 0, 0] = np.mod(x + np.trunc(dh * 180), 180).astype(np.uint8)
        lut[:, 0, 1] = np.clip(np.rint(x * (1 + ds)), 0, 255)
        lut[:, 0, 2] = np.clip(np.rint(x * (1 + dv)), 0, 255)
    else:
        lut[:, 0, 0] = np.mod(x + np.trunc(dh), 180).astype(np.uint8)
        lut[:, 0, 1] = np.clip(np.rint(x + ds), 0, 255)
        lut[:, 0, 2] = np.clip(np.rint(x + dv), 0, 255)
    lut[0, 0, 1] = 0
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    return cv2.cvtColor(cv2.LUT(hsv, lut, dst=hsv), cv2.COLOR_HSV2RGB)


def letterbox_sample(
    image: np.ndarray,
    boxes: np.ndarray,
    size: int | tuple[int, int],
    center: bool = True,
    pad_value: int = 114,
) -> tuple[np.ndarray, np.ndarray, LetterboxInfo]:
    """Fit inside ``size`` and pad: boxes follow ``input = orig * scale + pad``."""
    padded, info = letterbox(image, size, longest=None, center=center, pad_value=pad_value)
    return padded, letterbox_boxes(np.asarray(boxes, np.float32).reshape(-1, 4), info), info
