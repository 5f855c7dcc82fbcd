"""YOLO-NAS decoupled DFL heads (super-gradients ``NDFLHeads`` / ``YoloNASDFLHead`` key layout)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from detectkit.nn.conv import ConvBNAct

#: classification bias so that initial scores are ~0.01 (focal-loss prior)
PRIOR_PROB = 0.01


class SeqConvBNAct(nn.Module):
    """ConvBNAct under an extra ``seq`` attribute: super-gradients' ``ConvBNReLU`` keys are
    ``*.seq.conv.weight`` / ``*.seq.bn.*``, so the head keeps that nesting to load by name."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.seq = ConvBNAct(in_channels, out_channels, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class YoloNASDFLHead(nn.Module):
    """1x1 stem, then separate 3x3 towers for classes and box distributions (``4 * bins`` logits)."""

    def __init__(self, in_channels: int, inter_channels: int, num_classes: int, bins: int) -> None:
        super().__init__()
        self.stem = SeqConvBNAct(in_channels, inter_channels, 1)
        self.cls_convs = nn.Sequential(SeqConvBNAct(inter_channels, inter_channels, 3))
        self.reg_convs = nn.Sequential(SeqConvBNAct(inter_channels, inter_channels, 3))
        self.cls_pred = nn.Conv2d(inter_channels, num_classes, 1)
        self.reg_pred = nn.Conv2d(inter_channels, 4 * bins, 1)
        self.reset_cls_bias()

    def reset_cls_bias(self) -> None:
        nn.init.constant_(self.cls_pred.bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        return self.cls_pred(self.cls_convs(x)), self.reg_pred(self.reg_convs(x))


class NDFLHeads(nn.Module):
    """One head per level (``head1``..``head3``); returns flattened ``cls [B,A,C]``, ``reg [B,A,4*bins]``
    in level-major, row-major anchor order."""

    def __init__(self, in_channels: list[int], inter_channels: tuple[int, ...], num_classes: int, bins: int) -> None:
        super().__init__()
        self.num_heads = len(in_channels)
        for i, (cin, cmid) in enumerate(zip(in_channels, inter_channels), start=1):
            setattr(self, f"head{i}", YoloNASDFLHead(cin, cmid, num_classes, bins))

    def forward(self, feats: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        cls_list, reg_list = [], []
        for i, f in enumerate(feats, start=1):
            cls, reg = getattr(self, f"head{i}")(f)
            cls_list.append(cls.flatten(2).permute(0, 2, 1))
            reg_list.append(reg.flatten(2).permute(0, 2, 1))
        return torch.cat(cls_list, dim=1), torch.cat(reg_list, dim=1)
