"""Spatial pyramid pooling context module (YOLO-NAS ``backbone.context_module``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from detectkit.nn.conv import ConvBNAct

__all__ = ["SPP"]


class SPP(nn.Module):
    """Halve channels, concat stride-1 max-pools of several sizes, project: a wide receptive field."""

    def __init__(self, in_channels: int, out_channels: int, kernel_sizes: Sequence[int] = (5, 9, 13)) -> None:
        super().__init__()
        hidden = in_channels // 2
        self.cv1 = ConvBNAct(in_channels, hidden, 1)
        self.cv2 = ConvBNAct(hidden * (len(kernel_sizes) + 1), out_channels, 1)
        self.m = nn.ModuleList(nn.MaxPool2d(k, stride=1, padding=k // 2) for k in kernel_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        return self.cv2(torch.cat([x] + [m(x) for m in self.m], dim=1))
