"""ultralytics YOLO-World checkpoints -> detectkit, by key mapping and without ultralytics.

Two inputs are accepted:

* a state dict in the ultralytics layout (``model.<layer>.<...>`` keys), e.g. saved with
  ``torch.save(model.state_dict())``: read by :func:`detectkit.checkpoint.read_checkpoint`;
* an ultralytics ``.pt`` (a pickled dict holding a pickled ``WorldModel`` object under ``ema``
  / ``model``): read by :func:`read_ultralytics_pt` through ``detectkit.checkpoint``, whose unpickler builds *inert stand-ins*
  for the model classes, rebuilds tensors with torch's own functions and refuses every other
  global (``os.system`` & co.), so no pickled code runs and ultralytics is never imported.

Any missing or unexpected key, or shape mismatch, raises an error listing them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from detectkit.checkpoint import ForeignReader, Inert, match_variant, read_checkpoint, register_reader
from detectkit.registry import create_model

# ultralytics layer index -> detectkit module path (layers 10/11/13/14/17/20 hold no weights)
LAYER_PREFIXES: dict[int, str] = {
    0: "backbone.stem",
    1: "backbone.stage1.0",
    2: "backbone.stage1.1",
    3: "backbone.stage2.0",
    4: "backbone.stage2.1",
    5: "backbone.stage3.0",
    6: "backbone.stage3.1",
    7: "backbone.stage4.0",
    8: "backbone.stage4.1",
    9: "backbone.stage4.2",
    12: "neck.top_down_p4",
    15: "neck.top_down_p3",
    16: "neck.down_p3",
    18: "neck.bottom_up_p4",
    19: "neck.down_p4",
    21: "neck.bottom_up_p5",
    22: "head",
}
_DFL_KEY = "model.22.dfl.conv.weight"  # ultralytics keeps the fixed arange(16) as a frozen conv
_OWN_ONLY = ("txt_feats",)  # detectkit state that ultralytics does not put in its state dict
_KEY = re.compile(r"^model\.(\d+)\.(.+)$")


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model: lists missing, unexpected and mis-shaped keys."""


def from_ultralytics(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename ultralytics keys to detectkit keys; returns (renamed, keys that map nowhere)."""
    out, unexpected = {}, []
    for key, value in state.items():
        if key == _DFL_KEY:
            if value.numel() != 16 or not torch.equal(value.float().flatten(), torch.arange(16.0)):
                unexpected.append(f"{key} (expected the fixed arange(16) DFL projection)")
            continue
        match = _KEY.match(key)
        if match is None or int(match.group(1)) not in LAYER_PREFIXES:
            unexpected.append(key)
            continue
        out[f"{LAYER_PREFIXES[int(match.group(1))]}.{match.group(2)}"] = value
    return out, unexpected


def to_ultralytics(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """detectkit keys -> ultralytics ``model.<layer>`` keys (for exchanging weights back)."""
    inverse = {prefix: idx for idx, prefix in LAYER_PREFIXES.items()}
    out = {}
    for key, value in state.items():
        if key in _OWN_ONLY or key.endswith(".attn.guide"):
            continue
        prefix = next((p for p in sorted(inverse, key=len, reverse=True) if key.startswith(p + ".")), None)
        if prefix is None:
            raise KeyError(f"{key} has no ultralytics counterpart")
        out[f"model.{inverse[prefix]}.{key[len(prefix) + 1 :]}"] = value
    out[_DFL_KEY] = torch.arange(16.0).reshape(1, 16, 1, 1)
    return out


def load_ultralytics_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Strictly load an ultralytics-layout state dict into a :class:`YoloWorld`."""
    mapped, unexpected = from_ultralytics(state)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in mapped and k not in _OWN_ONLY)
    unexpected += sorted(k for k in mapped if k not in own)
    shapes = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in mapped.items()
        if k in own and v.shape != own[k].shape
    )
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(_mismatch_message(missing, unexpected, shapes))
    for key in _OWN_ONLY:
        mapped[key] = own[key]
    model.load_state_dict({k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in mapped.items()})
    return model


def _mismatch_message(missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    parts = ["checkpoint does not match the model"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            parts.append(f"{title} ({len(items)}): " + ", ".join(items))
    return "; ".join(parts)


# The restricted unpickler that reads ultralytics' pickled model objects lives in detectkit.checkpoint.


@dataclass
class UltralyticsCheckpoint:
    """What a ``.pt`` holds that detectkit uses: the weights and, when saved, the vocabulary."""

    state_dict: dict[str, torch.Tensor]
    txt_feats: torch.Tensor | None = None
    names: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _module_state(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    attrs = getattr(obj, "__dict__", {})
    skip = attrs.get("_non_persistent_buffers_set") or set()
    for name, value in (attrs.get("_parameters") or {}).items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value.detach()
    for name, value in (attrs.get("_buffers") or {}).items():
        if isinstance(value, torch.Tensor) and name not in skip:
            out[prefix + name] = value.detach()
    for name, child in (attrs.get("_modules") or {}).items():
        if child is not None:
            _module_state(child, f"{prefix}{name}.", out)


def read_ultralytics_pt(path: str | Path) -> UltralyticsCheckpoint:
    """Parameters and buffers of the ``ema`` (else ``model``) object of an ultralytics ``.pt``."""
    return ultralytics_checkpoint_from(read_checkpoint(path), path)


def ultralytics_checkpoint_from(data: Any, path: str | Path = "checkpoint") -> UltralyticsCheckpoint:
    """The weights and vocabulary of an already-read ultralytics ``.pt`` (inert model objects)."""
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict with 'model'/'ema', got {type(data).__name__}")
    net = data.get("ema") if data.get("ema") is not None else data.get("model")
    if net is None:
        raise ValueError(f"{path}: neither 'ema' nor 'model' holds a model (keys: {sorted(data)})")
    state: dict[str, torch.Tensor] = {}
    _module_state(net, "", state)
    if not state:
        raise ValueError(f"{path}: the pickled model holds no parameters")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    attrs = net.__dict__
    txt = attrs.get("txt_feats")
    txt = txt.detach().float().reshape(-1, txt.shape[-1]) if isinstance(txt, torch.Tensor) else None
    names = attrs.get("names")
    if isinstance(names, dict):
        names = [str(names[i]) for i in sorted(names)]
    elif isinstance(names, (list, tuple)):
        names = [str(n) for n in names]
    else:
        names = None
    meta = {k: data[k] for k in ("date", "version", "epoch") if isinstance(data.get(k), (str, int, float))}
    return UltralyticsCheckpoint(state, txt, names, meta)


def install_ultralytics_checkpoint(model: nn.Module, ckpt: UltralyticsCheckpoint) -> nn.Module:
    """Load the weights strictly, then the vocabulary when the file carries one of the model's width."""
    load_ultralytics_state_dict(model, ckpt.state_dict)
    if ckpt.txt_feats is not None and ckpt.txt_feats.shape[-1] == model.text_dim:
        names = ckpt.names if ckpt.names and len(ckpt.names) == len(ckpt.txt_feats) else None
        model.set_text_embeddings(ckpt.txt_feats, names)
    return model


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load ``path`` (ultralytics ``.pt``, ultralytics state dict or detectkit state dict) strictly."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    data = read_checkpoint(path)  # weights_only, or inert stand-ins for pickled model classes
    if isinstance(data, dict) and (data.get("ema") is not None or isinstance(data.get("model"), Inert)):
        return install_ultralytics_checkpoint(model, ultralytics_checkpoint_from(data, path))
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]  # a Lightning checkpoint or a detectkit weights file
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    if any(_KEY.match(k) for k in data) and not any(k.startswith("model.backbone.") for k in data):
        return load_ultralytics_state_dict(model, data)
    if all(k.startswith("model.") for k in data):
        data = {k[len("model.") :]: v for k, v in data.items()}
    result = model.load_state_dict(data, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointMismatchError(
            _mismatch_message(list(result.missing_keys), list(result.unexpected_keys), [])
        )
    return model


def is_ultralytics(obj: Any) -> bool:
    """An ultralytics ``.pt`` (pickled model objects under ``ema`` / ``model``) or a state dict in
    the ultralytics layout (``model.<layer>.`` keys)."""
    if not isinstance(obj, Mapping):
        return False
    if obj.get("ema") is not None or obj.get("model") is not None and not isinstance(obj.get("model"), (str, Mapping)):
        return True
    keys = [k for k, v in obj.items() if isinstance(v, torch.Tensor)]
    return bool(keys) and len(keys) == len(obj) and any(_KEY.match(k) for k in keys)


def read_ultralytics(obj: Any, path: Any, num_classes: int | None, name: str | None) -> nn.Module:
    """The ``yolo_world_v2_*`` variant the weights' shapes name (or ``name``), weights and
    vocabulary (when the file has one) loaded."""
    if isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        ckpt = UltralyticsCheckpoint(dict(obj))
    else:
        ckpt = ultralytics_checkpoint_from(obj, path)
    if name is None:
        mapped, _ = from_ultralytics(ckpt.state_dict)
        name = match_variant("yolo_world", mapped, num_classes or 80, path)
    model = create_model(name, num_classes=num_classes or 80)
    return install_ultralytics_checkpoint(model, ckpt)


register_reader(ForeignReader("yolo_world", "yolo_world", is_ultralytics, read_ultralytics))
