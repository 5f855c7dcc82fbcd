"""Hand-checked confusion matrix and PR curves behind LogValidationPredictions and RunReport."""

from __future__ import annotations

import numpy as np
import torch
from detectkit.callbacks.prediction_images import confusion_figure, draw_sample, image_grid, pr_figure

from detectkit.modules.curves import (
    ap50_per_class,
    class_instances,
    confusion_matrix,
    normalize_confusion,
    pr_curves,
)


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
    out = draw_sample(img, torch.tensor([[4.0, 4, 20, 20]]), torch.tensor([0]), torch.tensor([[4.0, 4, 20, 20, 0.9, 0]]), ["a"])
    assert out.shape == (320, 240, 3) and out.any()


def test_normalized_confusion_and_counts() -> None:
    m = np.array([[3, 1, 0], [1, 0, 2], [0, 1, 0]])
    n = normalize_confusion(m)
    np.testing.assert_allclose(n[:, 0], [0.75, 0.25, 0.0])
    np.testing.assert_allclose(n[:, 1], [0.5, 0.0, 0.5])
    np.testing.assert_allclose(n[:, 2], [0.0, 1.0, 0.0])
    np.testing.assert_allclose(normalize_confusion(np.zeros((2, 2), np.int64)), 0.0)  # empty columns stay 0
    inst, imgs = class_instances([_t([[0, 0, 1, 1], [0, 0, 2, 2]], [1, 1]), _t([[0, 0, 1, 1]], [0])], 3)
    assert inst.tolist() == [1, 2, 0] and imgs.tolist() == [1, 1, 0]


def test_ap50_and_figures() -> None:
    targets = [_t([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1])]
    preds = [_p([[0, 0, 10, 10], [40, 40, 50, 50], [20, 20, 30, 30]], [0.9, 0.8, 0.3], [0, 1, 1])]
    recall, prec, classes = pr_curves(preds, targets)
    assert ap50_per_class(prec, classes) == {0: 1.0, 1: 0.5}
    fig = pr_figure(recall, prec, classes, ["a", "b"])
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["a AP50=1.000", "b AP50=0.500", "all classes mAP50=0.750"]
    m = confusion_matrix(preds, targets, 2)
    fig = confusion_figure(m, ["a", "b"], normalize=True)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["a", "b", "background"]


def test_image_grid_tiles_mixed_sizes() -> None:
    tiles = [np.full((10, 20, 3), 1, np.uint8), np.full((16, 8, 3), 2, np.uint8), np.full((4, 4, 3), 3, np.uint8)]
    grid = image_grid(tiles, gap=2)  # 2 columns of 20 px, 2 rows of 16 px
    assert grid.shape == (34, 42, 3)
    assert (grid[:10, :20] == 1).all() and (grid[:16, 22:30] == 2).all() and (grid[18:22, :4] == 3).all()
    assert (grid[16:18] == 255).all()  # the gap between the rows


def test_validation_predictions_reads_metric_states_as_xyxy() -> None:
    """torchmetrics keeps boxes as xywh internally; the curves need them back as xyxy."""
    from detectkit.modules.curves import validation_predictions
    from detectkit.modules.metrics import build_map_metric

    metric = build_map_metric()
    preds = [_p([[10, 20, 30, 60]], [0.9], [1]), _p([], [], [])]
    targets = [_t([[12, 20, 30, 58]], [1]), _t([[0, 0, 5, 5]], [0])]
    metric.update([{**p, "labels": p["labels"].long()} for p in preds], targets)
    got_p, got_t = validation_predictions(metric, sync=False)
    torch.testing.assert_close(got_p[0]["boxes"], preds[0]["boxes"])
    torch.testing.assert_close(got_t[0]["boxes"], targets[0]["boxes"])
    torch.testing.assert_close(got_t[1]["boxes"], targets[1]["boxes"])
    assert got_p[1]["boxes"].shape == (0, 4)
    assert validation_predictions(None, sync=False) is None
