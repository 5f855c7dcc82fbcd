"""Post-processing shared by both families: score filter, top-k, batched NMS, max detections.

:class:`PostprocessConfig` is the one spelling of these settings: eager prediction, validation,
the exported graph, the server and the checkpoint record all carry one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torchvision.ops import batched_nms

__all__ = ["PostprocessConfig", "postprocess"]


@dataclass(frozen=True)
class PostprocessConfig:
    """Detections from decoded scores: ``score > conf`` candidates, ``top_k`` of them to NMS at
    ``iou``, the ``max_det`` best kept; ``multi_label`` lets an anchor keep several classes,
    ``agnostic`` runs NMS across classes."""

    conf: float = 0.25
    iou: float = 0.7
    top_k: int = 1000
    max_det: int = 300
    multi_label: bool = True
    agnostic: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.conf <= 1.0:
            raise ValueError(f"conf must be in [0, 1], got {self.conf}")
        if not 0.0 <= self.iou <= 1.0:
            raise ValueError(f"iou must be in [0, 1], got {self.iou}")
        if self.top_k < 1 or self.max_det < 1:
            raise ValueError(f"top_k and max_det must be >= 1, got {self.top_k} and {self.max_det}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> PostprocessConfig:
        """Known fields only, so a record written by a newer version still reads."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (values or {}).items() if k in names})

    def replace(self, **overrides: Any) -> PostprocessConfig:
        """A copy with the given fields changed; ``None`` values keep the current setting."""
        return PostprocessConfig(**{**self.to_dict(), **{k: v for k, v in overrides.items() if v is not None}})


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
    the first ``max_det`` rows, in descending confidence, are kept. The same settings as a
    :class:`PostprocessConfig`: ``postprocess(boxes, scores, **config.to_dict())``.
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
