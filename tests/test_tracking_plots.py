"""Hand-checked confusion matrix and PR curves behind LogValidationPredictions."""

from __future__ import annotations

import numpy as np
import torch
from detectkit.callbacks.prediction_images import _draw, confusion_matrix, pr_curves


def _p(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels)}


def _t(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
            "iscrowd": torch.zeros(len(labels), dtype=torch.long)}


def test_confusion_matrix_hand_checked() -> None:
    preds = [_p([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60], [0, 0, 10, 10]], [0.9, 0.8, 0.7, 0.1], [0, 1, 1, 1])]
    targets = [_t([[0, 0, 10, 10], [20, 20, 30, 30], [70, 70, 80, 80]], [0, 0, 1])]
    m = confusion_matrix(preds, targets, num_classes=2, conf=0.25, iou=0.5)
    # rows predicted, columns true, index 2 = background; the 0.1 detection is below conf
    assert m.tolist() == [[1, 0, 0], [1, 0, 1], [0, 1, 0]]


def test_pr_curve_perfect_and_half() -> None:
    targets = [_t([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1])]
    # class 0 found exactly; class 1 only by a low-scored box after a higher-scored false positive
    preds = [_p([[0, 0, 10, 10], [40, 40, 50, 50], [20, 20, 30, 30]], [0.9, 0.8, 0.3], [0, 1, 1])]
    recall, prec, classes = pr_curves(preds, targets)
    assert classes == [0, 1] and recall.shape == (101,) and prec.shape == (2, 101)
    np.testing.assert_allclose(prec[0], 1.0)
    np.testing.assert_allclose(prec[1], 0.5)  # at the only recall level reached, 1 TP in 2 detections


def test_draw_enlarges_small_images() -> None:
    img = np.zeros((64, 48, 3), np.uint8)
    out = _draw(img, torch.tensor([[4.0, 4, 20, 20]]), torch.tensor([0]), torch.tensor([[4.0, 4, 20, 20, 0.9, 0]]), ["a"])
    assert out.shape == (320, 240, 3) and out.any()
