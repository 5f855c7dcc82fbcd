"""YOLO-NAS PAN neck with a C2 skip: two up stages (top-down) and two down stages (bottom-up)."""

from __future__ import annotations

import torch
import torch.nn as nn

from detectkit.models.yolo_nas.backbone import block_factory
from detectkit.models.yolo_nas.configs import StageCfg
from detectkit.nn.conv import ConvBNAct
from detectkit.nn.csp import CSPLayer


class YoloNASUpStage(nn.Module):
    """Top-down stage fusing three scales: the coarser map (upsampled), a same-scale skip and a
    finer skip brought down by a stride-2 conv; returns ``(lateral, fused)``.

    Only the ``reduce_channels=True`` form that every YOLO-NAS variant uses is implemented.
    """

    def __init__(self, in_channels: int, skip1_channels: int, skip2_channels: int, cfg: StageCfg) -> None:
        super().__init__()
        c = cfg.out_channels
        self.reduce_skip1 = ConvBNAct(skip1_channels, c, 1)
        self.reduce_skip2 = ConvBNAct(skip2_channels, c, 1)
        self.conv = ConvBNAct(in_channels, c, 1)
        self.upsample = nn.ConvTranspose2d(c, c, kernel_size=2, stride=2)
        self.downsample = ConvBNAct(c, c, 3, 2)
        self.reduce_after_concat = ConvBNAct(3 * c, c, 1)
        self.blocks = CSPLayer(
            c, c, cfg.num_blocks, block_factory(cfg.block, "qarepvgg"),
            cfg.hidden_channels, cfg.concat_intermediates,
        )

    def forward(self, x: torch.Tensor, skip1: torch.Tensor, skip2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip1 = self.reduce_skip1(skip1)
        skip2 = self.downsample(self.reduce_skip2(skip2))
        lateral = self.conv(x)
        y = torch.cat([self.upsample(lateral), skip1, skip2], dim=1)
        return lateral, self.blocks(self.reduce_after_concat(y))


class YoloNASDownStage(nn.Module):
    """Bottom-up stage: stride-2 conv, concat with the lateral of the matching up stage, CSP of 3x3 convs."""

    def __init__(self, in_channels: int, skip_channels: int, cfg: StageCfg) -> None:
        super().__init__()
        c = cfg.out_channels
        self.conv = ConvBNAct(in_channels, c // 2, 3, 2)
        self.blocks = CSPLayer(
            c // 2 + skip_channels, c, cfg.num_blocks, block_factory(cfg.block, "conv"),
            cfg.hidden_channels, cfg.concat_intermediates,
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.blocks(torch.cat([self.conv(x), skip], dim=1))


class YoloNASPANNeck(nn.Module):
    """``[c2, c3, c4, c5] -> (p3, p4, p5)`` at strides 8, 16, 32."""

    def __init__(self, in_channels: list[int], cfg: tuple[StageCfg, StageCfg, StageCfg, StageCfg]) -> None:
        super().__init__()
        c2, c3, c4, c5 = in_channels
        n1, n2, n3, n4 = cfg
        self.neck1 = YoloNASUpStage(c5, c4, c3, n1)
        self.neck2 = YoloNASUpStage(n1.out_channels, c3, c2, n2)
        self.neck3 = YoloNASDownStage(n2.out_channels, n2.out_channels, n3)
        self.neck4 = YoloNASDownStage(n3.out_channels, n1.out_channels, n4)
        self.out_channels = [n2.out_channels, n3.out_channels, n4.out_channels]

    def forward(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c2, c3, c4, c5 = feats
        lat1, x = self.neck1(c5, c4, c3)
        lat2, p3 = self.neck2(x, c3, c2)
        p4 = self.neck3(p3, lat2)
        p5 = self.neck4(p4, lat1)
        return p3, p4, p5
