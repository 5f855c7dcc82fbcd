"""What other packages register with ``checkpoint``: readers of foreign formats (each model
family: super-gradients, ultralytics) and architecture ops replayed from a record (compress:
pruned widths, quantizers). ``checkpoint`` imports none of them; it looks registrations up here.

Registration happens when the owning package is imported: a lookup first runs
:func:`detectkit.registry.discover` (the packages named in ``registry.PLUGINS``), so every entry
point (``detectkit.load``, ``DetectionModule``, the CLI, serve) sees every reader and op.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from detectkit.checkpoint.errors import CheckpointError
from detectkit.registry import discover

__all__ = ["ForeignReader", "register_reader", "readers", "register_architecture_op", "replay_architecture"]

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


def register_reader(reader: ForeignReader) -> ForeignReader:
    """Register (or replace, on re-import) the reader of one family's foreign format."""
    _READERS[reader.family] = reader
    return reader


def readers() -> list[ForeignReader]:
    """The registered foreign readers, in registration order."""
    discover()
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
            discover()
        if kind not in _OPS:
            raise CheckpointError(f"unknown architecture op {kind!r} in the checkpoint record")
        model = _OPS[kind](model, op)
    return model
