"""YOLOv8 CSP-Darknet backbone (the one YOLO-World v2 uses), scaled like ultralytics."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from detectkit.nn.c2f import SPPF, C2f, conv_silu


@dataclass(frozen=True)
class WorldScale:
    """ultralytics ``scales`` row: depth multiple, width multiple, channel cap."""

    depth: float
    width: float
    max_channels: int

    def channels(self, c: int) -> int:
        """Width-scaled channel count, capped and rounded up to a multiple of 8."""
        return math.ceil(min(c, self.max_channels) * self.width / 8) * 8

    def repeats(self, n: int) -> int:
        return max(round(n * self.depth), 1) if n > 1 else n


# yolov8-worldv2.yaml: n, s, m, l, x
SCALES: dict[str, WorldScale] = {
    "n": WorldScale(0.33, 0.25, 1024),
    "s": WorldScale(0.33, 0.50, 1024),
    "m": WorldScale(0.67, 0.75, 768),
    "l": WorldScale(1.00, 1.00, 512),
    "x": WorldScale(1.00, 1.25, 512),
}


class CSPDarknet(nn.Module):
    """Stem + four stride-2 stages; returns P3, P4, P5 (strides 8, 16, 32).

    ultralytics layers: 0 = ``stem``, 1-2 = ``stage1``, 3-4 = ``stage2`` (P3), 5-6 = ``stage3``
    (P4), 7-9 = ``stage4`` (P5, ends with SPPF).
    """

    def __init__(self, scale: WorldScale) -> None:
        super().__init__()
        ch = scale.channels
        self.out_channels = (ch(256), ch(512), ch(1024))
        self.stem = conv_silu(3, ch(64), 3, 2)
        self.stage1 = nn.Sequential(
            conv_silu(ch(64), ch(128), 3, 2), C2f(ch(128), ch(128), scale.repeats(3), True)
        )
        self.stage2 = nn.Sequential(
            conv_silu(ch(128), ch(256), 3, 2), C2f(ch(256), ch(256), scale.repeats(6), True)
        )
        self.stage3 = nn.Sequential(
            conv_silu(ch(256), ch(512), 3, 2), C2f(ch(512), ch(512), scale.repeats(6), True)
        )
        self.stage4 = nn.Sequential(
            conv_silu(ch(512), ch(1024), 3, 2),
            C2f(ch(1024), ch(1024), scale.repeats(3), True),
            SPPF(ch(1024), ch(1024), 5),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p3 = self.stage2(self.stage1(self.stem(x)))
        p4 = self.stage3(p3)
        p5 = self.stage4(p4)
        return p3, p4, p5
