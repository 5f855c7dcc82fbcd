"""The one letterbox of the project: resize keeping the aspect ratio, then pad to a fixed size.

Training, validation, prediction and export all call :func:`letterbox`, and every box that
crosses the model boundary goes through :func:`letterbox_boxes` / :func:`unletterbox_boxes`,
so the mapping ``input = original * scale + pad`` is written down exactly once.

Matches super-gradients (checked at e0ccacf):

* COCO predict preprocessing is ``DetectionLongestMaxSizeRescale((636, 636))`` then
  ``DetectionCenterPadding((640, 640), 114)``: ``scale = min(636/h, 636/w)`` (images are
  upscaled as well as downscaled), the resized side is Python ``round(side * scale)``, no resize
  at all when ``scale == 1``, ``cv2.INTER_LINEAR``; odd padding puts the extra pixel at the
  bottom/right (``top = pad_h // 2``). Boxes map back with the nominal ``scale``, not the
  rounded size ratio. Here: ``letterbox(img, 640, longest=636, center=True)``.
* Training (``DetectionPaddedRescale``) fits inside the output size, truncates the resized side
  with ``int()`` and pads bottom-right. Here: ``letterbox(img, 640, center=False, rounding="floor")``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import cv2
import numpy as np
import torch

__all__ = ["LetterboxInfo", "letterbox", "letterbox_boxes", "unletterbox_boxes"]

BoxesT = TypeVar("BoxesT", np.ndarray, torch.Tensor)


@dataclass(frozen=True)
class LetterboxInfo:
    """How an original image became the model input: ``input = original * scale + (pad_left, pad_top)``.

    ``orig_size``, ``input_size`` (padded) and ``resized_size`` (the image content inside the
    padding) are ``(height, width)``.
    """

    scale: float
    pad_left: int
    pad_top: int
    orig_size: tuple[int, int]
    input_size: tuple[int, int] = (0, 0)
    resized_size: tuple[int, int] = (0, 0)

    @property
    def pad(self) -> tuple[int, int]:
        """``(left, top)``, the form stored in batch ``meta``."""
        return self.pad_left, self.pad_top


def _as_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def letterbox(
    image: np.ndarray,
    size: int | tuple[int, int] = (640, 640),
    longest: int | None = 636,
    center: bool = True,
    pad_value: int | tuple[int, int, int] = 114,
    rounding: str = "round",
) -> tuple[np.ndarray, LetterboxInfo]:
    """Resize ``image`` (HWC or HW, uint8) keeping its aspect ratio, then pad it to ``size`` (h, w).

    ``longest``: the resized image fits in a ``longest x longest`` square (super-gradients'
    predict recipe: 636 inside 640); ``None`` fits it inside ``size`` itself. ``center`` pads
    evenly (extra pixel bottom/right), otherwise only bottom/right (training). ``rounding`` is
    ``"round"`` (predict) or ``"floor"`` (super-gradients' training rescale).
    """
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3) or image.shape[0] < 1 or image.shape[1] < 1:
        shape = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"letterbox expects an HWC or HW numpy image, got {shape}")
    out_h, out_w = _as_hw(size)
    box_h, box_w = out_h, out_w
    if longest is not None:
        if longest < 1:
            raise ValueError(f"longest must be positive, got {longest}")
        box_h, box_w = min(out_h, longest), min(out_w, longest)
    if rounding not in ("round", "floor"):
        raise ValueError(f"rounding must be 'round' or 'floor', got {rounding!r}")

    h, w = image.shape[:2]
    scale = min(box_h / h, box_w / w)
    if rounding == "round":
        new_h, new_w = round(h * scale), round(w * scale)
    else:
        new_h, new_w = int(h * scale), int(w * scale)
    new_h, new_w = max(1, min(new_h, out_h)), max(1, min(new_w, out_w))
    if (new_h, new_w) != (h, w):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)

    pad_h, pad_w = out_h - new_h, out_w - new_w
    top, left = (pad_h // 2, pad_w // 2) if center else (0, 0)
    if image.ndim == 3:
        channels = image.shape[2]
        value = (pad_value,) * channels if np.isscalar(pad_value) else tuple(pad_value)
        if len(value) != channels:
            raise ValueError(f"pad_value {pad_value} does not match an image with {channels} channels")
        padded = np.empty((out_h, out_w, channels), dtype=image.dtype)
        padded[...] = np.asarray(value, dtype=image.dtype)
    else:
        padded = np.full((out_h, out_w), pad_value, dtype=image.dtype)
    padded[top : top + new_h, left : left + new_w] = image
    info = LetterboxInfo(float(scale), int(left), int(top), (int(h), int(w)), (out_h, out_w), (new_h, new_w))
    return padded, info


def letterbox_boxes(boxes: BoxesT, info: LetterboxInfo) -> BoxesT:
    """Original-pixel xyxy boxes ``[..., 4]`` -> model-input pixels (ground truth going in)."""
    out = _copy_float(boxes)
    out[..., 0::2] = out[..., 0::2] * info.scale + info.pad_left
    out[..., 1::2] = out[..., 1::2] * info.scale + info.pad_top
    return out


def unletterbox_boxes(boxes: BoxesT, info: LetterboxInfo, clip: bool = True) -> BoxesT:
    """Model-input xyxy boxes ``[..., 4]`` -> original pixels, clipped to the original image."""
    out = _copy_float(boxes)
    out[..., 0::2] = (out[..., 0::2] - info.pad_left) / info.scale
    out[..., 1::2] = (out[..., 1::2] - info.pad_top) / info.scale
    if clip:
        h, w = info.orig_size
        if isinstance(out, torch.Tensor):
            out[..., 0::2] = out[..., 0::2].clamp(0, w)
            out[..., 1::2] = out[..., 1::2].clamp(0, h)
        else:
            np.clip(out[..., 0::2], 0, w, out=out[..., 0::2])
            np.clip(out[..., 1::2], 0, h, out=out[..., 1::2])
    return out


def _copy_float(boxes: BoxesT) -> BoxesT:
    if isinstance(boxes, torch.Tensor):
        return boxes.clone() if boxes.is_floating_point() else boxes.float()
    arr = np.asarray(boxes)
    if arr.shape[-1:] != (4,):
        raise ValueError(f"boxes must have shape [..., 4], got {arr.shape}")
    return arr.astype(np.float32 if arr.dtype != np.float64 else np.float64, copy=True)
