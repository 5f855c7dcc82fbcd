"""Checkpoint files: safe reading, the self-describing record, verification, sealing, atomic
writing and the one loader. Pure I/O: this package imports no model family and no compress
module; families register their foreign-format readers and compress its architecture ops in
:mod:`detectkit.checkpoint.hooks`.

* :mod:`~detectkit.checkpoint.safe`: ``read_checkpoint`` (weights_only or the restricted unpickler);
* :mod:`~detectkit.checkpoint.record`: the ``checkpoint["detectkit"]`` record, content hash, seal, verify;
* :mod:`~detectkit.checkpoint.write`: ``atomic_save``;
* :mod:`~detectkit.checkpoint.hooks`: what families and compress register;
* :mod:`~detectkit.checkpoint.loader`: ``load`` / ``load_state`` / ``create_model`` / ``save_weights``;
* :mod:`~detectkit.checkpoint.lightning_io`: ``AtomicCheckpointIO`` (imports Lightning, so not
  imported here: ``detectkit.checkpoint.AtomicCheckpointIO`` loads it on first use).
"""

from __future__ import annotations

from typing import Any

from detectkit.checkpoint.errors import CheckpointError, DiskFullError, RefusedPickleError
from detectkit.checkpoint.hooks import (
    ForeignReader,
    register_architecture_op,
    register_reader,
    replay_architecture,
)
from detectkit.checkpoint.loader import (
    create_model,
    load,
    load_state,
    load_strict,
    match_variant,
    save_weights,
    strip_prefix,
)
from detectkit.checkpoint.record import (
    DIGEST_KEY,
    FORMAT_VERSION,
    RECORD_KEY,
    ArchitectureRecorder,
    RecordedModel,
    architecture_from_callback_states,
    build_record,
    content_digest,
    is_detectkit_checkpoint,
    seal,
    verify,
)
from detectkit.checkpoint.safe import Inert, RestrictedUnpickler, read_checkpoint
from detectkit.checkpoint.write import atomic_save

__all__ = [
    "CheckpointError", "RefusedPickleError", "DiskFullError", "ArchitectureRecorder", "RecordedModel",
    "RECORD_KEY", "FORMAT_VERSION", "DIGEST_KEY", "read_checkpoint", "content_digest", "seal", "verify",
    "build_record", "replay_architecture", "architecture_from_callback_states", "load", "load_state",
    "create_model", "is_detectkit_checkpoint", "save_weights", "atomic_save", "RestrictedUnpickler", "Inert",
    "ForeignReader", "register_reader", "register_architecture_op", "load_strict", "match_variant",
    "strip_prefix", "AtomicCheckpointIO",
]


def __getattr__(name: str) -> Any:
    if name == "AtomicCheckpointIO":  # Lightning: only when asked for
        from detectkit.checkpoint.lightning_io import AtomicCheckpointIO

        return AtomicCheckpointIO
    raise AttributeError(f"module 'detectkit.checkpoint' has no attribute {name!r}")
