"""Augmentation: super-gradients' YOLO-NAS COCO train recipe, rebuilt on albumentations 2.

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
from dataclasses import asdict, dataclass

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402

from detectkit.data.letterbox import LetterboxInfo, letterbox, letterbox_boxes  # noqa: E402

__all__ = ["AugmentConfig", "build_geometric", "build_photometric", "apply", "letterbox_sample"]


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
    flip_prob: float = 0.5
    min_box_size: float = 2.0
    min_visibility: float = 0.1
    max_aspect_ratio: float = 20.0
    pad_value: int = 114

    def __post_init__(self) -> None:
        self.scale = (float(self.scale[0]), float(self.scale[1]))
        for name in ("mosaic_prob", "mixup_prob", "hsv_prob", "flip_prob", "min_visibility"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {self.scale}")

    def to_dict(self) -> dict:
        return asdict(self)


def _bbox_params(cfg: AugmentConfig) -> A.BboxParams:
    return A.BboxParams(
        format="pascal_voc",
        label_fields=["labels"],
        min_visibility=cfg.min_visibility,
        min_width=cfg.min_box_size,
        min_height=cfg.min_box_size,
        clip=True,
        filter_invalid_bboxes=True,
        max_accept_ratio=cfg.max_aspect_ratio,
    )


def build_geometric(cfg: AugmentConfig, magnitude: float = 1.0) -> A.Compose:
    """Random affine at ``magnitude`` (1 = the configured strength, 0 = identity)."""
    m = float(np.clip(magnitude, 0.0, 1.0))
    lo, hi = cfg.scale
    return A.Compose(
        [
            A.Affine(
                scale=(1 - (1 - lo) * m, 1 + (hi - 1) * m),
                translate_percent=(-cfg.translate * m, cfg.translate * m),
                rotate=(-cfg.degrees * m, cfg.degrees * m),
                shear=(-cfg.shear * m, cfg.shear * m),
                interpolation=cv2.INTER_LINEAR,
                keep_ratio=True,
                border_mode=cv2.BORDER_CONSTANT,
                fill=cfg.pad_value,
                p=1.0,
            )
        ],
        bbox_params=_bbox_params(cfg),
    )


def build_photometric(cfg: AugmentConfig, magnitude: float = 1.0) -> A.Compose:
    """HSV jitter (additive, OpenCV units like super-gradients) and horizontal flip."""
    m = float(np.clip(magnitude, 0.0, 1.0))
    return A.Compose(
        [
            A.HueSaturationValue(
                hue_shift_limit=(-cfg.hsv_h * m, cfg.hsv_h * m),
                sat_shift_limit=(-cfg.hsv_s * m, cfg.hsv_s * m),
                val_shift_limit=(-cfg.hsv_v * m, cfg.hsv_v * m),
                p=cfg.hsv_prob,
            ),
            A.HorizontalFlip(p=cfg.flip_prob),
        ],
        bbox_params=_bbox_params(cfg),
    )


def apply(
    compose: A.Compose, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run a compose with a given seed: augmentation is a pure function of (seed, sample)."""
    compose.set_random_seed(int(seed))
    out = compose(
        image=image, bboxes=np.asarray(boxes, np.float32).reshape(-1, 4), labels=np.asarray(labels, np.int64)
    )
    b = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
    return out["image"], b, np.asarray(out["labels"], np.int64).reshape(-1)


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
