"""One loader: a detectkit ``.ckpt`` (EMA weights), a detectkit weights file (:func:`save_weights`),
or any foreign format a model family registered (super-gradients ``.pth``, ultralytics ``.pt``),
or a bare state dict -> a ready detector.

A detectkit file is rebuilt from its record: the registry builds the named model, the recorded
architecture ops are replayed (see :mod:`detectkit.checkpoint.hooks`), the weights load strictly
and the detector applies the record (``apply_record``: classes, inference defaults). Nothing here
imports Lightning, a model family or compress: loading a weights file must stay cheap.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from detectkit import registry
from detectkit.checkpoint.errors import CheckpointError
from detectkit.checkpoint.hooks import readers, replay_architecture
from detectkit.checkpoint.record import (
    DIGEST_KEY,
    FORMAT_VERSION,
    RECORD_KEY,
    WEIGHT_KWARGS,
    ArchitectureRecorder,
    RecordedModel,
    architecture_from_callback_states,
    build_record,
    check_record,
    is_detectkit_checkpoint,
    is_lightning,
    seal,
)
from detectkit.checkpoint.safe import read_checkpoint
from detectkit.checkpoint.write import atomic_save

__all__ = ["load", "load_state", "create_model", "save_weights", "load_strict", "match_variant", "strip_prefix"]

#: YOLO-World's vocabulary: its size is the class count, not the variant
_OWN_ONLY_KEYS = ("txt_feats",)


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix``, without it (a Lightning ``model.`` prefix)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], path: Any) -> None:
    """``load_state_dict(strict=True)`` whose error lists missing, unexpected and mis-shaped keys.
    A model may first fit its optional buffers to the weights (``prepare_load(state)``)."""
    prepare = getattr(model, "prepare_load", None)
    if callable(prepare):
        prepare(state)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in state.items() if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{path}: weights do not fit {type(model).__name__}"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                parts.append(f"{title} ({len(items)}): {', '.join(items[:20])}{' ...' if len(items) > 20 else ''}")
        raise CheckpointError("; ".join(parts))
    model.load_state_dict(state, strict=True)


def _same_model(path: Any, asked: str | None, recorded: str | None) -> None:
    if asked and recorded and asked != recorded:
        raise CheckpointError(f"{path}: holds a {recorded} model, not {asked}")


def _apply_record(model: nn.Module, record: Mapping[str, Any] | None) -> None:
    if isinstance(model, RecordedModel):  # a detectkit Detector: classes, inference defaults, ids
        model.apply_record(record)
    else:  # a user's module that is no Detector: classes and where it came from
        if record and record.get("class_names"):
            model.class_names = list(record["class_names"])
        model.record = dict(record) if record is not None else None

def _from_record(obj: Mapping[str, Any], path: Any, num_classes: int | None, name: str | None) -> nn.Module:
    record = dict(obj[RECORD_KEY])
    if int(record.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: record format {record.get('format_version')} is newer than this detectkit reads "
                              f"({FORMAT_VERSION}); upgrade detectkit")
    _same_model(path, name, record.get("model"))
    name = name or record.get("model")
    if not name:
        raise CheckpointError(f"{path}: the checkpoint does not name its model (built from a module instance); pass model=")
    nc = int(record.get("num_classes") or num_classes or 80)
    if num_classes is not None and num_classes != nc:
        raise CheckpointError(f"{path}: holds {nc} classes, num_classes={num_classes} was asked for")
    model = registry.create_model(name, num_classes=nc, **record.get("model_kwargs", {}))
    model = replay_architecture(model, record.get("architecture", []))
    state = obj["state_dict"]
    load_strict(model, strip_prefix(state, "model.") if is_lightning(obj) else state, path)
    _apply_record(model, record)
    return model

def _from_old_lightning(obj: Mapping[str, Any], path: Any, num_classes: int | None, name: str | None) -> nn.Module:
    """A detectkit .ckpt written before the record: hyper-parameters + the callbacks' saved states."""
    hp = obj.get("hyper_parameters") or {}
    _same_model(path, name, hp.get("model") if isinstance(hp.get("model"), str) else None)
    name = name or (hp.get("model") if isinstance(hp.get("model"), str) else None)
    if name is None:
        raise CheckpointError(f"{path}: the checkpoint does not name its model in its hyper-parameters; pass model=")
    kwargs = {k: v for k, v in dict(hp.get("model_kwargs") or {}).items() if k not in WEIGHT_KWARGS and k != "num_classes"}
    nc = num_classes or hp.get("num_classes") or (len(hp["class_names"]) if hp.get("class_names") else None) or 80
    model = registry.create_model(name, num_classes=int(nc), **kwargs)
    model = replay_architecture(model, architecture_from_callback_states(obj.get("callbacks")))
    load_strict(model, strip_prefix(obj["state_dict"], "model."), path)
    _apply_record(model, {"class_names": list(hp["class_names"])} if hp.get("class_names") else None)
    model.record = None
    return model

def match_variant(family: str, state: Mapping[str, torch.Tensor], num_classes: int, path: Any) -> str:
    """The registered ``family*`` variant whose weights have ``state``'s keys and shapes (built on
    the meta device: no memory, no init cost). ``.rbr_reparam.`` placeholders do not count; a
    custom architecture (``*_custom``) is never guessed from shapes: its own record names it."""
    names = [n for n in registry.list_models(f"{family}*") if not n.endswith("_custom")]

    def shapes(sd: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in sd.items() if ".rbr_reparam." not in k and k not in _OWN_ONLY_KEYS}

    want = shapes(state)
    for name in names:
        with torch.device("meta"):
            model = registry.create_model(name, num_classes=num_classes)
        if shapes(model.state_dict()) == want:
            return name
    raise CheckpointError(f"{path}: the weights match none of {', '.join(names)}; pass model=")

def load_state(obj: Any, path: str | os.PathLike = "<checkpoint>", *, model: str | None = None,
               num_classes: int | None = None, model_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """A detector from an already-read checkpoint object (see :func:`load`); not moved, train mode.

    ``model_kwargs`` (builder arguments a caller also passed) must agree with what a detectkit
    checkpoint recorded: the file defines the architecture.
    """
    check_record(obj, path)  # sizes and file names within limits before anything is built
    asked = {k: v for k, v in dict(model_kwargs or {}).items() if k not in WEIGHT_KWARGS and k != "num_classes"}
    if asked and is_detectkit_checkpoint(obj):
        record = obj.get(RECORD_KEY) if isinstance(obj.get(RECORD_KEY), Mapping) else None
        saved = record.get("model_kwargs", {}) if record else (obj.get("hyper_parameters") or {}).get("model_kwargs") or {}
        differ = sorted(k for k in asked if k not in saved or saved[k] != asked[k])
        if differ:
            raise CheckpointError(f"{path}: the checkpoint was built with model arguments {dict(saved)}; "
                                  f"{', '.join(differ)} given differently")
    if isinstance(obj, Mapping) and isinstance(obj.get(RECORD_KEY), Mapping) and "state_dict" in obj:
        return _from_record(obj, path, num_classes, model)
    if is_lightning(obj):
        return _from_old_lightning(obj, path, num_classes, model)
    for reader in readers():  # the formats the model families registered
        if (model is None or model.startswith(reader.prefix)) and reader.detect(obj):
            net = reader.read(obj, path, num_classes, model)
            _apply_record(net, None)
            net.record = None
            return net
    if model is not None and isinstance(obj, Mapping):
        state = obj.get("state_dict", obj)
        if isinstance(state, Mapping) and all(isinstance(v, torch.Tensor) for v in state.values()):
            if all(k.startswith("model.") for k in state):
                state = strip_prefix(state, "model.")
            net = registry.create_model(model, num_classes=num_classes or 80)
            load_strict(net, state, path)
            net.record = None
            return net
    raise CheckpointError(
        f"{path}: not a checkpoint detectkit recognises (expected a detectkit .ckpt / weights file, a "
        "super-gradients .pth, an ultralytics .pt or a state dict with model=)"
    )

def load(path: str | os.PathLike, device: str | torch.device | None = None, num_classes: int | None = None,
         model: str | None = None) -> nn.Module:
    """A ready detector from any checkpoint detectkit reads, in eval mode.

    detectkit ``.ckpt`` (the EMA weights Lightning saved as ``state_dict``) or weights file:
    rebuilt from its record (architecture ops replayed, weights loaded strictly) with
    ``model.inference`` / ``class_names`` / ``category_ids`` / ``record`` from it; older
    ``.ckpt`` files from their hyper-parameters and callbacks' states (default inference).
    super-gradients ``.pth`` and ultralytics ``.pt`` / state dicts: the variant is found from the
    weights' shapes unless ``model`` names it.
    """
    obj = read_checkpoint(path)
    net = load_state(obj, path, model=model, num_classes=num_classes)
    net.eval()
    if device is not None:
        net.to(device)
    return net

def create_model(name: str, num_classes: int = 80, checkpoint: str | os.PathLike | Mapping | None = None,
                 **kwargs: Any) -> nn.Module:
    """:func:`detectkit.registry.create_model`, where ``checkpoint`` may also be a detectkit ``.ckpt``
    or weights file: the file is read once; a detectkit file is rebuilt from its record (its
    recorded arguments must agree with ``kwargs``), any other format (super-gradients ``.pth``,
    ultralytics ``.pt``, a state dict) goes, already read, to the family's builder, which may
    re-initialise the class predictors for another ``num_classes``.
    """
    if checkpoint is not None and not isinstance(checkpoint, Mapping):
        obj = read_checkpoint(checkpoint)
        if is_detectkit_checkpoint(obj):
            model = load_state(obj, checkpoint, model=name, num_classes=num_classes, model_kwargs=kwargs)
            model.train()
            return model
    return registry.create_model(name, num_classes=num_classes, checkpoint=checkpoint, **kwargs)

def save_weights(model_or_ckpt: nn.Module | Mapping[str, Any] | str | os.PathLike, path: str | os.PathLike,
                 half: bool = False) -> Path:
    """A small deployable file ``{"detectkit": record, "state_dict": detector weights}`` that
    :func:`load` reads: from a detector (``detectkit.load`` result or built model), a Lightning
    ``DetectionModule``, or a detectkit ``.ckpt`` (path or dict; its EMA weights). ``half``
    stores floating tensors as fp16 (they load back into the fp32 model)."""
    if isinstance(model_or_ckpt, (str, os.PathLike)):
        model_or_ckpt = read_checkpoint(model_or_ckpt)
    if isinstance(model_or_ckpt, Mapping):
        ckpt = model_or_ckpt
        if not isinstance(ckpt.get(RECORD_KEY), Mapping):
            net = load_state(ckpt)  # an older .ckpt: rebuild, then describe what was rebuilt
            return save_weights(net, path, half)
        record = dict(ckpt[RECORD_KEY])
        state = strip_prefix(ckpt["state_dict"], "model.") if is_lightning(ckpt) else dict(ckpt["state_dict"])
    else:
        net = model_or_ckpt
        if isinstance(net, ArchitectureRecorder) and isinstance(getattr(net, "model", None), nn.Module):
            record = net.checkpoint_record()  # type: ignore[attr-defined]
            net = net.model
        elif getattr(net, "record", None):
            record = dict(net.record)
        else:
            record = build_record(net)
        state = net.state_dict()
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    state = {k: v.detach().cpu() for k, v in state.items()}
    out = seal({RECORD_KEY: {**record, DIGEST_KEY: ""}, "state_dict": state})
    atomic_save(out, path)
    return Path(path)
