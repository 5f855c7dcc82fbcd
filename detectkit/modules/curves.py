"""Validation diagnostics derived from the one COCO evaluation of a validation.

The PR arrays and the confusion matrix themselves come from
:class:`detectkit.modules.metrics.COCOEvalResult` (the faster-coco-eval run that produced
``val/map``, kept as ``metric.last_result``), so the plots agree with the logged numbers and cost
no second evaluation. What the plots need on top lives here, as pure functions shared by
``LogValidationPredictions`` (tracker images) and ``RunReport`` (run-folder files).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detectkit.modules.metrics import COCOEvalResult

__all__ = ["ValidationCurves", "class_instances", "normalize_confusion", "validation_curves"]


def normalize_confusion(m: np.ndarray) -> np.ndarray:
    """Each column (true class, and the background column of false detections) divided by its
    sum: the fraction of that class's objects predicted as each row. Empty columns stay 0."""
    cols = m.sum(axis=0, keepdims=True).astype(np.float64)
    return np.divide(m, cols, out=np.zeros(m.shape, dtype=np.float64), where=cols > 0)


def class_instances(groundtruths: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(instances [C], images [C])`` from ``COCOEvalResult.groundtruths`` rows ``(image, x1, y1,
    x2, y2, label, iscrowd, area)``: non-crowd boxes per class and images containing the class."""
    g = groundtruths[groundtruths[:, 6] == 0] if len(groundtruths) else groundtruths.reshape(0, 8)
    labels = g[:, 5].astype(np.int64)
    keep = (labels >= 0) & (labels < num_classes)
    labels, images = labels[keep], g[keep, 0].astype(np.int64)
    inst = np.bincount(labels, minlength=num_classes)[:num_classes]
    pairs = np.unique(np.stack([labels, images], 1), axis=0) if len(labels) else np.zeros((0, 2), np.int64)
    imgs = np.bincount(pairs[:, 0], minlength=num_classes)[:num_classes]
    return inst, imgs


@dataclass(frozen=True)
class ValidationCurves:
    """What the validation plots and the final table show, from one :class:`COCOEvalResult`.

    ``recall [R]``, ``precision [K, R]`` (IoU 0.5, -1 where undefined) for the class labels
    ``classes`` and their AP at IoU 0.5 (``ap50``, classes with ground truth only); ``confusion
    [C+1, C+1]`` counts (last row/column: background); ``instances`` and ``images`` per class
    (``[C]``); ``num_images`` scored.
    """

    recall: np.ndarray
    precision: np.ndarray
    classes: list[int]
    ap50: dict[int, float]
    confusion: np.ndarray
    instances: np.ndarray
    images: np.ndarray
    num_images: int


def validation_curves(result: COCOEvalResult, num_classes: int, conf: float = 0.25, iou: float = 0.5) -> ValidationCurves:
    """The PR curves at IoU 0.5, the confusion matrix at (``conf``, ``iou``) and the class counts
    of one evaluation. ``num_classes`` grows to cover any label present in the result."""
    seen = np.concatenate([result.detections[:, 6], result.groundtruths[:, 5]]).astype(np.int64)
    num_classes = max(int(num_classes), int(seen.max(initial=-1)) + 1, 1)
    recall, prec, classes = result.pr_curve(iou=0.5)
    ap50 = {c: float(ap) for c, ap in zip(classes, result.ap_per_class(iou=0.5)) if ap >= 0}
    inst, imgs = class_instances(result.groundtruths, num_classes)
    return ValidationCurves(recall=recall, precision=prec, classes=classes, ap50=ap50,
                            confusion=result.confusion_matrix(num_classes=num_classes, conf=conf, iou=iou),
                            instances=inst, images=imgs, num_images=result.num_images)
