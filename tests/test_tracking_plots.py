"""Hand-checked PR curves, confusion matrix and class counts behind LogValidationPredictions and
RunReport (both plot the evaluation that produced val/map: ``COCOMeanAveragePrecision.last_result``)."""

from __future__ import annotations

import numpy as np
import torch
from detectkit.callbacks.prediction_images import confusion_figure, draw_sample, image_grid, pr_figure

from detectkit.modules.curves import class_instances, normalize_confusion, validation_curves
from detectkit.modules.metrics import COCOEvalResult, build_map_metric


def _p(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels, dtype=torch.long)}


def _t(boxes, labels, crowd=None):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels),
            "iscrowd": torch.tensor(crowd or [0] * len(labels), dtype=torch.long)}


def _evaluate(preds, targets) -> COCOEvalResult:
    metric = build_map_metric()
    metric.update(preds, targets)
    metric.compute()
    return metric.last_result


def test_confusion_matrix_hand_checked() -> None:
    preds = [_p([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60], [0, 0, 10, 10]], [0.9, 0.8, 0.7, 0.1], [0, 1, 1, 1])]
    targets = [_t([[0, 0, 10, 10], [20, 20, 30, 30], [70, 70, 80, 80]], [0, 0, 1])]
    curves = validation_curves(_evaluate(preds, targets), num_classes=2, conf=0.25, iou=0.5)
    # rows predicted, columns true, index 2 = background; the 0.1 detection is below conf
    assert curves.confusion.tolist() == [[1, 0, 0], [1, 0, 1], [0, 1, 0]]


def test_pr_curve_perfect_and_half() -> None:
    targets = [_t([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1])]
    # class 0 found exactly; class 1 only by a low-scored box after a higher-scored false positive
    preds = [_p([[0, 0, 10, 10], [40, 40, 50, 50], [20, 20, 30, 30]], [0.9, 0.8, 0.3], [0, 1, 1])]
    curves = validation_curves(_evaluate(preds, targets), num_classes=2)
    assert curves.classes == [0, 1] and curves.recall.shape == (101,) and curves.precision.shape == (2, 101)
    np.testing.assert_allclose(curves.precision[0], 1.0)
    np.testing.assert_allclose(curves.precision[1], 0.5)  # at the only recall level reached, 1 TP in 2 detections
    assert curves.ap50 == {0: 1.0, 1: 0.5}
    fig = pr_figure(curves, ["a", "b"])
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["a AP50=1.000", "b AP50=0.500", "all classes mAP50=0.750"]
    fig = confusion_figure(curves.confusion, ["a", "b"], normalize=True)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["a", "b", "background"]


def test_counts_skip_crowd_and_cover_unnamed_labels() -> None:
    targets = [_t([[0, 0, 10, 10], [0, 0, 20, 20], [30, 30, 60, 60]], [1, 1, 0], crowd=[0, 0, 1]),
               _t([[0, 0, 10, 10]], [3])]
    curves = validation_curves(_evaluate([_p([], [], []), _p([], [], [])], targets), num_classes=2)
    # label 3 has no name: the counts grow to cover it; the crowd region is no instance
    assert curves.instances.tolist() == [0, 2, 0, 1] and curves.images.tolist() == [0, 1, 0, 1]
    assert curves.num_images == 2 and curves.confusion.shape == (5, 5)
    inst, imgs = class_instances(np.zeros((0, 8)), 2)
    assert inst.tolist() == [0, 0] and imgs.tolist() == [0, 0]


def test_normalized_confusion() -> None:
    m = np.array([[3, 1, 0], [1, 0, 2], [0, 1, 0]])
    n = normalize_confusion(m)
    np.testing.assert_allclose(n[:, 0], [0.75, 0.25, 0.0])
    np.testing.assert_allclose(n[:, 1], [0.5, 0.0, 0.5])
    np.testing.assert_allclose(n[:, 2], [0.0, 1.0, 0.0])
    np.testing.assert_allclose(normalize_confusion(np.zeros((2, 2), np.int64)), 0.0)  # empty columns stay 0


def test_draw_enlarges_small_images() -> None:
    img = np.zeros((64, 48, 3), np.uint8)
    out = draw_sample(img, torch.tensor([[4.0, 4, 20, 20]]), torch.tensor([0]), torch.tensor([[4.0, 4, 20, 20, 0.9, 0]]), ["a"])
    assert out.shape == (320, 240, 3) and out.any()


def test_image_grid_tiles_mixed_sizes() -> None:
    tiles = [np.full((10, 20, 3), 1, np.uint8), np.full((16, 8, 3), 2, np.uint8), np.full((4, 4, 3), 3, np.uint8)]
    grid = image_grid(tiles, gap=2)  # 2 columns of 20 px, 2 rows of 16 px
    assert grid.shape == (34, 42, 3)
    assert (grid[:10, :20] == 1).all() and (grid[:16, 22:30] == 2).all() and (grid[18:22, :4] == 3).all()
    assert (grid[16:18] == 255).all()  # the gap between the rows
