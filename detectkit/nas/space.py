"""The search space: per-position choices of the YOLO-NAS architecture, described in YAML.

```yaml
space:
  seeds: [yolo_nas_s, yolo_nas_m, yolo_nas_l]   # always points of the space (enqueued first)
  stem_channels: [32, 48]
  stages:                  # each field: one list for all 4 stages, or 4 lists (one per stage)
    out_channels: [[48, 96], [96, 192], [192, 384], [384, 768]]
    num_blocks: [1, 2, 3]
    hidden_channels: [[16, 32], [32, 64], [48, 96], [96, 192]]
    concat_intermediates: [false, true]
    block: [qarepvgg, conv]
  spp_channels: [384, 768]
  neck: {...same fields, 4 stages: neck1, neck2 (top-down), neck3, neck4 (bottom-up)}
  head_channels: [[32, 64], [64, 128], [128, 256]]   # one list per head
```

Every choice list is extended with the seeds' own values, so the seeds are always points of the
space and ``study.enqueue_trial(space.params_of(CONFIGS["yolo_nas_s"]))`` is always valid. A field
left out takes only the seeds' values; a scalar fixes it. Choices are sorted so that every worker
and every resumed run declares the same Optuna distributions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from detectkit.models.yolo_nas.configs import BLOCK_TYPES, CONFIGS, StageCfg, YoloNASConfig

STAGE_FIELDS = ("out_channels", "num_blocks", "hidden_channels", "concat_intermediates", "block")
TOP_KEYS = {"seeds", "stem_channels", "stages", "spp_channels", "neck", "head_channels"}


def _sort(values: set) -> list:
    return sorted(values, key=lambda v: (str(type(v)), v))


@dataclass
class SearchSpace:
    """Choices per parameter name (``stem_channels``, ``stage2.num_blocks``, ``neck4.block``,
    ``head1_channels``, ...) and the seed architectures."""

    choices: dict[str, list[Any]]
    seeds: dict[str, YoloNASConfig]

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, source: str = "space") -> SearchSpace:
        data = dict(data or {})
        unknown = sorted(set(data) - TOP_KEYS)
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}; allowed: {sorted(TOP_KEYS)}")
        seed_names = data.get("seeds", ["yolo_nas_s", "yolo_nas_m", "yolo_nas_l"]) or []
        seeds: dict[str, YoloNASConfig] = {}
        for s in seed_names:
            if isinstance(s, str) and s in CONFIGS:
                seeds[s] = CONFIGS[s]
            elif isinstance(s, Mapping):
                seeds[f"seed{len(seeds)}"] = YoloNASConfig.from_dict(s, source=f"{source}: seeds")
            else:
                raise ValueError(f"{source}: seed {s!r} is neither one of {sorted(CONFIGS)} nor an architecture dict")
        choices: dict[str, set] = {}

        def add(name: str, given: Any, per: int | None, field: str) -> None:
            if given is None:
                vals: list = []
            elif isinstance(given, (list, tuple)) and per is not None and given and all(isinstance(g, (list, tuple)) for g in given):
                if len(given) != 4 and field != "head_channels" or (field == "head_channels" and len(given) != 3):
                    raise ValueError(f"{source}: {field}: per-position lists must number {3 if field == 'head_channels' else 4}")
                vals = list(given[per])
            elif isinstance(given, (list, tuple)):
                vals = list(given)
            else:
                vals = [given]
            choices[name] = set(vals)

        add("stem_channels", data.get("stem_channels"), None, "stem_channels")
        add("spp_channels", data.get("spp_channels"), None, "spp_channels")
        for part, prefix in (("stages", "stage"), ("neck", "neck")):
            spec = data.get(part) or {}
            if not isinstance(spec, Mapping):
                raise ValueError(f"{source}: {part} must be a mapping of {list(STAGE_FIELDS)}")
            bad = sorted(set(spec) - set(STAGE_FIELDS))
            if bad:
                raise ValueError(f"{source}: {part}: unknown fields {bad}; allowed: {list(STAGE_FIELDS)}")
            for i in range(4):
                for f in STAGE_FIELDS:
                    add(f"{prefix}{i + 1}.{f}", spec.get(f), i, f"{part}.{f}")
        for i in range(3):
            add(f"head{i + 1}_channels", data.get("head_channels"), i, "head_channels")
        for cfg in seeds.values():  # seeds are always points of the space
            for k, v in cls.params_of(cfg).items():
                choices[k].add(v)
        empty = sorted(k for k, v in choices.items() if not v)
        if empty:
            raise ValueError(f"{source}: no choices (and no seed) for {empty}")
        for k, v in choices.items():
            if k.endswith(".block") and not v <= set(BLOCK_TYPES):
                raise ValueError(f"{source}: {k}: block must be in {BLOCK_TYPES}, got {sorted(v - set(BLOCK_TYPES))}")
            if k.endswith(".concat_intermediates") and not v <= {True, False}:
                raise ValueError(f"{source}: {k}: must be true/false")
            if not (k.endswith(".block") or k.endswith(".concat_intermediates")):
                if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v):
                    raise ValueError(f"{source}: {k}: choices must be positive integers, got {sorted(v, key=str)}")
        for i in (3, 4):
            odd = [c for c in choices[f"neck{i}.out_channels"] if c % 2]
            if odd:
                raise ValueError(f"{source}: neck{i}.out_channels must be even, got {odd}")
        return cls({k: _sort(v) for k, v in choices.items()}, seeds)

    # ---- points ----------------------------------------------------------------------------
    @staticmethod
    def params_of(cfg: YoloNASConfig) -> dict[str, Any]:
        """The flat parameter dict of an architecture (what Optuna stores for a trial)."""
        p: dict[str, Any] = {"stem_channels": cfg.stem_channels, "spp_channels": cfg.spp_channels}
        for prefix, stages in (("stage", cfg.stages), ("neck", cfg.neck)):
            for i, s in enumerate(stages, start=1):
                for f in STAGE_FIELDS:
                    p[f"{prefix}{i}.{f}"] = getattr(s, f)
        for i, c in enumerate(cfg.head_channels, start=1):
            p[f"head{i}_channels"] = c
        return p

    @staticmethod
    def config_of(params: Mapping[str, Any]) -> YoloNASConfig:
        """Inverse of :meth:`params_of`."""

        def stages(prefix: str) -> tuple[StageCfg, ...]:
            return tuple(StageCfg(*(params[f"{prefix}{i}.{f}"] for f in STAGE_FIELDS)) for i in range(1, 5))

        return YoloNASConfig(
            stem_channels=int(params["stem_channels"]), stages=stages("stage"), spp_channels=int(params["spp_channels"]),
            neck=stages("neck"), head_channels=tuple(int(params[f"head{i}_channels"]) for i in (1, 2, 3)),
        )

    def suggest(self, trial: Any) -> YoloNASConfig:
        """Sample an architecture with an Optuna trial (categorical per parameter)."""
        return self.config_of({k: trial.suggest_categorical(k, v) for k, v in self.choices.items()})

    def contains(self, cfg: YoloNASConfig) -> bool:
        return all(v in self.choices[k] for k, v in self.params_of(cfg).items())

    def seed_name(self, params: Mapping[str, Any]) -> str | None:
        """Which seed (``yolo_nas_s`` ...) these parameters are, if any."""
        return next((n for n, c in self.seeds.items() if self.params_of(c) == dict(params)), None)

    @property
    def size(self) -> int:
        """Number of distinct architectures."""
        n = 1
        for v in self.choices.values():
            n *= len(v)
        return n

    def to_dict(self) -> dict[str, Any]:
        """Resolved choices (seeds included), for the study's record."""
        return {"seeds": list(self.seeds), "choices": self.choices}


