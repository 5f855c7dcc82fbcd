"""Post-processing shared by both families: score filter, top-k, batched NMS, max detections."""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms


def postprocess(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    conf: float = 0.25,
    iou: float = 0.7,
    top_k: int = 1000,
    max_det: int = 300,
    multi_label: bool = True,
    agnostic: bool = False,
) -> list[torch.Tensor]:
    """Decoded ``boxes [B,A,4]`` and ``scores [B,A,C]`` -> per image ``[N, 6]`` rows ``x1,y1,x2,y2,conf,cls``.

    Same order of operations as super-gradients' ``PPYoloEPostPredictionCallback``: candidates
    are ``score > conf`` per (anchor, class) with ``multi_label``, else the best class with
    ``score >= conf``; the ``top_k`` best go to per-class NMS (class-agnostic with ``agnostic``);
    the first ``max_det`` rows, in descending confidence, are kept.
    """
    out = []
    for b, s in zip(boxes, scores):
        if multi_label:
            idx, cls = (s > conf).nonzero(as_tuple=True)
            b, c = b[idx], s[idx, cls]
        else:
            c, cls = s.max(dim=1)
            keep = c >= conf
            b, c, cls = b[keep], c[keep], cls[keep]
        if c.numel() > top_k:
            c, order = c.topk(top_k, largest=True, sorted=True)
            b, cls = b[order], cls[order]
        keep = batched_nms(b.float(), c.float(), torch.zeros_like(cls) if agnostic else cls, iou)[:max_det]
        out.append(torch.cat((b[keep], c[keep, None], cls[keep, None].to(b.dtype)), dim=1))
    return out
