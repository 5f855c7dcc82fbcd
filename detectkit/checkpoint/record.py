"""The self-describing record every detectkit checkpoint carries (``checkpoint["detectkit"]``).

Registry name and kwargs, classes, the architecture ops (pruning, quantization) replayed on load,
inference defaults, dataset category ids, and a ``content_sha256`` over everything else in the
file (:func:`content_digest`), checked on read. The model side of the record is declared by
:class:`RecordedModel` (``detectkit.models.base.Detector`` implements it): this module reads and
writes plain data and imports no model.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn

import detectkit
from detectkit import limits
from detectkit.checkpoint.errors import CheckpointError
from detectkit.registry import name_of

__all__ = [
    "RECORD_KEY", "FORMAT_VERSION", "DIGEST_KEY", "ArchitectureRecorder", "RecordedModel", "content_digest",
    "seal", "verify", "check_record", "build_record", "is_detectkit_checkpoint", "is_lightning", "architecture_from_callback_states",
]

RECORD_KEY = "detectkit"
FORMAT_VERSION = 1
DIGEST_KEY = "content_sha256"
_LIGHTNING_KEY = "pytorch-lightning_version"
# builder arguments that fetch or load weights: never replayed when rebuilding from a record
# (and the text encoder: a YOLO-World vocabulary is in the weights as ``txt_feats``)
WEIGHT_KWARGS = ("checkpoint", "pretrained", "download", "text_encoder")


@runtime_checkable
class ArchitectureRecorder(Protocol):
    """What owns a detector's architecture ops (``DetectionModule``): compression callbacks append
    an op after they change the architecture; the op list is saved in the checkpoint record and
    replayed (in order, on a freshly built model) before the weights load."""

    architecture: list[dict[str, Any]]

    def record_architecture(self, op: dict[str, Any]) -> None: ...



@runtime_checkable
class RecordedModel(Protocol):
    """What a detector declares for its record: the name and arguments it was built with, and the
    hook that applies a record's classes and inference defaults after its weights loaded."""

    registry_name: str | None
    registry_kwargs: dict[str, Any]

    def apply_record(self, record: Mapping[str, Any] | None) -> None: ...



def content_digest(checkpoint: Mapping[str, Any]) -> str:
    """sha256 over every tensor (key path, dtype, shape, bytes) and every other value of the
    checkpoint, except the digest field itself. Deterministic across save/load: mappings in
    insertion order, sets sorted; opaque objects count by type name and attributes."""
    h = hashlib.sha256()

    def feed(*parts: bytes) -> None:
        for p in parts:
            h.update(len(p).to_bytes(8, "little"))
            h.update(p)

    def walk(key: str, v: Any) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach()
            feed(b"T", key.encode(), str(t.dtype).encode(), repr(tuple(t.shape)).encode())
            if t.layout != torch.strided or t.is_quantized:
                feed(repr(t).encode())
                return
            flat = t.to("cpu").contiguous().reshape(-1)
            if flat.numel():
                h.update(memoryview(flat.view(torch.uint8).numpy()))
        elif isinstance(v, Mapping):
            feed(b"D", key.encode(), str(len(v)).encode())
            for k, item in v.items():
                sub = f"{key}/{k!r}"
                if sub != f"/{RECORD_KEY!r}/{DIGEST_KEY!r}":
                    walk(sub, item)
        elif isinstance(v, (list, tuple)):
            feed(b"L", key.encode(), str(len(v)).encode())
            for i, item in enumerate(v):
                walk(f"{key}[{i}]", item)
        elif isinstance(v, (set, frozenset)):
            feed(b"S", key.encode(), repr(sorted(repr(x) for x in v)).encode())
        elif v is None or isinstance(v, (bool, int, float, complex, str, bytes, torch.dtype, torch.device, slice)):
            feed(b"V", key.encode(), type(v).__name__.encode(), repr(v).encode())
        else:  # objects (Namespace, inert stand-ins): their attributes, by value
            feed(b"O", key.encode(), type(v).__name__.encode())
            attrs = getattr(v, "__dict__", None)
            if isinstance(attrs, dict):
                walk(f"{key}.__dict__", {k: a for k, a in attrs.items() if k != "_args"})

    walk("", checkpoint)
    return h.hexdigest()


def seal(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """(Re)write the record's ``content_sha256`` for the checkpoint as it is now."""
    record = checkpoint.get(RECORD_KEY)
    if isinstance(record, dict):
        record[DIGEST_KEY] = content_digest(checkpoint)
    return checkpoint


# records verified since they were read (by identity, in memory only: a flag in the file could be
# forged): a checkpoint read by AtomicCheckpointIO is not hashed a second time by the module hook
_verified: OrderedDict[int, Mapping[str, Any]] = OrderedDict()


def verify(checkpoint: Any, path: str | os.PathLike | None = None) -> None:
    """Check the recorded content hash; files without a record (older or foreign) pass."""
    if not isinstance(checkpoint, Mapping):
        return
    record = checkpoint.get(RECORD_KEY)
    if not isinstance(record, Mapping) or not record.get(DIGEST_KEY):
        return
    if _verified.get(id(record)) is record:
        return
    expected = record[DIGEST_KEY]
    actual = content_digest(checkpoint)
    if actual != expected:
        raise CheckpointError(
            f"{path or 'checkpoint'}: content hash mismatch: the file was modified or corrupted after it was "
            f"written (recorded {str(expected)[:16]}..., computed {actual[:16]}...)"
        )
    _verified[id(record)] = record
    while len(_verified) > 8:
        _verified.popitem(last=False)




def _count(value: Any, field: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
        raise CheckpointError(f"{where}: checkpoint record {field} {value!r} is not a non-negative whole number")
    return int(value)


def _check_sizes(fields: Mapping[str, Any], what: str, where: str) -> None:
    """``num_classes`` / ``class_names`` of a record, a record's ``model_kwargs`` or old hyper-parameters."""
    if fields.get("num_classes") is not None:
        limits.check(f"{what} num_classes", _count(fields["num_classes"], "num_classes", where), "max_classes", where)
    names = fields.get("class_names")
    if names is not None:
        if not isinstance(names, (list, tuple)):
            raise CheckpointError(f"{where}: {what} class_names is a {type(names).__name__}, not a list of names")
        limits.check(f"{what} class_names count", len(names), "max_class_names", where)


def _check_inference(inference: Any, where: str) -> None:
    if not isinstance(inference, Mapping):
        return
    size = inference.get("image_size")
    sides = [size] if not isinstance(size, (list, tuple)) else list(size)
    if size is not None:
        sides = [_count(s, "inference.image_size", where) for s in sides[:2]]
        for side in sides:
            limits.check("checkpoint record inference.image_size", side, "max_image_size", where)
        limits.check("checkpoint record inference.image_size pixels", sides[0] * sides[-1], "max_pixels", where)
    if inference.get("longest") is not None:
        longest = _count(inference["longest"], "inference.longest", where)
        limits.check("checkpoint record inference.longest", longest, "max_image_size", where)


_FILE_SUFFIXES = (".yaml", ".yml", ".json", ".pt", ".pth", ".ckpt", ".safetensors", ".npy", ".npz", ".pkl")


def _names_file(text: str) -> bool:
    return (text.startswith(("/", "~", "..", "file:")) or "\\" in text or text.lower().endswith(_FILE_SUFFIXES)
            or os.path.lexists(text))


def _check_builder_args(kwargs: Any, where: str, *, weights_allowed: bool = False) -> None:
    """A record carries its architecture as data: builder arguments that would read a file or fetch
    weights (``arch: /any/file.yaml``, ``checkpoint``, ``pretrained``) are refused, never followed.
    (Older hyper-parameters may name weights: their loader drops those arguments.)"""
    if not isinstance(kwargs, Mapping):
        raise CheckpointError(f"{where}: checkpoint record model_kwargs is a {type(kwargs).__name__}, not a mapping")
    for key, value in kwargs.items():
        if key in WEIGHT_KWARGS:
            if weights_allowed:
                continue
            raise CheckpointError(f"{where}: checkpoint record model_kwargs.{key} is refused: a record never "
                                  "names weights to read or fetch")
        if isinstance(value, (str, os.PathLike)) and _names_file(os.fspath(value)):
            raise CheckpointError(f"{where}: checkpoint record model_kwargs.{key} names a file ({os.fspath(value)!r}); "
                                  "a record carries the architecture itself and is never followed to a path")
    _check_sizes(kwargs, "checkpoint record model_kwargs", where)


def check_record(checkpoint: Any, path: str | os.PathLike | None = None) -> None:
    """Refuse a checkpoint whose record (or older hyper-parameters) declares sizes over
    :mod:`detectkit.limits`, or names a file to read, before anything is allocated from it; and one
    nested deeper than ``max_json_depth`` (the hash walk and the loaders recurse)."""
    where = str(path or "checkpoint")
    depth = limits.nesting_depth(checkpoint, stop=limits.current().max_json_depth)
    limits.check("checkpoint nesting depth", depth, "max_json_depth", where)
    if not isinstance(checkpoint, Mapping):
        return
    record = checkpoint.get(RECORD_KEY)
    if isinstance(record, Mapping):
        _check_sizes(record, "checkpoint record", where)
        _check_inference(record.get("inference"), where)
        _check_builder_args(record.get("model_kwargs") or {}, where)
    hp = checkpoint.get("hyper_parameters")
    if isinstance(hp, Mapping):
        _check_sizes(hp, "checkpoint hyper_parameters", where)
        if not isinstance(record, Mapping) and isinstance(hp.get("model_kwargs"), Mapping):
            # only a checkpoint without a record is rebuilt from its hyper-parameters (the fit's own
            # arguments, which may name the YAML the run started from)
            _check_builder_args(hp["model_kwargs"], where, weights_allowed=True)


def build_record(
    model: nn.Module,
    *,
    name: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    class_names: Iterable[str] | None = None,
    category_ids: Iterable[int] | None = None,
    architecture: Iterable[Mapping[str, Any]] = (),
    inference: Any | None = None,
) -> dict[str, Any]:
    """The ``checkpoint["detectkit"]`` record for ``model`` (digest added by :func:`seal`)."""

    inference = inference if inference is not None else getattr(model, "inference", None)
    names = list(class_names) if class_names is not None else list(getattr(model, "class_names", []) or [])
    cats = category_ids if category_ids is not None else getattr(model, "category_ids", None)
    if model_kwargs is None:
        model_kwargs = getattr(model, "registry_kwargs", None)
    kwargs = {k: v for k, v in dict(model_kwargs or {}).items() if k not in WEIGHT_KWARGS and k != "num_classes"}
    return {
        "format_version": FORMAT_VERSION,
        "detectkit_version": detectkit.__version__,
        "model": name or name_of(model),
        "model_kwargs": kwargs,
        "num_classes": int(getattr(model, "num_classes", len(names))),
        "class_names": [str(n) for n in names],
        "architecture": [dict(op) for op in architecture],
        "inference": inference.to_dict() if hasattr(inference, "to_dict") else dict(inference or {}),
        "category_ids": [int(c) for c in cats] if cats is not None else None,
        DIGEST_KEY: "",
    }



def architecture_from_callback_states(states: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Architecture ops of a checkpoint written before the record existed (the pruning and QAT
    callbacks' saved states): pruned shapes first, then quantizers."""
    ops: list[dict[str, Any]] = []
    for key, state in (states or {}).items():
        if str(key).startswith("StructuredPruning") and isinstance(state, Mapping) and state.get("shapes"):
            ops.append({"op": "prune", "shapes": state["shapes"], "fused": state.get("fused", True)})
    for key, state in (states or {}).items():
        if str(key).startswith("QuantizationAwareTraining") and isinstance(state, Mapping) and state.get("quantized"):
            ops.append({"op": "quantize", **{k: state[k] for k in ("modelopt_state", "partial_fused", "skip_layers") if k in state}})
    return ops




def is_lightning(obj: Any) -> bool:
    """A Lightning ``.ckpt`` (its ``state_dict`` holds the module's weights under ``model.``)."""
    return isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping) and _LIGHTNING_KEY in obj


def is_detectkit_checkpoint(obj: Any) -> bool:
    """A detectkit ``.ckpt`` (with or without a record) or a detectkit weights file."""
    return (isinstance(obj, Mapping) and isinstance(obj.get(RECORD_KEY), Mapping) and "state_dict" in obj) or is_lightning(obj)
