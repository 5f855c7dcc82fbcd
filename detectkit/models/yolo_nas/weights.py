"""super-gradients YOLO-NAS checkpoints (and our own state dicts) -> ``YoloNAS``.

Our key names equal super-gradients' (``backbone.*``, ``neck.*``, ``heads.*``), so conversion is
only: pick the weights entry, strip a DDP ``module.`` prefix, and drop the ``rbr_reparam``
placeholders of unfused QARepVGG blocks (random or stale in SG files; the fused kernel is always
computed from the branches).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from detectkit.checkpoint import ForeignReader, match_variant, read_checkpoint, register_reader
from detectkit.registry import create_model

log = logging.getLogger(__name__)

_CLS_PRED = re.compile(r"^heads\.head\d+\.cls_pred\.(weight|bias)$")
_MAX_LISTED = 40


class LoadReport(NamedTuple):
    """What a non-strict load left out (all empty after a successful strict load)."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]
    reinitialised: list[str]  # class predictors kept at their fresh init (class count changed)


def read_super_gradients_state(path_or_state: str | Path | Mapping) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint: ``ema_net``, else ``net``, else the mapping itself (bare state dict)."""
    where = "state dict"
    if isinstance(path_or_state, (str, Path)):
        path = Path(path_or_state)
        where = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"YOLO-NAS checkpoint not found: {path}")
        obj = read_checkpoint(path)  # CheckpointError (a ValueError) names the file and the problem
    else:
        obj = path_or_state
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a dict checkpoint, got {type(obj).__name__}")
    for key in ("ema_net", "net"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    state = dict(obj)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not state or bad:
        raise ValueError(
            f"{where}: no state dict found (looked for 'ema_net', 'net', or a mapping of tensors); "
            f"non-tensor entries: {bad[:10]}"
        )
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    # rbr_reparam of an unfused block (its branches are present) is a placeholder, never real weights.
    unfused_blocks = {k[: -len(".branch_3x3.conv.weight")] for k in state if k.endswith(".branch_3x3.conv.weight")}
    return {
        k: v for k, v in state.items()
        if not (".rbr_reparam." in k and k.split(".rbr_reparam.")[0] in unfused_blocks)
    }


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else "")


def load_super_gradients_checkpoint(
    model: nn.Module, path_or_state: str | Path | Mapping, strict: bool = True
) -> LoadReport:
    """Load SG weights (``.pth`` path, checkpoint dict or bare state dict) into a ``YoloNAS``.

    Any missing or unexpected key or shape mismatch raises (``strict=True``) with the keys named.
    If the checkpoint's class count differs from ``model.num_classes``, everything but
    ``heads.head*.cls_pred`` is loaded and those keep their fresh (prior-bias) init: fine-tuning
    from COCO weights on a new label set. A fused model's state dict needs a model fused the same
    way (``model.fuse(full=...)`` before loading).
    """
    where = str(path_or_state) if isinstance(path_or_state, (str, Path)) else "state dict"
    state = read_super_gradients_state(path_or_state)
    own = model.state_dict()

    reinit: list[str] = []
    ck_cls = state.get("heads.head1.cls_pred.weight")
    num_classes = getattr(model, "num_classes", None)
    if ck_cls is not None and num_classes is not None and ck_cls.shape[0] != num_classes:
        reinit = sorted(k for k in own if _CLS_PRED.match(k))
        state = {k: v for k, v in state.items() if not _CLS_PRED.match(k)}
        log.warning(
            "%s: checkpoint has %d classes, model has %d: loaded all weights except the class "
            "predictors (%s), which keep their fresh init", where, ck_cls.shape[0], num_classes,
            ", ".join(reinit),
        )

    missing = [k for k in own if k not in state and k not in reinit]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items() if k in own and v.shape != own[k].shape
    ]
    if strict and (missing or unexpected or mismatched):
        lines = [f"{where} does not match {type(model).__name__}:"]
        if missing:
            lines.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if mismatched:
            lines.append(f"shape mismatches ({len(mismatched)}): {_listing(mismatched)}")
        if any(".rbr_reparam." in k for k in unexpected + missing):
            lines.append("(a fused state dict needs a model fused the same way: call model.fuse(full=...) first)")
        raise RuntimeError("\n".join(lines))
    bad_shape = {m.split(":")[0] for m in mismatched}
    to_load = {k: v for k, v in state.items() if k in own and k not in bad_shape}
    model.load_state_dict(to_load, strict=False)
    return LoadReport(missing, unexpected, mismatched, reinit)


def is_super_gradients(obj: Any) -> bool:
    """A super-gradients checkpoint (``net`` / ``ema_net``) or a bare YOLO-NAS state dict."""
    if not isinstance(obj, Mapping):
        return False
    if isinstance(obj.get("net"), Mapping) or isinstance(obj.get("ema_net"), Mapping):
        return True
    keys = [k for k, v in obj.items() if isinstance(v, torch.Tensor)]
    return bool(keys) and len(keys) == len(obj) and any(k.removeprefix("module.").startswith("heads.head1.") for k in keys)


def read_super_gradients(obj: Mapping[str, Any], path: Any, num_classes: int | None, name: str | None) -> nn.Module:
    """The ``yolo_nas_*`` variant the weights' shapes name (or ``name``), weights loaded."""
    state = read_super_gradients_state(obj)
    cls = state.get("heads.head1.cls_pred.weight")
    file_classes = int(cls.shape[0]) if cls is not None else 80
    if name is None:
        name = match_variant("yolo_nas", state, file_classes, path)
    model = create_model(name, num_classes=num_classes or file_classes)
    load_super_gradients_checkpoint(model, state)
    return model


register_reader(ForeignReader("yolo_nas", "yolo_nas", is_super_gradients, read_super_gradients))
