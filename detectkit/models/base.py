"""The interface every detectkit detector implements (both families)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from detectkit.models.outputs import HeadOutput
from detectkit.nn.dfl import DFL
from detectkit.ops.boxes import distance2bbox


class Detector(nn.Module):
    """Train mode: ``forward(x) -> HeadOutput``. Eval mode: ``forward(x) -> (boxes, scores)``.

    ``boxes [B,A,4]`` are xyxy in input pixels (not clipped), ``scores [B,A,C]`` sigmoid
    probabilities. Inputs are float RGB NCHW in [0, 1], sides multiples of 32.
    """

    num_classes: int
    class_names: list[str]
    strides: tuple[int, ...] = (8, 16, 32)
    #: name of the training loss in detectkit.losses that matches the reference recipe
    default_loss: str = "ppyoloe"

    def __init__(self, num_classes: int, bins: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.class_names = [str(i) for i in range(num_classes)]
        self.dfl = DFL(bins)

    def decode(self, head: HeadOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """The one box decoder: DFL expectation -> xyxy pixels, sigmoid scores."""
        ltrb = self.dfl(head.reg_distri) * head.stride_tensor
        boxes = distance2bbox(head.anchor_points, ltrb)
        return boxes, head.cls_logits.sigmoid()

    def head_forward(self, x: torch.Tensor) -> HeadOutput:  # implemented by each family
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> Any:
        head = self.head_forward(x)
        if self.training:
            return head
        return self.decode(head)

    def fuse(self) -> Detector:  # implemented by each family
        raise NotImplementedError

    def predict(self, source: Any, conf: float = 0.25, iou: float = 0.7, **kwargs: Any):
        """Detections on images given as paths, folders, URLs, PIL images, arrays or videos."""
        from detectkit.predict import predict

        return predict(self, source, conf=conf, iou=iou, **kwargs)
