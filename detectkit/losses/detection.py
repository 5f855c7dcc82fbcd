"""The two training losses, composed from one assigner and the shared loss terms.

* :class:`PPYoloELoss` reproduces super-gradients' ``PPYoloELoss`` as the YOLO-NAS COCO recipe
  configures it (task-aligned assigner, varifocal + GIoU + DFL, batched assignment).
* :class:`V8DetectionLoss` reproduces ultralytics' ``v8DetectionLoss`` as YOLO-World trains with
  it (task-aligned assigner with CIoU, BCE + CIoU + DFL, gains box 7.5 / cls 0.5 / dfl 1.5).

Contract: ``loss(head, targets, batch_size) -> (total, components)`` with ``targets [N, 6] =
(batch_index, class, x1, y1, x2, y2)`` in input pixels, rows in any order. ``total`` is the
scalar to backpropagate; ``components`` holds detached values for logging:
``cls``, ``box``, ``dfl`` (the weighted, normalised terms), ``num_fg``, ``normalizer`` and
``image_losses`` ``[B]`` (each image's share of ``total``; ``image_losses.sum() == total``; the
only non-scalar entry).

Scaling. super-gradients optimises ``cls + iou + dfl``. ultralytics' criterion returns the
terms multiplied by the batch size and its trainer backpropagates their sum, so with
``scale_by_batch=True`` (the v8 default) ``total = B * (box + cls + dfl)``: the scalar and the
gradients are ultralytics' own (use ultralytics' learning-rate recipes unchanged), while the
logged components stay unscaled, as ultralytics logs them.

Normaliser. All sums are divided by ``max(sum of assigned scores over the batch, 1)``. With
``sync_normalizer=True`` (PPYOLOE default, as super-gradients) and ``torch.distributed``
initialised, that sum is averaged over ranks first, so every rank divides by the same number
and DDP's gradient averaging yields the global-batch normalisation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from detectkit.losses.assigner import Assignment, TaskAlignedAssigner
from detectkit.losses.components import bce_loss, dfl_loss, dfl_targets, iou_loss, varifocal_loss
from detectkit.models.outputs import HeadOutput
from detectkit.nn.dfl import DFL
from detectkit.ops.boxes import distance2bbox

__all__ = ["pad_targets", "TaskAlignedDetectionLoss", "PPYoloELoss", "V8DetectionLoss"]


def pad_targets(targets: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[N, 6]`` rows (any order) -> ``labels [B, n]`` int64, ``boxes [B, n, 4]``, ``mask [B, n]`` bool,
    with ``n`` the largest per-image count; rows keep their relative order within an image."""
    device = targets.device
    if targets.numel() == 0:
        return (
            torch.zeros((batch_size, 0), dtype=torch.long, device=device),
            torch.zeros((batch_size, 0, 4), dtype=targets.dtype, device=device),
            torch.zeros((batch_size, 0), dtype=torch.bool, device=device),
        )
    if targets.dim() != 2 or targets.shape[1] != 6:
        raise ValueError(
            f"targets must be [N, 6] (batch_index, class, x1, y1, x2, y2), got {tuple(targets.shape)}"
        )
    image = targets[:, 0].long()
    if image.min() < 0 or image.max() >= batch_size:
        raise ValueError(
            f"target batch indices must lie in [0, {batch_size}), got [{image.min()}, {image.max()}]"
        )
    order = torch.argsort(image, stable=True)
    image = image[order]
    rows = targets[order]
    counts = torch.bincount(image, minlength=batch_size)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.shape[0], device=device) - starts[image]
    n = int(counts.max())
    labels = torch.zeros((batch_size, n), dtype=torch.long, device=device)
    boxes = torch.zeros((batch_size, n, 4), dtype=targets.dtype, device=device)
    mask = torch.zeros((batch_size, n), dtype=torch.bool, device=device)
    labels[image, slot] = rows[:, 1].long()
    boxes[image, slot] = rows[:, 2:6]
    mask[image, slot] = True
    return labels, boxes, mask


class TaskAlignedDetectionLoss(nn.Module):
    """Task-aligned detection loss; the two families are presets of it (see subclasses)."""

    def __init__(
        self,
        num_classes: int,
        assigner: TaskAlignedAssigner,
        cls_loss: str = "varifocal",
        box_iou: str = "giou",
        box_iou_eps: float = 1e-10,
        cls_weight: float = 1.0,
        box_weight: float = 2.5,
        dfl_weight: float = 0.5,
        scale_by_batch: bool = False,
        sync_normalizer: bool = False,
    ) -> None:
        super().__init__()
        if cls_loss not in ("varifocal", "bce"):
            raise ValueError(f"cls_loss must be 'varifocal' or 'bce', got {cls_loss!r}")
        self.num_classes = num_classes
        self.assigner = assigner
        self.cls_loss = cls_loss
        self.box_iou = box_iou
        self.box_iou_eps = box_iou_eps
        self.cls_weight = cls_weight
        self.box_weight = box_weight
        self.dfl_weight = dfl_weight
        self.scale_by_batch = scale_by_batch
        self.sync_normalizer = sync_normalizer

    # -------------------------------------------------------------- pieces
    def _check(self, head: HeadOutput, batch_size: int | None) -> None:
        b, _, c = head.cls_logits.shape
        if c != self.num_classes:
            raise ValueError(
                f"the head predicts {c} classes but the loss was built for num_classes={self.num_classes}"
            )
        if head.reg_distri.shape[-1] != 4 * head.bins:
            raise ValueError(
                f"reg_distri has {head.reg_distri.shape[-1]} channels, expected 4*bins={4 * head.bins}"
            )
        if batch_size is not None and batch_size != b:
            raise ValueError(f"batch_size={batch_size} but the head outputs have batch {b}")

    def _decode(self, head: HeadOutput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """fp32 logits, DFL logits, anchor points in grid units, predicted boxes in grid units."""
        reg = head.reg_distri.float()
        stride = head.stride_tensor.float()
        anchor_grid = head.anchor_points.float() / stride
        ltrb = DFL(head.bins).to(reg.device)(reg)
        return head.cls_logits.float(), reg, anchor_grid, distance2bbox(anchor_grid, ltrb)

    def _assign(
        self, head: HeadOutput, cls_logits: torch.Tensor, pred_grid: torch.Tensor, targets: torch.Tensor
    ) -> Assignment:
        stride = head.stride_tensor.float()
        labels, boxes, mask = pad_targets(targets.detach().float().to(cls_logits.device), cls_logits.shape[0])
        real = labels[mask]
        if real.numel() and (real.min() < 0 or real.max() >= self.num_classes):
            raise ValueError(
                f"target classes must lie in [0, {self.num_classes}), got [{int(real.min())}, {int(real.max())}]"
            )
        return self.assigner(
            cls_logits.detach().sigmoid(),
            pred_grid.detach() * stride,
            head.anchor_points.float(),
            labels,
            boxes,
            mask,
        )

    def assign(self, head: HeadOutput, targets: torch.Tensor, batch_size: int | None = None) -> Assignment:
        """The assignment the loss would use (for inspection and tests)."""
        self._check(head, batch_size)
        with torch.autocast(device_type=head.cls_logits.device.type, enabled=False):
            cls_logits, _, _, pred_grid = self._decode(head)
            return self._assign(head, cls_logits, pred_grid, targets)

    def _normalizer(self, scores_sum: torch.Tensor) -> torch.Tensor:
        norm = scores_sum.detach().clone()
        if self.sync_normalizer and dist.is_available() and dist.is_initialized():
            dist.all_reduce(norm, op=dist.ReduceOp.SUM)
            norm = norm / dist.get_world_size()
        return norm.clamp(min=1.0)

    # -------------------------------------------------------------- forward
    def forward(
        self,
        head: HeadOutput,
        targets: torch.Tensor,
        batch_size: int | None = None,
        class_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss for one batch. ``class_mask [B, C]`` bool (optional): classes that are not part
        of an image's vocabulary contribute no classification loss there."""
        self._check(head, batch_size)
        with torch.autocast(device_type=head.cls_logits.device.type, enabled=False):
            return self._forward(head, targets, class_mask)

    def _forward(
        self, head: HeadOutput, targets: torch.Tensor, class_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cls_logits, reg, anchor_grid, pred_grid = self._decode(head)
        batch, anchors, num_classes = cls_logits.shape
        asg = self._assign(head, cls_logits, pred_grid, targets)
        target_scores = asg.scores

        if self.cls_loss == "varifocal":
            onehot = F.one_hot(asg.labels, num_classes + 1)[..., :num_classes].to(cls_logits.dtype)
            cls_el = varifocal_loss(cls_logits, target_scores, onehot)
        else:
            cls_el = bce_loss(cls_logits, target_scores)
        if class_mask is not None:
            if class_mask.shape != (batch, num_classes):
                raise ValueError(
                    f"class_mask must be [B, C] = {(batch, num_classes)}, got {tuple(class_mask.shape)}"
                )
            cls_el = cls_el * class_mask.to(device=cls_el.device, dtype=cls_el.dtype)[:, None, :]
        cls_sum = cls_el.sum()
        cls_img = cls_el.detach().sum(dim=(1, 2))

        fg = asg.fg_mask
        bins = head.bins
        box_img = torch.zeros(batch, dtype=cls_logits.dtype, device=cls_logits.device)
        dfl_img = torch.zeros_like(box_img)
        if bool(fg.any()):
            weight = target_scores.sum(-1)[fg]
            target_grid = asg.bboxes / head.stride_tensor.float()
            box_el = (
                iou_loss(pred_grid[fg], target_grid[fg], kind=self.box_iou, eps=self.box_iou_eps) * weight
            )
            ltrb = dfl_targets(anchor_grid.expand(batch, anchors, 2)[fg], target_grid[fg], bins)
            dfl_el = dfl_loss(reg[fg], ltrb, bins) * weight
            box_sum, dfl_sum = box_el.sum(), dfl_el.sum()
            image_of_fg = fg.nonzero()[:, 0]
            box_img.index_add_(0, image_of_fg, box_el.detach())
            dfl_img.index_add_(0, image_of_fg, dfl_el.detach())
        else:  # keep the regression branch in the graph (DDP needs every parameter used)
            box_sum = pred_grid.sum() * 0.0
            dfl_sum = reg.sum() * 0.0

        norm = self._normalizer(target_scores.sum())
        cls = self.cls_weight * cls_sum / norm
        box = self.box_weight * box_sum / norm
        dfl = self.dfl_weight * dfl_sum / norm
        scale = float(batch) if self.scale_by_batch else 1.0
        total = (cls + box + dfl) * scale
        image_losses = (
            (self.cls_weight * cls_img + self.box_weight * box_img + self.dfl_weight * dfl_img) / norm * scale
        )
        components = {
            "cls": cls.detach(),
            "box": box.detach(),
            "dfl": dfl.detach(),
            "num_fg": fg.sum().detach(),
            "normalizer": norm,
            "image_losses": image_losses,
        }
        return total, components


class PPYoloELoss(TaskAlignedDetectionLoss):
    """super-gradients ``PPYoloELoss`` (YOLO-NAS recipe: task-aligned assigner, varifocal,
    GIoU, DFL; weights 1.0 / 2.5 / 0.5). ``total = cls + box + dfl``."""

    def __init__(
        self,
        num_classes: int,
        topk: int = 13,
        alpha: float = 1.0,
        beta: float = 6.0,
        cls_weight: float = 1.0,
        iou_weight: float = 2.5,
        dfl_weight: float = 0.5,
        sync_normalizer: bool = True,
        max_assign_elements: int = 1 << 24,
    ) -> None:
        assigner = TaskAlignedAssigner.ppyoloe(
            num_classes, topk=topk, alpha=alpha, beta=beta, max_elements=max_assign_elements
        )
        super().__init__(
            num_classes,
            assigner,
            cls_loss="varifocal",
            box_iou="giou",
            box_iou_eps=1e-10,
            cls_weight=cls_weight,
            box_weight=iou_weight,
            dfl_weight=dfl_weight,
            scale_by_batch=False,
            sync_normalizer=sync_normalizer,
        )


class V8DetectionLoss(TaskAlignedDetectionLoss):
    """ultralytics ``v8DetectionLoss`` (YOLO-World: CIoU task-aligned assigner, BCE, CIoU, DFL;
    gains box 7.5 / cls 0.5 / dfl 1.5). ``total = B * (box + cls + dfl)`` by default."""

    def __init__(
        self,
        num_classes: int,
        topk: int = 10,
        alpha: float = 0.5,
        beta: float = 6.0,
        box_gain: float = 7.5,
        cls_gain: float = 0.5,
        dfl_gain: float = 1.5,
        strides: tuple[int, ...] = (8, 16, 32),
        scale_by_batch: bool = True,
        sync_normalizer: bool = False,
        max_assign_elements: int = 1 << 24,
    ) -> None:
        assigner = TaskAlignedAssigner.ultralytics(
            num_classes, strides=strides, topk=topk, alpha=alpha, beta=beta, max_elements=max_assign_elements
        )
        super().__init__(
            num_classes,
            assigner,
            cls_loss="bce",
            box_iou="ciou",
            box_iou_eps=1e-7,
            cls_weight=cls_gain,
            box_weight=box_gain,
            dfl_weight=dfl_gain,
            scale_by_batch=scale_by_batch,
            sync_normalizer=sync_normalizer,
        )
