"""What other packages register with ``checkpoint``: readers of foreign formats (each model
family: super-gradients, ultralytics) and architecture ops replayed from a record (compress:
pruned widths, quantizers). ``checkpoint`` imports none of them; it looks registrations up here.

Registration happens when the owning package is imported. :data:`PROVIDERS` names those
packages: a lookup imports them first (plugin discovery, as ``registry`` imports the families
to run their ``@register_model``), so every entry point sees every reader and op.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from detectkit.checkpoint.errors import CheckpointError

__all__ = ["ForeignReader", "register_reader", "readers", "register_architecture_op", "replay_architecture", "PROVIDERS"]

#: packages whose import registers readers / architecture ops (discovered on first lookup)
PROVIDERS: tuple[str, ...] = ("detectkit.models", "detectkit.compress")

#: ``read(obj, path, num_classes, name) -> model`` (a built detector, weights loaded, train mode)
ReadFn = Callable[[Any, Any, "int | None", "str | None"], nn.Module]
#: ``replay(model, op) -> model`` (quantization may return a converted module)
ReplayFn = Callable[[nn.Module, Mapping[str, Any]], nn.Module]


@dataclass(frozen=True)
class ForeignReader:
    """A family's reader of a foreign checkpoint format: ``detect`` says whether an already-read
    object is in that format, ``read`` builds the detector from it. ``prefix`` is the family's
    registry prefix (a ``model=`` name from another family skips this reader)."""

    family: str
    prefix: str
    detect: Callable[[Any], bool]
    read: ReadFn


_READERS: dict[str, ForeignReader] = {}
_OPS: dict[str, ReplayFn] = {}
_discovered = False


def _discover() -> None:
    global _discovered
    if not _discovered:
        _discovered = True
        for name in PROVIDERS:
            importlib.import_module(name)


def register_reader(reader: ForeignReader) -> ForeignReader:
    """Register (or replace, on re-import) the reader of one family's foreign format."""
    _READERS[reader.family] = reader
    return reader


def readers() -> list[ForeignReader]:
    """The registered foreign readers, in registration order."""
    _discover()
    return list(_READERS.values())


def register_architecture_op(name: str, replay: ReplayFn) -> ReplayFn:
    """Register how a recorded architecture op (``{"op": name, ...}``) is rebuilt on a fresh model."""
    _OPS[name] = replay
    return replay


def replay_architecture(model: nn.Module, ops: Iterable[Mapping[str, Any]]) -> nn.Module:
    """Rebuild recorded architecture changes on a freshly built model, in order (weights not
    loaded). Returns the model to use (quantization may return a converted module)."""
    for op in ops:
        kind = op.get("op")
        if kind not in _OPS:
            _discover()
        if kind not in _OPS:
            raise CheckpointError(f"unknown architecture op {kind!r} in the checkpoint record")
        model = _OPS[kind](model, op)
    return model
