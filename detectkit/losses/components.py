"""Loss terms shared by both families, as pure element-wise functions (the caller reduces).

Each returns un-reduced values so that the composed losses can sum per image (for the
curriculum sampler) and over the batch with the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from detectkit.ops.boxes import bbox2distance, paired_iou

__all__ = ["varifocal_loss", "bce_loss", "iou_loss", "dfl_loss", "dfl_targets"]


def varifocal_loss(
    logits: torch.Tensor,
    target_scores: torch.Tensor,
    onehot: torch.Tensor,
    alpha: float = 0.75,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Varifocal loss (super-gradients form): positives weighted by their soft target, negatives
    by ``alpha * p**gamma``. ``onehot`` marks the assigned class of positives even when its soft
    target is ~0. The weight keeps its gradient through ``p``, as in the reference."""
    p = logits.sigmoid()
    weight = alpha * p.pow(gamma) * (1 - onehot) + target_scores * onehot
    return weight * F.binary_cross_entropy_with_logits(logits, target_scores, reduction="none")


def bce_loss(logits: torch.Tensor, target_scores: torch.Tensor) -> torch.Tensor:
    """Plain BCE with logits against soft targets (ultralytics v8)."""
    return F.binary_cross_entropy_with_logits(logits, target_scores, reduction="none")


def iou_loss(
    pred_boxes: torch.Tensor, target_boxes: torch.Tensor, kind: str = "giou", eps: float = 1e-10
) -> torch.Tensor:
    """``1 - IoU`` of paired xyxy boxes ``[..., 4] -> [...]`` (GIoU eps 1e-10 for SG, CIoU eps 1e-7 for v8)."""
    return 1.0 - paired_iou(pred_boxes, target_boxes, kind=kind, eps=eps)


def dfl_targets(anchor_points: torch.Tensor, boxes: torch.Tensor, bins: int) -> torch.Tensor:
    """DFL regression targets ``l, t, r, b`` clipped to ``[0, bins - 1 - 0.01]`` so the right
    neighbour bin always exists (15.99 for 17 bins, 14.99 for 16)."""
    return bbox2distance(anchor_points, boxes, max_distance=bins - 1 - 0.01)


def dfl_loss(logits: torch.Tensor, targets: torch.Tensor, bins: int) -> torch.Tensor:
    """Distribution focal loss: cross-entropy to the two bins around each target, linearly
    weighted, averaged over the 4 sides. ``logits [M, 4*bins]`` side-major, ``targets [M, 4]``
    already clipped (see :func:`dfl_targets`); returns ``[M]``."""
    logits = logits.reshape(-1, bins)
    targets = targets.reshape(-1)
    left = targets.long()
    right = left + 1
    w_left = right.to(targets.dtype) - targets
    w_right = 1 - w_left
    loss = (
        F.cross_entropy(logits, left, reduction="none") * w_left
        + F.cross_entropy(logits, right, reduction="none") * w_right
    )
    return loss.view(-1, 4).mean(dim=-1)
