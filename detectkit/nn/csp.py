"""Cross-stage-partial layer of YOLO-NAS (super-gradients' ``YoloNASCSPLayer`` key layout)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from detectkit.nn.conv import ConvBNAct

__all__ = ["CSPBottleneck", "CSPLayer"]

BlockFactory = Callable[[int, int], nn.Module]


class CSPBottleneck(nn.Module):
    """Two blocks with a residual scaled by a learnable ``alpha`` (``alpha * x + cv2(cv1(x))``)."""

    def __init__(self, channels: int, block: BlockFactory, shortcut: bool = True, use_alpha: bool = True) -> None:
        super().__init__()
        self.cv1 = block(channels, channels)
        self.cv2 = block(channels, channels)
        self.shortcut = shortcut
        self.use_alpha = use_alpha
        if use_alpha:
            self.alpha = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        if not self.shortcut:
            return y
        return (self.alpha * x if self.use_alpha else x) + y


class CSPLayer(nn.Module):
    """``conv3(cat(bottlenecks(conv1(x)), conv2(x)))``.

    With ``concat_intermediates`` the input of the bottleneck chain and every bottleneck output
    are concatenated (YOLO-NAS M/L), otherwise only the chain's last output.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        block: BlockFactory,
        hidden_channels: int,
        concat_intermediates: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.concat_intermediates = concat_intermediates
        self.conv1 = ConvBNAct(in_channels, hidden_channels, 1)
        self.conv2 = ConvBNAct(in_channels, hidden_channels, 1)
        n_cat = 2 + (num_blocks if concat_intermediates else 0)
        self.conv3 = ConvBNAct(hidden_channels * n_cat, out_channels, 1)
        self.bottlenecks = nn.Sequential(*(CSPBottleneck(hidden_channels, block) for _ in range(num_blocks)))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        if self.concat_intermediates:
            parts = [y]
            for m in self.bottlenecks:
                parts.append(m(parts[-1]))
        else:
            parts = [self.bottlenecks(y)]
        parts.append(self.conv2(x))
        return self.conv3(self.dropout(torch.cat(parts, dim=1)))
