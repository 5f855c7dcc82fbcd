"""Distribution Focal Loss integral: one decoder for both families.

YOLO-NAS (super-gradients) predicts 17 bins per side (``reg_max=16`` counts intervals);
YOLO-World (ultralytics) predicts 16 bins (``reg_max=16`` counts bins). Here ``bins`` is the
number of bins, so there is no off-by-one to remember.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class DFL(nn.Module):
    """Expected distance per side from side-major logits ``[..., 4*bins]`` -> ``[..., 4]``."""

    def __init__(self, bins: int) -> None:
        super().__init__()
        self.bins = bins
        self.register_buffer("project", torch.arange(bins, dtype=torch.float32), persistent=False)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        shape = logits.shape[:-1]
        prob = logits.reshape(*shape, 4, self.bins).softmax(dim=-1)
        return prob.matmul(self.project.to(prob.dtype))
