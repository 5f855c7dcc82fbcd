"""YOLO-NAS S/M/L widths and depths (super-gradients ``yolo_nas_{s,m,l}_arch_params.yaml``, v3.7.1)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageCfg:
    out_channels: int
    num_blocks: int
    hidden_channels: int
    concat_intermediates: bool = False


@dataclass(frozen=True)
class YoloNASConfig:
    stem_channels: int
    stages: tuple[StageCfg, StageCfg, StageCfg, StageCfg]
    spp_channels: int
    # neck1, neck2 (up stages), neck3, neck4 (down stages)
    neck: tuple[StageCfg, StageCfg, StageCfg, StageCfg]
    # inner width of the three heads (already multiplied by the recipe's head width_mult)
    head_channels: tuple[int, int, int]
    spp_kernels: tuple[int, ...] = (5, 9, 13)
    reg_max: int = 16


S = StageCfg  # brevity in the tables below

CONFIGS: dict[str, YoloNASConfig] = {
    "yolo_nas_s": YoloNASConfig(
        stem_channels=48,
        stages=(S(96, 2, 32), S(192, 3, 64), S(384, 5, 96), S(768, 2, 192)),
        spp_channels=768,
        neck=(S(192, 2, 64), S(96, 2, 48), S(192, 2, 64), S(384, 2, 64)),
        head_channels=(64, 128, 256),  # 128/256/512 x 0.5
    ),
    "yolo_nas_m": YoloNASConfig(
        stem_channels=48,
        stages=(S(96, 2, 64, True), S(192, 3, 128, True), S(384, 5, 256, True), S(768, 2, 384)),
        spp_channels=768,
        neck=(S(192, 2, 192), S(96, 3, 64), S(192, 2, 192), S(384, 3, 256)),
        head_channels=(96, 192, 384),  # x 0.75
    ),
    "yolo_nas_l": YoloNASConfig(
        stem_channels=48,
        stages=(S(96, 2, 96, True), S(192, 3, 128, True), S(384, 5, 256, True), S(768, 2, 512, True)),
        spp_channels=768,
        neck=(S(192, 4, 128), S(96, 4, 128), S(192, 4, 128), S(384, 4, 256)),
        head_channels=(128, 256, 512),  # x 1.0
    ),
}
