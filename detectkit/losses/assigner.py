"""Task-aligned assigner (TOOD), one implementation for both model families.

super-gradients (YOLO-NAS) and ultralytics (YOLO-World) ship two variants of the same
algorithm; they differ in a handful of decisions, which are flags here (see the two presets):

==========================  =====================================  ==========================================
decision                    super-gradients (``ppyoloe``)          ultralytics (``ultralytics``)
==========================  =====================================  ==========================================
top-k, alpha, beta          13, 1.0, 6.0                           10, 0.5, 6.0
alignment IoU               plain IoU (eps 1e-9)                   CIoU (eps 1e-7) clamped at 0
candidate test              centre strictly inside the GT          same, but a GT side < 8 px is first
                                                                   widened to 16 px about its centre
conflict resolution         max IoU over *all* GT rows             max CIoU over *candidate* pairs only
==========================  =====================================  ==========================================

Both use the batched top-k with the padding mask as top-k mask (no "best metric > eps" test),
and the same score normalisation ``metric / (max metric of the GT + eps) * max IoU of the GT``.

Memory: the pairwise tensors are ``[B, n_gt, A]``. When ``B * n_gt * A`` exceeds
``max_elements`` the work is split into blocks of images and GT rows. Only per-anchor running
reductions cross block borders (positive count, first positive GT, best overlap with first-index
tie-breaking), so the result is identical to the single-block computation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from detectkit.ops.boxes import paired_iou

__all__ = ["Assignment", "TaskAlignedAssigner"]


class Assignment(NamedTuple):
    """Per-anchor targets. Background anchors: ``labels == num_classes``, ``gt_idx == 0`` and
    ``bboxes`` = the image's GT row 0 (meaningless; always mask with ``fg_mask``)."""

    labels: torch.Tensor  # [B, A] int64
    bboxes: torch.Tensor  # [B, A, 4] xyxy, GT units (pixels)
    scores: torch.Tensor  # [B, A, C] soft targets (normalised alignment metric on the GT class)
    fg_mask: torch.Tensor  # [B, A] bool
    gt_idx: torch.Tensor  # [B, A] int64, row of the padded GT tensor


class TaskAlignedAssigner(nn.Module):
    """Assign GT boxes to anchors by ``score**alpha * IoU**beta`` (top-k per GT, centre prior).

    Args:
        num_classes: width of ``scores``; also the background label.
        topk, alpha, beta: the alignment metric and how many anchors each GT takes.
        eps: normalisation epsilon (and candidate margin).
        iou_kind: ``"iou"`` (super-gradients) or ``"ciou"`` (ultralytics); clamped at 0.
        iou_eps: epsilon of that IoU.
        overlap_on_candidates_only: conflict resolution compares the IoU of candidate pairs only
            (ultralytics) instead of all valid GT rows of the image (super-gradients); the
            normalisation then also treats non-candidate pairs as metric/IoU 0.
        min_side, min_side_below: for the candidate test only, GT sides shorter than
            ``min_side_below`` are widened to ``min_side`` about the centre (ultralytics 8.4:
            8 and 16). ``min_side=0`` disables it.
        max_elements: memory budget, in elements of one ``[b, g, A]`` block (peak memory is
            roughly a dozen fp32 tensors of that size: ~0.8 GB at the default 2**24).
    """

    def __init__(
        self,
        num_classes: int,
        topk: int = 13,
        alpha: float = 1.0,
        beta: float = 6.0,
        eps: float = 1e-9,
        iou_kind: str = "iou",
        iou_eps: float = 1e-9,
        overlap_on_candidates_only: bool = False,
        min_side: float = 0.0,
        min_side_below: float | None = None,
        max_elements: int = 1 << 24,
    ) -> None:
        super().__init__()
        if iou_kind not in ("iou", "giou", "ciou"):
            raise ValueError(f"iou_kind must be 'iou', 'giou' or 'ciou', got {iou_kind!r}")
        self.num_classes = num_classes
        self.topk = topk
        self.alpha = alpha
        self.beta = beta
        self.eps = eps
        self.iou_kind = iou_kind
        self.iou_eps = iou_eps
        self.overlap_on_candidates_only = overlap_on_candidates_only
        self.min_side = float(min_side)
        self.min_side_below = float(min_side if min_side_below is None else min_side_below)
        self.max_elements = int(max_elements)

    @classmethod
    def ppyoloe(cls, num_classes: int, **overrides) -> TaskAlignedAssigner:
        """super-gradients ``TaskAlignedAssigner(topk=13, alpha=1.0, beta=6.0, eps=1e-9)``."""
        kw = dict(topk=13, alpha=1.0, beta=6.0, eps=1e-9, iou_kind="iou", iou_eps=1e-9)
        return cls(num_classes, **{**kw, **overrides})

    @classmethod
    def ultralytics(
        cls, num_classes: int, strides: tuple[int, ...] = (8, 16, 32), **overrides
    ) -> TaskAlignedAssigner:
        """ultralytics 8.4 ``TaskAlignedAssigner(topk=10, alpha=0.5, beta=6.0, stride=strides)``."""
        kw = dict(
            topk=10,
            alpha=0.5,
            beta=6.0,
            eps=1e-9,
            iou_kind="ciou",
            iou_eps=1e-7,
            overlap_on_candidates_only=True,
            min_side=float(strides[1] if len(strides) > 1 else strides[0]),
            min_side_below=float(strides[0]),
        )
        return cls(num_classes, **{**kw, **overrides})

    # ------------------------------------------------------------------ helpers
    def _candidate_boxes(self, gt_bboxes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """GT boxes as seen by the centre prior (small sides widened when ``min_side > 0``)."""
        if self.min_side <= 0:
            return gt_bboxes
        # Round trip through (centre, size) for every box, as the reference does, so that
        # the candidate test sees the same rounding.
        centre = (gt_bboxes[..., :2] + gt_bboxes[..., 2:]) / 2
        size = gt_bboxes[..., 2:] - gt_bboxes[..., :2]
        small = (size < self.min_side_below) & valid[..., None]
        size = torch.where(small, torch.full_like(size, self.min_side), size)
        half = size / 2
        return torch.cat((centre - half, centre + half), dim=-1)

    def _is_candidate(self, anchor_points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Anchor centre strictly inside the box: ``[..., 4]`` boxes x ``[A, 2]`` -> ``[..., A]``."""
        lt = anchor_points - boxes[..., None, :2]
        rb = boxes[..., None, 2:] - anchor_points
        return torch.cat((lt, rb), dim=-1).amin(dim=-1) > self.eps

    def _overlap(self, gt: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        return paired_iou(gt, pred, kind=self.iou_kind, eps=self.iou_eps).clamp(min=0)

    def _metric(self, score: torch.Tensor, overlap: torch.Tensor) -> torch.Tensor:
        return score.pow(self.alpha) * overlap.pow(self.beta)

    def _blocks(self, batch: int, n_gt: int, anchors: int) -> list[tuple[int, int, int, int]]:
        """(b0, b1, g0, g1) blocks covering the batch within the memory budget."""
        if batch * n_gt * anchors <= self.max_elements:
            return [(0, batch, 0, n_gt)]
        if n_gt * anchors <= self.max_elements:
            step = max(1, self.max_elements // (n_gt * anchors))
            return [(b, min(b + step, batch), 0, n_gt) for b in range(0, batch, step)]
        g_step = max(1, self.max_elements // anchors)
        return [(b, b + 1, g, min(g + g_step, n_gt)) for b in range(batch) for g in range(0, n_gt, g_step)]

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(
        self,
        pred_scores: torch.Tensor,
        pred_bboxes: torch.Tensor,
        anchor_points: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_bboxes: torch.Tensor,
        pad_gt_mask: torch.Tensor,
    ) -> Assignment:
        """Assign.

        Args:
            pred_scores: ``[B, A, C]`` probabilities (after sigmoid), detached.
            pred_bboxes: ``[B, A, 4]`` decoded xyxy, same units as the GTs (pixels).
            anchor_points: ``[A, 2]`` anchor centres, same units.
            gt_labels: ``[B, n]`` (or ``[B, n, 1]``) class ids; padding rows may hold anything in range.
            gt_bboxes: ``[B, n, 4]`` xyxy.
            pad_gt_mask: ``[B, n]`` (or ``[B, n, 1]``) true for real GT rows.
        """
        if gt_labels.dim() == 3:
            gt_labels = gt_labels.squeeze(-1)
        if pad_gt_mask.dim() == 3:
            pad_gt_mask = pad_gt_mask.squeeze(-1)
        gt_labels = gt_labels.long()
        valid = pad_gt_mask.bool()
        batch, anchors, num_classes = pred_scores.shape
        n_gt = gt_bboxes.shape[1]
        device = pred_scores.device
        if num_classes != self.num_classes:
            raise ValueError(f"assigner built for {self.num_classes} classes, scores have {num_classes}")

        if n_gt == 0:
            return Assignment(
                labels=torch.full((batch, anchors), self.num_classes, dtype=torch.long, device=device),
                bboxes=torch.zeros((batch, anchors, 4), dtype=pred_bboxes.dtype, device=device),
                scores=torch.zeros_like(pred_scores),
                fg_mask=torch.zeros((batch, anchors), dtype=torch.bool, device=device),
                gt_idx=torch.zeros((batch, anchors), dtype=torch.long, device=device),
            )

        safe_labels = gt_labels.clamp(0, num_classes - 1)
        cand_boxes = self._candidate_boxes(gt_bboxes, valid)
        topk = min(self.topk, anchors)

        # Per-anchor running reductions over GT rows.
        count = torch.zeros((batch, anchors), dtype=torch.long, device=device)
        first_pos = torch.zeros((batch, anchors), dtype=torch.long, device=device)
        best_val = torch.full((batch, anchors), -1.0, dtype=pred_bboxes.dtype, device=device)
        best_idx = torch.zeros((batch, anchors), dtype=torch.long, device=device)

        for b0, b1, g0, g1 in self._blocks(batch, n_gt, anchors):
            gt = gt_bboxes[b0:b1, g0:g1]  # [b, g, 4]
            ok = valid[b0:b1, g0:g1]  # [b, g]
            cand = self._is_candidate(anchor_points, cand_boxes[b0:b1, g0:g1]) & ok[..., None]  # [b, g, A]
            overlap = self._overlap(gt[:, :, None, :], pred_bboxes[b0:b1, None, :, :])  # [b, g, A]
            cls_idx = safe_labels[b0:b1, g0:g1]  # [b, g]
            score = pred_scores[b0:b1].gather(2, cls_idx[:, None, :].expand(-1, anchors, -1)).transpose(1, 2)
            metric = self._metric(score, overlap) * cand
            top_idx = metric.topk(topk, dim=-1).indices
            is_top = torch.zeros_like(cand).scatter_(-1, top_idx, True)
            pos = is_top & cand  # cand already includes the padding mask

            # conflict-resolution overlap: all valid rows (SG) or candidate pairs only (ultralytics)
            conflict = overlap * (cand if self.overlap_on_candidates_only else ok[..., None])
            blk_val, blk_arg = conflict.max(dim=1)  # first index on ties
            better = blk_val > best_val[b0:b1]  # strict: earlier blocks win ties
            best_val[b0:b1] = torch.where(better, blk_val, best_val[b0:b1])
            best_idx[b0:b1] = torch.where(better, blk_arg + g0, best_idx[b0:b1])

            blk_count = pos.sum(dim=1)
            blk_first = pos.to(torch.uint8).argmax(dim=1) + g0
            unset = (count[b0:b1] == 0) & (blk_count > 0)
            first_pos[b0:b1] = torch.where(unset, blk_first, first_pos[b0:b1])
            count[b0:b1] += blk_count

        fg_mask = count > 0
        zero = torch.zeros_like(first_pos)
        gt_idx = torch.where(count > 1, best_idx, torch.where(fg_mask, first_pos, zero))

        labels = safe_labels.gather(1, gt_idx)
        bboxes = gt_bboxes.gather(1, gt_idx[..., None].expand(-1, -1, 4))

        # Normalisation, in [B, A] space: every positive anchor belongs to exactly one GT.
        pair_score = pred_scores.gather(2, labels[..., None]).squeeze(-1)
        pair_overlap = self._overlap(bboxes, pred_bboxes)
        if self.overlap_on_candidates_only:
            pair_cand = self._is_candidate(
                anchor_points[:, None, :], cand_boxes.gather(1, gt_idx[..., None].expand(-1, -1, 4))
            )
            pair_overlap = pair_overlap * pair_cand.squeeze(-1)
        pair_metric = self._metric(pair_score, pair_overlap) * fg_mask
        pair_overlap = pair_overlap * fg_mask
        flat = (gt_idx + torch.arange(batch, device=device)[:, None] * n_gt).flatten()
        max_metric = torch.zeros(batch * n_gt, dtype=pair_metric.dtype, device=device)
        max_metric = max_metric.scatter_reduce(0, flat, pair_metric.flatten(), reduce="amax")
        max_overlap = torch.zeros_like(max_metric).scatter_reduce(
            0, flat, pair_overlap.flatten(), reduce="amax"
        )
        norm = (
            pair_metric
            / (max_metric[flat].view(batch, anchors) + self.eps)
            * max_overlap[flat].view(batch, anchors)
        )

        labels = torch.where(fg_mask, labels, torch.full_like(labels, self.num_classes))
        scores = torch.zeros_like(pred_scores)
        scores.scatter_(
            2, labels.clamp(max=num_classes - 1)[..., None], (norm * fg_mask)[..., None].to(scores.dtype)
        )
        return Assignment(labels=labels, bboxes=bboxes, scores=scores, fg_mask=fg_mask, gt_idx=gt_idx)
