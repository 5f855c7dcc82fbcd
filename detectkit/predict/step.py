"""THE batch step of every prediction path: letterboxed pixels -> model -> post-processing ->
detections in original pixels.

``model.predict`` and ``detectkit predict`` (:mod:`.pipeline`), ``DetectionModule.predict_step``
and the server's worker (:mod:`detectkit.serve.api`) differ in where images come from and where
they were letterboxed (the pipeline, the dataset, the HTTP gate), not in what happens next, so
they all call :func:`to_input` and :func:`detect_batch`: one conversion to the model's input, one
check of the detector contract, one :func:`detectkit.ops.nms.postprocess` per image with that
image's :class:`PostprocessConfig` (the server mixes requests with their own ``conf``), one
letterbox inverse. Each image's best score before the threshold is kept, so an empty result can
say how far the threshold is from what the model saw (:func:`no_detections_hint`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from detectkit.data.letterbox import LetterboxInfo, unletterbox_boxes
from detectkit.ops.nms import PostprocessConfig, postprocess

__all__ = ["Detections", "to_input", "detect_batch", "no_detections_hint", "suggest_conf"]


@dataclass
class Detections:
    """One image's detections: ``boxes [N,4]`` xyxy in original pixels, ``scores [N]``,
    ``labels [N]`` (CPU tensors), and ``best_score``, the highest class score of any anchor
    before the confidence threshold (0.0 for an image without anchors)."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    best_score: float

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


def to_input(pixels: Sequence[np.ndarray] | np.ndarray | torch.Tensor, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> torch.Tensor:
    """Letterboxed images -> the float RGB NCHW batch in [0, 1] that detectors take.

    ``pixels``: HWC uint8 arrays (a list, or one ``[B,H,W,3]`` array), or an NCHW tensor, uint8
    (divided by 255) or already float (only moved when ``device``/``dtype`` are given). uint8 is
    cast to ``dtype`` (default float32) before the division, on ``device``.
    """
    if isinstance(pixels, torch.Tensor):
        if pixels.dtype == torch.uint8:
            return pixels.to(device=device, dtype=dtype or torch.float32).div_(255.0)
        return pixels if device is None and dtype is None else pixels.to(device=device, dtype=dtype)
    batch = np.stack(list(pixels)) if not isinstance(pixels, np.ndarray) else pixels
    return torch.from_numpy(batch).permute(0, 3, 1, 2).to(device=device, dtype=dtype or torch.float32).div_(255.0)


def detect_batch(
    forward: Callable[[torch.Tensor], Any],
    images: torch.Tensor,
    letterboxes: Sequence[LetterboxInfo],
    post: PostprocessConfig | Sequence[PostprocessConfig],
    num_classes: Sequence[int] | None = None,
) -> list[Detections]:
    """Run ``forward`` (an eval-mode detector, or a server backend) on ``images`` (from
    :func:`to_input`) and return each image's :class:`Detections` in original pixels.

    ``post``: one config for the batch or one per image. ``num_classes``: per image, how many
    score columns are its vocabulary (a server batch padded to the longest request's classes).
    """
    n = images.shape[0]
    configs = [post] * n if isinstance(post, PostprocessConfig) else list(post)
    if len(configs) != n or len(letterboxes) != n or (num_classes is not None and len(num_classes) != n):
        raise ValueError(f"{n} images but {len(configs)} configs, {len(letterboxes)} letterboxes"
                         + ("" if num_classes is None else f", {len(num_classes)} vocabulary sizes"))
    with torch.inference_mode():
        boxes, scores = _detector_outputs(forward(images), forward)
        out = []
        for b in range(n):
            cls = scores[b : b + 1, :, : scores.shape[-1] if num_classes is None else num_classes[b]].float()
            det = postprocess(boxes[b : b + 1].float(), cls, **configs[b].to_dict())[0].float().cpu()
            out.append(Detections(
                boxes=unletterbox_boxes(det[:, :4], letterboxes[b]),
                scores=det[:, 4],
                labels=det[:, 5].round().long(),
                best_score=float(cls.max()) if cls.numel() else 0.0,
            ))
    return out


def _detector_outputs(raw: Any, forward: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode detector contract, checked once for every caller."""
    if not (isinstance(raw, (tuple, list)) and len(raw) == 2
            and all(isinstance(t, torch.Tensor) and t.ndim == 3 for t in raw)
            and raw[0].shape[-1] == 4 and raw[0].shape[:2] == raw[1].shape[:2]):
        target = getattr(forward, "func", forward)  # a functools.partial over a server backend
        name = type(getattr(target, "__self__", target)).__name__
        raise TypeError(f"{name} in eval mode must return (boxes [B,A,4], scores [B,A,C]) "
                        f"like detectkit.models.base.Detector; got {type(raw).__name__}")
    return raw[0], raw[1]


def suggest_conf(best_score: float) -> float | None:
    """The largest round threshold (1, 2, 5 x a power of ten) strictly below ``best_score``, so
    that the best box and those close to it pass; None when nothing scored above zero."""
    if not best_score > 0 or not math.isfinite(best_score):
        return None
    exponent = math.floor(math.log10(best_score))
    for power in (exponent, exponent - 1):
        for step in (5, 2, 1):
            value = step * 10.0 ** power
            if value < best_score:
                return float(f"{value:.1g}")
    return None


def no_detections_hint(conf: float, best_score: float, images: int, option: str = "--conf {}") -> str:
    """One line for an empty result: the threshold, the best score the model gave, and what to pass
    (``option`` with ``{}`` for the suggested value: the CLI flag, a request field, a config key).

    e.g. ``0 detections above conf 0.25 in 12 images (best score 0.08): lower it with --conf 0.05``.
    """
    where = f" in {images} image{'s' if images != 1 else ''}" if images else ""
    lower = suggest_conf(float(f"{best_score:.3g}"))  # below the score as printed, not just below 0.01004
    if lower is None:
        return (f"0 detections above conf {conf:g}{where} (every score was 0): the model detects nothing yet; "
                "check the checkpoint and that the images look like its training data")
    if lower >= conf:
        return (f"0 detections above conf {conf:g}{where} (best score {best_score:.3g}), although that score passes "
                "the threshold: NMS or max_det removed every box")
    return (f"0 detections above conf {conf:g}{where} (best score {best_score:.3g}): "
            f"lower it with {option.format(f'{lower:g}')}")
