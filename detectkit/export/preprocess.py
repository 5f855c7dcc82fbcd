"""Preprocessing embedded in exported graphs: raw uint8 camera frames in, model input out.

Deployed pipelines hand over ``uint8`` images (often NHWC, often BGR from OpenCV). Doing the
cast, ``/255``, layout and channel order inside the graph keeps one definition of the model's
input contract (``float RGB NCHW in [0, 1]``) instead of one per client.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["ImagePreprocess", "WithPreprocess"]


class ImagePreprocess(nn.Module):
    """``uint8`` ``NHWC``/``NCHW`` ``RGB``/``BGR`` -> ``float32`` ``RGB NCHW`` in ``[0, 1]``."""

    def __init__(self, layout: str = "nchw", channel_order: str = "rgb") -> None:
        super().__init__()
        layout, channel_order = layout.lower(), channel_order.lower()
        if layout not in ("nchw", "nhwc"):
            raise ValueError(f"layout must be 'nchw' or 'nhwc', got {layout!r}")
        if channel_order not in ("rgb", "bgr"):
            raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
        self.layout, self.channel_order = layout, channel_order

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if self.layout == "nhwc":
            x = x.permute(0, 3, 1, 2)
        if self.channel_order == "bgr":
            x = x.flip(1)  # BGR -> RGB (exports as a Slice with step -1)
        return x * (1.0 / 255.0)

    def input_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Shape of a raw input batch in this layout."""
        return (batch, height, width, 3) if self.layout == "nhwc" else (batch, 3, height, width)

    def extra_repr(self) -> str:
        return f"layout={self.layout}, channel_order={self.channel_order}, dtype=uint8"


class WithPreprocess(nn.Module):
    """``model(preprocess(images))``: any eval-mode detector (or NMS wrapper) behind uint8 input."""

    def __init__(self, model: nn.Module, preprocess: ImagePreprocess) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.model = model

    def forward(self, images: torch.Tensor):
        return self.model(self.preprocess(images))
