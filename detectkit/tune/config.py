"""The typed config of ``detectkit tune`` and its search space.

A search space names hyperparameters from :data:`PARAMETERS` (each maps onto one key of a fit
recipe), each with a range or a list of choices:

```yaml
tune:
  study_name: quickstart_tune
  n_trials: 12
  space:
    lr: {low: 1.0e-4, high: 1.0e-2, log: true}   # a range (log scale)
    warmup_steps: {low: 0, high: 100}            # an integer range
    image_size: [96, 128, 160]                   # choices
    translate: 0.1                               # fixed (recipe value replaced, not searched)
    scale: null                                  # left out of the search (the recipe's value)
  pruner: {startup_trials: 3, warmup_epochs: 0}
```

The entries given replace the default space's entries of the same name (``default_space: false``
starts from nothing). On the command line the same in one word each: ``--space lr=1e-4:1e-2:log``,
``--space image_size=96,128``, ``--space translate=0.1``, ``--space scale=off``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from detectkit.errors import UserError, suggest

DEFAULT_STORAGE = "sqlite:///runs/tune/studies.db"


def _symmetric(s: float) -> list[float]:
    return [round(1.0 - s, 6), round(1.0 + s, 6)]


@dataclass(frozen=True)
class Parameter:
    """A tunable hyperparameter: the recipe key it sets, its type, its default search range (None:
    not searched unless the space names it) and how a sampled value becomes the recipe's value."""

    key: str
    kind: type
    default: Range | None
    help: str
    to_recipe: Callable[[Any], Any] | None = None

    def recipe_value(self, value: Any) -> Any:
        return self.to_recipe(value) if self.to_recipe is not None else value


@dataclass(frozen=True)
class Range:
    """A range ``[low, high]`` (``log``: sampled on a log scale) or a list of ``choices``."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None

    def suggest(self, trial: Any, name: str, kind: type) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(name, list(self.choices))
        if kind is int:
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(name, float(self.low), float(self.high), log=self.log)

    def to_dict(self) -> dict[str, Any]:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, "log": self.log}

    def __str__(self) -> str:
        if self.choices is not None:
            return ",".join(str(c) for c in self.choices)
        return f"{self.low}:{self.high}" + (":log" if self.log else "")


#: name -> what it sets. ``image_size`` has no fixed default: the default space takes the recipe's
#: size x 0.75 / 1 / 1.25 (multiples of 32).
PARAMETERS: dict[str, Parameter] = {
    "lr": Parameter("model.optim.lr", float, Range(1e-4, 1e-2, log=True), "peak learning rate"),
    "weight_decay": Parameter("model.optim.weight_decay", float, Range(1e-6, 1e-2, log=True), "weight decay"),
    "warmup_steps": Parameter("model.optim.warmup_steps", int, Range(0, 100), "linear warm-up, optimizer steps"),
    "final_lr_ratio": Parameter("model.optim.final_lr_ratio", float, None, "cosine end lr / lr"),
    "translate": Parameter("data.augment.translate", float, Range(0.0, 0.3), "random translation, fraction of size"),
    "scale": Parameter("data.augment.scale", float, Range(0.0, 0.5),
                       "random scale amplitude s: scale range [1-s, 1+s]", _symmetric),
    "degrees": Parameter("data.augment.degrees", float, None, "random rotation, degrees"),
    "shear": Parameter("data.augment.shear", float, None, "random shear, degrees"),
    "flip_prob": Parameter("data.augment.flip_prob", float, None, "horizontal flip probability"),
    "hsv_prob": Parameter("data.augment.hsv_prob", float, None, "colour jitter probability"),
    "mosaic_prob": Parameter("data.augment.mosaic_prob", float, None, "mosaic probability"),
    "mixup_prob": Parameter("data.augment.mixup_prob", float, None, "mixup probability"),
    "image_size": Parameter("data.image_size", int, None, "training/validation image size"),
}
OFF = ("off", "none", "null")


def default_image_sizes(size: int) -> tuple[int, ...]:
    """The recipe's image size and its neighbours at x0.75 and x1.25, multiples of 32 (at least 32)."""
    return tuple(sorted({max(32, int(round(size * f / 32)) * 32) for f in (0.75, 1.0, 1.25)}))


def _number(text: Any, name: str, source: str) -> float | int:
    if isinstance(text, bool):
        raise UserError(f"{source}: {name}: expected a number, got {text!r}")
    if isinstance(text, (int, float)):
        return text
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise UserError(f"{source}: {name}: expected a number, got {text!r}") from None


def parse_range(name: str, spec: Any, source: str = "space") -> Range | None:
    """One space entry as given in YAML or on the command line; None: left out of the search."""
    if name not in PARAMETERS:
        raise UserError(f"{source}: unknown parameter {name!r}.{suggest(name, list(PARAMETERS))} "
                        f"Known: {', '.join(PARAMETERS)}")
    kind = PARAMETERS[name].kind
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in OFF):
        return None
    if isinstance(spec, str):  # the command line's forms: low:high[:log], a,b,c, or one value
        text = spec.strip()
        if ":" in text:
            parts = text.split(":")
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
                raise UserError(f"{source}: {name}={text}: a range is LOW:HIGH or LOW:HIGH:log")
            spec = {"low": parts[0], "high": parts[1], "log": len(parts) == 3}
        else:
            spec = [p for p in text.split(",") if p.strip()]
    if isinstance(spec, Mapping):
        bad = sorted(set(spec) - {"low", "high", "log", "choices"})
        if bad:
            raise UserError(f"{source}: {name}: unknown keys {bad}; a range takes low, high, log (or choices)")
        if "choices" in spec:
            spec = spec["choices"]
        else:
            if "low" not in spec or "high" not in spec:
                raise UserError(f"{source}: {name}: a range needs low and high")
            low, high = _number(spec["low"], name, source), _number(spec["high"], name, source)
            log = bool(spec.get("log", False))
            if kind is int and (int(low) != low or int(high) != high):
                raise UserError(f"{source}: {name}: an integer parameter needs integer bounds, got {low}:{high}")
            if not low <= high:
                raise UserError(f"{source}: {name}: low {low} is above high {high}")
            if log and low <= 0:
                raise UserError(f"{source}: {name}: a log range needs low > 0, got {low}")
            return Range(kind(low), kind(high), log)
    values = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not values:
        raise UserError(f"{source}: {name}: no choices")
    values = [_number(v, name, source) for v in values]
    if kind is int and any(int(v) != v for v in values):
        raise UserError(f"{source}: {name}: choices must be integers, got {values}")
    return Range(choices=tuple(sorted({kind(v) for v in values})))


@dataclass
class PrunerConfig:
    """Optuna's MedianPruner: a trial whose best mAP so far is below the median of the complete
    trials' mAP at the same epoch stops, once ``startup_trials`` trials are complete and after
    ``warmup_epochs`` epochs."""

    startup_trials: int = 3
    warmup_epochs: int = 0

    def make(self):
        import optuna

        return optuna.pruners.MedianPruner(n_startup_trials=self.startup_trials, n_warmup_steps=self.warmup_epochs)


@dataclass
class TuneConfig:
    """``detectkit tune``: what the study searches and where it lives (a YAML ``tune:`` section and
    command line flags; see the module docstring)."""

    study_name: str = "tune"
    storage: str = DEFAULT_STORAGE
    #: the study's total (finished and running trials of all workers, all restarts)
    n_trials: int = 12
    timeout: float | None = None
    seed: int = 0
    default_space: bool = True
    #: name -> range, or None to leave a default entry out
    space: dict[str, Range | None] = field(default_factory=dict)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    #: per-trial budget: batches per epoch (None: the recipe's); epochs come from trainer.max_epochs
    train_batches: int | None = None
    val_batches: int | None = None
    output_dir: str | None = None
    heartbeat: dict[str, Any] = field(default_factory=lambda: {"interval": 10, "grace_period": 60, "max_retry": 2})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, source: str = "tune") -> TuneConfig:
        data = dict(data or {})
        known = sorted(cls.__dataclass_fields__)
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise UserError(f"{source}: unknown keys {unknown}.{suggest(unknown[0], known)} Allowed: {known}")
        space = data.get("space") or {}
        if not isinstance(space, Mapping):
            raise UserError(f"{source}: space must be a mapping of parameter name -> range or choices")
        data["space"] = {str(k): parse_range(str(k), v, f"{source}: space") for k, v in space.items()}
        pruner = data.get("pruner") or {}
        try:
            data["pruner"] = PrunerConfig(**pruner)
            cfg = cls(**data)
        except TypeError as e:
            raise UserError(f"{source}: {e}") from None
        cfg.check(source)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> TuneConfig:
        """A YAML file with a ``tune:`` section (or the section's keys at the top level)."""
        import yaml

        try:
            data = yaml.safe_load(open(path, encoding="utf-8").read()) or {}
        except FileNotFoundError:
            raise UserError(f"{path}: no such file") from None
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
        if not isinstance(data, Mapping):
            raise UserError(f"{path}: expected a mapping at the top level")
        return cls.from_dict(data.get("tune", data) if "tune" in data else data, source=str(path))

    def check(self, source: str = "tune") -> None:
        if not isinstance(self.n_trials, int) or self.n_trials < 1:
            raise UserError(f"{source}: n_trials must be an integer >= 1, got {self.n_trials!r}")
        for name in ("train_batches", "val_batches"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UserError(f"{source}: {name} must be an integer >= 1 (or null), got {value!r}")
        if self.pruner.startup_trials < 0 or self.pruner.warmup_epochs < 0:
            raise UserError(f"{source}: pruner.startup_trials and pruner.warmup_epochs must be >= 0")

    def resolved_space(self, image_size: int | None) -> dict[str, Range]:
        """The searched parameters (sorted by name, so every worker declares the same distributions):
        the default space (if on) updated by this config's entries."""
        space: dict[str, Range | None] = {}
        if self.default_space:
            space = {n: p.default for n, p in PARAMETERS.items() if p.default is not None}
            if image_size:
                space["image_size"] = Range(choices=default_image_sizes(int(image_size)))
        space.update(self.space)
        out = {k: v for k, v in sorted(space.items()) if v is not None}
        if not out:
            raise UserError("the search space is empty: name parameters with --space NAME=LOW:HIGH (or a tune: space:)")
        return out

    def record(self, space: Mapping[str, Range]) -> dict[str, Any]:
        """What the study keeps about itself: workers with another space are refused."""
        return {"space": {k: v.to_dict() for k, v in space.items()}, "pruner": asdict(self.pruner)}


def recipe_values(params: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's parameters as recipe keys and values (``scale`` 0.2 -> ``data.augment.scale [0.8, 1.2]``)."""
    return {PARAMETERS[k].key: PARAMETERS[k].recipe_value(v) for k, v in params.items() if k in PARAMETERS}
