"""Training losses: one task-aligned assigner and the shared terms, composed per family."""

from __future__ import annotations

from typing import Any

from detectkit.losses.assigner import Assignment, TaskAlignedAssigner
from detectkit.losses.detection import PPYoloELoss, TaskAlignedDetectionLoss, V8DetectionLoss, pad_targets

__all__ = [
    "Assignment",
    "TaskAlignedAssigner",
    "TaskAlignedDetectionLoss",
    "PPYoloELoss",
    "V8DetectionLoss",
    "pad_targets",
    "build_loss",
    "LOSSES",
]

LOSSES: dict[str, type[TaskAlignedDetectionLoss]] = {"ppyoloe": PPYoloELoss, "v8": V8DetectionLoss}


def build_loss(name: str, num_classes: int, **kwargs: Any) -> TaskAlignedDetectionLoss:
    """The loss named by ``Detector.default_loss`` ("ppyoloe" for YOLO-NAS, "v8" for YOLO-World)."""
    try:
        cls = LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; available: {sorted(LOSSES)}") from None
    return cls(num_classes, **kwargs)
