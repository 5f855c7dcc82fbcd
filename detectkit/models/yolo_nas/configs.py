"""YOLO-NAS S/M/L widths and depths (super-gradients ``yolo_nas_{s,m,l}_arch_params.yaml``, v3.7.1),
and any other point of that space (``detectkit nas``): a config <-> plain dict / YAML round trip."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

#: block types a CSP stage can stack: QARepVGG (3x3 + 1x1 + identity, fusable) or a plain 3x3 Conv-BN-ReLU
BLOCK_TYPES = ("qarepvgg", "conv")
#: the block YOLO-NAS uses at each position: backbone stages and up (top-down) neck stages use
#: QARepVGG, down (bottom-up) neck stages plain 3x3 convs. ``None`` in a StageCfg means this.
DEFAULT_STAGE_BLOCKS = ("qarepvgg", "qarepvgg", "qarepvgg", "qarepvgg")
DEFAULT_NECK_BLOCKS = ("qarepvgg", "qarepvgg", "conv", "conv")


@dataclass(frozen=True)
class StageCfg:
    out_channels: int
    num_blocks: int
    hidden_channels: int
    concat_intermediates: bool = False
    block: str | None = None  # one of BLOCK_TYPES; None: the position's YOLO-NAS default

    def __post_init__(self) -> None:
        if self.block is not None and self.block not in BLOCK_TYPES:
            raise ValueError(f"stage block must be one of {BLOCK_TYPES}, got {self.block!r}")
        for name in ("out_channels", "num_blocks", "hidden_channels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"stage {name} must be >= 1, got {getattr(self, name)}")


def _with_blocks(stages: tuple[StageCfg, ...], defaults: tuple[str, ...]) -> tuple[StageCfg, ...]:
    return tuple(s if s.block is not None else replace(s, block=d) for s, d in zip(stages, defaults))


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

    def __post_init__(self) -> None:
        # Blocks resolved here so that a config equals its own dict round trip.
        if len(self.stages) != 4 or len(self.neck) != 4 or len(self.head_channels) != 3:
            raise ValueError("YoloNASConfig needs 4 backbone stages, 4 neck stages and 3 head widths")
        object.__setattr__(self, "stages", _with_blocks(tuple(self.stages), DEFAULT_STAGE_BLOCKS))
        object.__setattr__(self, "neck", _with_blocks(tuple(self.neck), DEFAULT_NECK_BLOCKS))
        object.__setattr__(self, "head_channels", tuple(int(c) for c in self.head_channels))
        object.__setattr__(self, "spp_kernels", tuple(int(k) for k in self.spp_kernels))
        for i, n in enumerate(self.neck[2:], start=3):
            if n.out_channels % 2:
                raise ValueError(f"neck{i} out_channels must be even (its stride-2 conv has half), got {n.out_channels}")

    # ---- plain data (checkpoint records, YAML) ---------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain lists/ints/strings: what a checkpoint record and an architecture YAML hold."""

        def stage(s: StageCfg) -> dict[str, Any]:
            return {f.name: getattr(s, f.name) for f in fields(StageCfg)}

        return {
            "stem_channels": int(self.stem_channels),
            "stages": [stage(s) for s in self.stages],
            "spp_channels": int(self.spp_channels),
            "neck": [stage(s) for s in self.neck],
            "head_channels": list(self.head_channels),
            "spp_kernels": list(self.spp_kernels),
            "reg_max": int(self.reg_max),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "architecture") -> YoloNASConfig:
        """Inverse of :meth:`to_dict`; unknown or missing keys are a ValueError naming ``source``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}; allowed: {sorted(known)}")
        try:
            def stages(key: str) -> tuple[StageCfg, ...]:
                items = data[key]
                if not isinstance(items, (list, tuple)) or len(items) != 4:
                    raise ValueError(f"{key} must be a list of 4 stages")
                out = []
                for s in items:
                    extra = sorted(set(s) - {f.name for f in fields(StageCfg)})
                    if extra:
                        raise ValueError(f"{key}: unknown stage keys {extra}")
                    out.append(StageCfg(int(s["out_channels"]), int(s["num_blocks"]), int(s["hidden_channels"]),
                                        bool(s.get("concat_intermediates", False)), s.get("block")))
                return tuple(out)

            kw: dict[str, Any] = {
                "stem_channels": int(data["stem_channels"]),
                "stages": stages("stages"),
                "spp_channels": int(data["spp_channels"]),
                "neck": stages("neck"),
                "head_channels": tuple(int(c) for c in data["head_channels"]),
            }
            if "spp_kernels" in data:
                kw["spp_kernels"] = tuple(int(k) for k in data["spp_kernels"])
            if "reg_max" in data:
                kw["reg_max"] = int(data["reg_max"])
            return cls(**kw)
        except KeyError as e:
            raise ValueError(f"{source}: missing key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        """The architecture as YAML text (written to ``path`` when given)."""
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml_text(cls, text: str, source: str = "architecture") -> YoloNASConfig:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{source}: not valid YAML ({e})") from None
        if isinstance(data, Mapping) and "arch" in data and "stem_channels" not in data:
            data = data["arch"]  # a recipe's model_kwargs may nest it
        return cls.from_dict(data, source=source)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> YoloNASConfig:
        """Read an architecture YAML (``safe_load``); a missing/unparsable file is a ValueError naming it."""
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"{p}: architecture file not found")
        return cls.from_yaml_text(p.read_text(), source=str(p))


def resolve_config(arch: YoloNASConfig | Mapping[str, Any] | str | os.PathLike) -> YoloNASConfig:
    """A config from a config, a dict, a registered variant name (``yolo_nas_s``) or a YAML path."""
    if isinstance(arch, YoloNASConfig):
        return arch
    if isinstance(arch, Mapping):
        return YoloNASConfig.from_dict(arch)
    if isinstance(arch, str) and arch in CONFIGS:
        return CONFIGS[arch]
    if isinstance(arch, (str, os.PathLike)):
        return YoloNASConfig.from_yaml(arch)
    raise ValueError(f"arch must be a dict, a YAML path or one of {sorted(CONFIGS)}, got {type(arch).__name__}")


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
