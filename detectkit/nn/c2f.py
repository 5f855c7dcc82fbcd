"""CSP blocks of the YOLOv8 family (C2f, Bottleneck, SPPF).

Submodule names follow ultralytics (``cv1``, ``cv2``, ``m.<j>``) so their checkpoints map onto
these blocks key for key. Activation is SiLU, as in every ultralytics ``Conv``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from detectkit.nn.conv import ConvBNAct


def conv_silu(cin: int, cout: int, k: int = 1, s: int = 1, act: bool = True) -> ConvBNAct:
    """The ultralytics ``Conv`` unit: conv (no bias) + BN + SiLU (or no activation)."""
    return ConvBNAct(cin, cout, k, s, act=nn.SiLU if act else None)


class Bottleneck(nn.Module):
    """Two 3x3 convs with an optional residual (only when shapes allow it)."""

    def __init__(self, cin: int, cout: int, shortcut: bool = True, expansion: float = 0.5) -> None:
        super().__init__()
        hidden = int(cout * expansion)
        self.cv1 = conv_silu(cin, hidden, 3)
        self.cv2 = conv_silu(hidden, cout, 3)
        self.add = shortcut and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """Split in two, chain ``n`` bottlenecks on one half, concatenate every intermediate."""

    def __init__(
        self, cin: int, cout: int, n: int = 1, shortcut: bool = False, expansion: float = 0.5
    ) -> None:
        super().__init__()
        self.c = int(cout * expansion)
        self.cv1 = conv_silu(cin, 2 * self.c, 1)
        self.cv2 = conv_silu((2 + n) * self.c, cout, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut, expansion=1.0) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ys = list(self.cv1(x).chunk(2, 1))
        for block in self.m:
            ys.append(block(ys[-1]))
        return self.cv2(torch.cat(ys, 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling by three chained max-pools of size ``k`` (receptive 5/9/13)."""

    def __init__(self, cin: int, cout: int, k: int = 5) -> None:
        super().__init__()
        hidden = cin // 2
        self.cv1 = conv_silu(cin, hidden, 1)
        self.cv2 = conv_silu(hidden * 4, cout, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ys = [self.cv1(x)]
        for _ in range(3):
            ys.append(self.m(ys[-1]))
        return self.cv2(torch.cat(ys, 1))
