"""YOLO-NAS backbone: QARepVGG stem -> 4 stages (QARepVGG downsample + CSP) -> SPP."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from detectkit.models.yolo_nas.configs import StageCfg, YoloNASConfig
from detectkit.nn.conv import ConvBNAct
from detectkit.nn.csp import BlockFactory, CSPLayer
from detectkit.nn.qarepvgg import QARepVGGBlock
from detectkit.nn.spp import SPP


def block_factory(block: str | None, default: str) -> BlockFactory:
    """The CSP bottleneck block of a stage: residual QARepVGG (fuses into one 3x3 conv) or a plain
    3x3 Conv-BN-ReLU (cheaper to train, same deployed cost)."""
    block = block or default
    if block == "qarepvgg":
        return partial(QARepVGGBlock, use_residual_connection=True)
    if block == "conv":
        return partial(ConvBNAct, kernel_size=3)
    raise ValueError(f"unknown block type {block!r}")


class YoloNASStem(nn.Module):
    """Stride-2 QARepVGG block (no identity branch); keys ``stem.conv.*``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = QARepVGGBlock(in_channels, out_channels, stride=2, use_residual_connection=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class YoloNASStage(nn.Module):
    """Stride-2 QARepVGG downsample, then a CSP layer of residual QARepVGG bottlenecks."""

    def __init__(self, in_channels: int, cfg: StageCfg) -> None:
        super().__init__()
        c = cfg.out_channels
        self.downsample = QARepVGGBlock(in_channels, c, stride=2, use_residual_connection=False)
        self.blocks = CSPLayer(
            c, c, cfg.num_blocks, block_factory(cfg.block, "qarepvgg"),
            cfg.hidden_channels, cfg.concat_intermediates,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class YoloNASBackbone(nn.Module):
    """Returns ``[c2, c3, c4, c5]`` at strides 4, 8, 16, 32 (stage1-3 and the SPP output)."""

    def __init__(self, cfg: YoloNASConfig, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = YoloNASStem(in_channels, cfg.stem_channels)
        prev = cfg.stem_channels
        for i, stage in enumerate(cfg.stages, start=1):
            setattr(self, f"stage{i}", YoloNASStage(prev, stage))
            prev = stage.out_channels
        self.context_module = SPP(prev, cfg.spp_channels, cfg.spp_kernels)
        self.out_channels = [s.out_channels for s in cfg.stages[:3]] + [cfg.spp_channels]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        c2 = self.stage1(x)
        c3 = self.stage2(c2)
        c4 = self.stage3(c3)
        c5 = self.context_module(self.stage4(c4))
        return [c2, c3, c4, c5]
