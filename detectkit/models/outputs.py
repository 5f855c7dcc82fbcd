"""What detectors hand to the loss (train mode) and to post-processing (eval mode)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class HeadOutput(NamedTuple):
    """Raw head tensors, the train-mode output of every detector.

    ``cls_logits [B,A,C]`` (pre-sigmoid), ``reg_distri [B,A,4*bins]`` (side-major l,t,r,b DFL
    logits), ``anchor_points [A,2]`` pixel centres, ``stride_tensor [A,1]``, ``bins`` per side
    (17 for YOLO-NAS, 16 for YOLO-World), ``feats`` the neck outputs (for distillation).
    """

    cls_logits: torch.Tensor
    reg_distri: torch.Tensor
    anchor_points: torch.Tensor
    stride_tensor: torch.Tensor
    bins: int
    feats: tuple[torch.Tensor, ...] = ()
