"""Validation diagnostics as pure functions: PR curves, confusion matrix, per-class counts.

One implementation shared by every consumer (``LogValidationPredictions`` logs them to a tracker,
``RunReport`` writes them into the run folder). Inputs are the per-image dicts torchmetrics'
``MeanAveragePrecision.update`` takes (``boxes`` xyxy, ``scores``, ``labels``; targets ``boxes``,
``labels``, ``iscrowd``), in any consistent pixel frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_convert, box_iou

__all__ = [
    "Predictions",
    "ap50_per_class",
    "class_instances",
    "confusion_matrix",
    "normalize_confusion",
    "pr_curves",
    "validation_predictions",
]

#: per-image ``(preds, targets)`` lists, as ``MeanAveragePrecision.update`` takes them
Predictions = tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]


def confusion_matrix(
    preds: Sequence[dict[str, torch.Tensor]],
    targets: Sequence[dict[str, torch.Tensor]],
    num_classes: int,
    conf: float = 0.25,
    iou: float = 0.5,
) -> np.ndarray:
    """``[C+1, C+1]`` counts, rows = predicted class, columns = true class; index ``C`` is
    background (row C: missed objects, column C: false detections). Greedy matching by IoU,
    highest-confidence detections first, each ground truth used once (any class: a box on the
    right object with the wrong class is a confusion, not a miss plus a false detection)."""
    m = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    bg = num_classes
    for p, t in zip(preds, targets):
        keep = p["scores"] >= conf
        pb, ps, pl_ = p["boxes"][keep].float(), p["scores"][keep], p["labels"][keep].long()
        tb, tl = t["boxes"].float().reshape(-1, 4), t["labels"].long().reshape(-1)
        used = torch.zeros(len(tl), dtype=torch.bool)
        ious = box_iou(pb, tb) if len(pb) and len(tb) else None
        for i in torch.argsort(ps, descending=True).tolist():
            j_best = -1
            if ious is not None:
                cand = ious[i].clone()
                cand[used] = -1
                j = int(cand.argmax())
                if cand[j] >= iou:
                    j_best = j
            if j_best >= 0:
                used[j_best] = True
                m[int(pl_[i]), int(tl[j_best])] += 1
            else:
                m[int(pl_[i]), bg] += 1
        for j in torch.nonzero(~used).flatten().tolist():
            m[bg, int(tl[j])] += 1
    return m


def normalize_confusion(m: np.ndarray) -> np.ndarray:
    """Each column (true class, and the background column of false detections) divided by its
    sum: the fraction of that class's objects predicted as each row. Empty columns stay 0."""
    cols = m.sum(axis=0, keepdims=True).astype(np.float64)
    return np.divide(m, cols, out=np.zeros(m.shape, dtype=np.float64), where=cols > 0)


def pr_curves(
    preds: Sequence[dict[str, torch.Tensor]], targets: Sequence[dict[str, torch.Tensor]]
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """COCO precision at IoU 0.5 (all areas, most detections): ``recall [101]``,
    ``precision [K, 101]`` (-1 where the class has no ground truth) and the class ids of the K rows.

    Computed by faster-coco-eval through torchmetrics (the same evaluation as ``val/map``), so
    the curves agree with the logged AP50."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="faster_coco_eval",
                                  class_metrics=True, extended_summary=True)
    metric.update(list(preds), list(targets))
    res = metric.compute()
    precision = res["precision"]  # [T, R, K, A, M]
    t50 = int(torch.argmin((torch.as_tensor(metric.iou_thresholds) - 0.5).abs()))
    prec = precision[t50, :, :, 0, -1].T.cpu().numpy()  # [K, R]
    classes = res["classes"].reshape(-1).tolist()
    recall = np.asarray(metric.rec_thresholds, dtype=np.float64)
    return recall, prec, classes


def ap50_per_class(prec: np.ndarray, classes: Sequence[int]) -> dict[int, float]:
    """COCO AP at IoU 0.5 per class from :func:`pr_curves`' rows (mean over the 101 recall
    points); classes without ground truth (all -1) are left out."""
    out = {}
    for row, c in zip(prec, classes):
        if (row >= 0).any():
            out[int(c)] = float(np.clip(row, 0, None).mean())
    return out


def class_instances(targets: Sequence[dict[str, torch.Tensor]], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(instances [C], images [C])``: ground-truth boxes per class and images containing it."""
    inst = np.zeros(num_classes, dtype=np.int64)
    imgs = np.zeros(num_classes, dtype=np.int64)
    for t in targets:
        labels = t["labels"].reshape(-1).long()
        labels = labels[(labels >= 0) & (labels < num_classes)].cpu().numpy()
        np.add.at(inst, labels, 1)
        imgs[np.unique(labels)] += 1
    return inst, imgs


def validation_predictions(metric: Any, sync: bool) -> Predictions | None:
    """The per-image preds/targets a torchmetrics ``MeanAveragePrecision`` accumulated this
    validation, on the CPU, gathered across ranks with the metric's own sync when ``sync`` (every
    rank must call then). Read before the module computes and resets the metric (callbacks'
    ``on_validation_epoch_end`` runs before the module's). ``None`` when ``metric`` keeps no
    per-image states.

    torchmetrics stores boxes in COCO's ``xywh`` whatever the metric's ``box_format``; they are
    converted back to ``xyxy`` here."""
    if metric is None or not hasattr(metric, "detection_box"):
        return None
    with metric.sync_context(should_sync=sync, should_unsync=True):
        preds = [{"boxes": _xyxy(b), "scores": s.cpu(), "labels": lab.cpu()}
                 for b, s, lab in zip(metric.detection_box, metric.detection_scores, metric.detection_labels)]
        targets = [{"boxes": _xyxy(b), "labels": lab.cpu(), "iscrowd": c.cpu()}
                   for b, lab, c in zip(metric.groundtruth_box, metric.groundtruth_labels, metric.groundtruth_crowds)]
    return preds, targets


def _xyxy(stored: torch.Tensor) -> torch.Tensor:
    boxes = stored.detach().cpu().float().reshape(-1, 4)
    return box_convert(boxes, in_fmt="xywh", out_fmt="xyxy") if len(boxes) else boxes
