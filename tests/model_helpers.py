"""Untrained models that behave like trained ones where a test compares detections."""

from __future__ import annotations

import torch


def spread_untrained_head(model: torch.nn.Module) -> torch.nn.Module:
    """Spread an untrained YOLO-NAS head so its detections differ in score, class and box (a fresh head
    scores every anchor alike, and a comparison of detections would compare nothing)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("cls_pred.bias"):
                p.normal_(-3.0, 1.5)
            elif name.endswith("reg_pred.weight"):
                p.mul_(0.1)
    return model
