"""Box geometry shared by both families: anchors, distance <-> box, IoU family.

Conventions: boxes are ``xyxy``; anchor points are pixel centres ``((x+0.5)*s, (y+0.5)*s)``,
level-major (stride 8, 16, 32), row-major inside a level; distances are ``l, t, r, b``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchvision.ops import box_convert

__all__ = [
    "make_anchors",
    "distance2bbox",
    "bbox2distance",
    "xyxy_to_cxcywh",
    "cxcywh_to_xyxy",
    "paired_iou",
    "clip_boxes",
]


def make_anchors(
    shapes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    offset: float = 0.5,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor centres in pixels ``[A, 2]`` and their strides ``[A, 1]`` for feature maps ``(H, W)``."""
    points, stride_list = [], []
    for (h, w), s in zip(shapes, strides):
        ys = (torch.arange(h, device=device, dtype=dtype) + offset) * s
        xs = (torch.arange(w, device=device, dtype=dtype) + offset) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((xx, yy), dim=-1).reshape(-1, 2))
        stride_list.append(torch.full((h * w, 1), float(s), device=device, dtype=dtype))
    return torch.cat(points), torch.cat(stride_list)


def distance2bbox(points: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """``l, t, r, b`` distances from ``points`` -> ``xyxy`` (same units as the inputs)."""
    lt, rb = distance[..., :2], distance[..., 2:]
    return torch.cat((points - lt, points + rb), dim=-1)


def bbox2distance(points: torch.Tensor, boxes: torch.Tensor, max_distance: float | None = None) -> torch.Tensor:
    """``xyxy`` -> ``l, t, r, b`` distances from ``points``, optionally clipped to ``[0, max_distance]``."""
    ltrb = torch.cat((points - boxes[..., :2], boxes[..., 2:] - points), dim=-1)
    if max_distance is not None:
        ltrb = ltrb.clamp(0, max_distance)
    return ltrb


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, "xyxy", "cxcywh")


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


def clip_boxes(boxes: torch.Tensor, height: float, width: float) -> torch.Tensor:
    out = boxes.clone()
    out[..., 0::2] = out[..., 0::2].clamp(0, width)
    out[..., 1::2] = out[..., 1::2].clamp(0, height)
    return out


def paired_iou(box1: torch.Tensor, box2: torch.Tensor, kind: str = "iou", eps: float = 1e-7) -> torch.Tensor:
    """Element-wise (broadcasting) IoU / GIoU / CIoU of two ``[..., 4]`` xyxy tensors.

    Written out rather than calling torchvision because the losses must match the reference
    implementations' epsilon placement (parity fixtures at 1e-5) and because broadcasting
    ``[B,n,1,4]`` against ``[B,1,A,4]`` gives the assigner's batched matrices directly.
    Conventions (all verified against the fixtures):

    * ``"iou"``: super-gradients' assigner IoU: widths/heights clipped at 0, ``eps`` added to
      the union (so zero-area padding rows give 0, never NaN).
    * ``"giou"``: super-gradients' ``GIoULoss``: ``eps`` added to the union and to the enclosing
      area.
    * ``"ciou"``: ultralytics' ``bbox_iou(CIoU=True)``: heights clamped at ``eps``, ``eps`` added
      to the union and the enclosing diagonal, the aspect term's ``alpha`` computed without grad.
    """
    x1, y1, x2, y2 = box1.unbind(-1)
    a1, b1, a2, b2 = box2.unbind(-1)
    w1, h1 = x2 - x1, y2 - y1
    w2, h2 = a2 - a1, b2 - b1
    if kind == "iou":
        w1, h1, w2, h2 = w1.clamp(min=0), h1.clamp(min=0), w2.clamp(min=0), h2.clamp(min=0)
    elif kind == "ciou":
        h1, h2 = h1.clamp(min=eps), h2.clamp(min=eps)
    elif kind != "giou":
        raise ValueError(f"unknown IoU kind {kind!r}; use 'iou', 'giou' or 'ciou'")
    inter = (torch.minimum(x2, a2) - torch.maximum(x1, a1)).clamp(min=0) * (
        torch.minimum(y2, b2) - torch.maximum(y1, b1)
    ).clamp(min=0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    if kind == "iou":
        return iou
    cw = torch.maximum(x2, a2) - torch.minimum(x1, a1)
    ch = torch.maximum(y2, b2) - torch.minimum(y1, b1)
    if kind == "giou":
        enclose = cw * ch + eps
        return iou - (enclose - union) / enclose
    c2 = cw.pow(2) + ch.pow(2) + eps
    rho2 = ((a1 + a2 - x1 - x2).pow(2) + (b1 + b2 - y1 - y2).pow(2)) / 4
    v = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)).pow(2)
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)
