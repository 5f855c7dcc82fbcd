"""Grouped settings: the one migration from the old flat constructor arguments.

Settings that belong together travel as one typed dataclass (``augment``, ``loader``, ``optim``,
``val_postprocess`` ...), so a recipe reads ``data.loader.batch_size`` instead of 31 loose
scalars. Python callers and checkpoints written before the grouping still pass the flat names
(``batch_size=8``, ``lr=1e-3``); :func:`regroup` puts each one where it moved, with one
deprecation line, and :func:`moved_key` lets the CLI name the new key for an old recipe.
This module imports nothing from detectkit, so every layer may use it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import asdict, fields, is_dataclass, replace
from typing import Any, TypeVar

__all__ = ["as_group", "group_dict", "moved_key", "regroup"]

T = TypeVar("T")

#: ``section -> {old flat name: new dotted place}`` filled by the classes that own the groups
_MOVED: dict[str, dict[str, str]] = {}


def as_group(value: T | Mapping[str, Any] | None, cls: type[T], where: str) -> T:
    """``value`` as a ``cls`` instance: ``None`` gives the defaults, a mapping (a checkpoint's
    hyper-parameters, a hand-written dict) is checked against ``cls``'s fields."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"{where}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(names))})")
        return cls(**dict(value))
    raise TypeError(f"{where}: expected {cls.__name__} or a mapping, got {type(value).__name__}")


def group_dict(value: Any) -> Any:
    """A group as plain data (what hyper-parameters and checkpoints store: no pickled classes)."""
    return asdict(value) if is_dataclass(value) and not isinstance(value, type) else value


def register_moves(section: str, moves: Mapping[str, str]) -> dict[str, str]:
    """Declare where ``section``'s old flat arguments went (``{"batch_size": "loader.batch_size"}``)."""
    _MOVED.setdefault(section, {}).update(moves)
    return dict(moves)


def moved_key(section: str, name: str) -> str | None:
    """The new dotted key of an old flat argument (``moved_key("data", "batch_size")`` ->
    ``"data.loader.batch_size"``), or ``None`` when ``name`` never was one."""
    new = _MOVED.get(section, {}).get(name)
    return f"{section}.{new}" if new else None


def regroup(owner: str, legacy: dict[str, Any], moves: Mapping[str, str], groups: dict[str, Any]) -> dict[str, Any]:
    """Apply old flat arguments ``legacy`` to the groups they moved into; returns the groups.

    ``legacy`` is emptied (so Lightning's ``save_hyperparameters`` does not see the flat names).
    A ``None`` group (an optional one, e.g. ``predict_postprocess``) receiving a value starts from
    its class defaults, given as ``groups[name] = (None, cls)``; ``None`` values are skipped
    (old checkpoints stored "not set" that way).
    """
    unknown = [k for k in legacy if k not in moves]
    if unknown:
        raise TypeError(f"{owner}() got an unexpected keyword argument {unknown[0]!r}")
    updates: dict[str, dict[str, Any]] = {}
    for key in list(legacy):
        value = legacy.pop(key)
        group, _, name = moves[key].partition(".")
        if value is not None:
            updates.setdefault(group, {})[name] = tuple(value) if isinstance(value, list) else value
    out = {}
    for group, current in groups.items():
        base = current
        if isinstance(current, tuple):  # (value or None, class)
            base = current[0] if current[0] is not None else (current[1]() if group in updates else None)
        out[group] = replace(base, **updates[group]) if group in updates else base
    if updates:
        moved = ", ".join(f"{k} -> {g}.{k2}" for g, kv in updates.items() for k2 in kv for k in [_old(moves, g, k2)])
        warnings.warn(f"{owner}: flat arguments are deprecated, pass the grouped config ({moved})", FutureWarning,
                      stacklevel=3)
    return out


def _old(moves: Mapping[str, str], group: str, name: str) -> str:
    return next(k for k, v in moves.items() if v == f"{group}.{name}")
