"""THE module that reads and writes detectkit checkpoint files.

* **Safe reading.** Every file goes through :func:`read_checkpoint`: ``torch.load(weights_only=True)``
  first; a file that holds pickled objects (an ultralytics ``.pt`` pickles its model classes) is
  read again with :class:`RestrictedUnpickler`, which builds inert stand-ins for model classes,
  rebuilds tensors with torch's own functions and refuses every other global, so no pickled code
  ever runs. Unreadable files raise :class:`CheckpointError` naming the file and what is wrong
  (missing, empty, truncated, not a checkpoint, refused code, hash mismatch).
* **Self-describing record.** Every detectkit checkpoint carries ``checkpoint["detectkit"]``
  (:func:`build_record`): registry name and kwargs, classes, the architecture ops (pruning,
  quantization) replayed on load, inference defaults, dataset category ids, and a
  ``content_sha256`` over everything else in the file (:func:`content_digest`), checked on read.
* **One loader.** :func:`load` turns a detectkit ``.ckpt`` (EMA weights), a detectkit weights
  file (:func:`save_weights`), a super-gradients ``.pth``, an ultralytics ``.pt`` or a bare state
  dict into a ready, eval-mode ``Detector``. The key mapping of foreign formats stays in each
  family's ``weights.py``.
* **Atomic writing.** :func:`atomic_save` serialises to memory, writes ``<path>.tmp`` next to the
  target, fsyncs and ``os.replace``s; a full disk is one clear error and leaves the old file.

Nothing here imports Lightning: loading a weights file must stay cheap.
"""

from __future__ import annotations

import _compat_pickle
import errno
import hashlib
import io
import logging
import os
import pickle
import re
import types
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn

__all__ = [
    "CheckpointError",
    "RefusedPickleError",
    "DiskFullError",
    "ArchitectureRecorder",
    "RECORD_KEY",
    "FORMAT_VERSION",
    "read_checkpoint",
    "content_digest",
    "seal",
    "verify",
    "build_record",
    "replay_architecture",
    "architecture_from_callback_states",
    "load",
    "load_state",
    "is_detectkit_checkpoint",
    "save_weights",
    "atomic_save",
    "RestrictedUnpickler",
]

log = logging.getLogger(__name__)

RECORD_KEY = "detectkit"
FORMAT_VERSION = 1
DIGEST_KEY = "content_sha256"
_LIGHTNING_KEY = "pytorch-lightning_version"
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a"  # torch's pre-1.6 format starts by pickling its magic number (protocol 2)
# builder arguments that fetch or load weights: never replayed when rebuilding from a record
# (and the text encoder: a YOLO-World vocabulary is in the weights as ``txt_feats``)
_WEIGHT_KWARGS = ("checkpoint", "pretrained", "download", "text_encoder")


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message names the file and what is wrong."""


class RefusedPickleError(CheckpointError, pickle.UnpicklingError):
    """The file holds pickled code (a global outside tensors/containers/model classes): never run."""


class DiskFullError(OSError):
    """``no space left on device writing <path>``: the previous file at ``path`` is left as it was."""


@runtime_checkable
class ArchitectureRecorder(Protocol):
    """What owns a detector's architecture ops (``DetectionModule``): compression callbacks append
    an op after they change the architecture; the op list is saved in the checkpoint record and
    replayed (in order, on a freshly built model) before the weights load."""

    architecture: list[dict[str, Any]]

    def record_architecture(self, op: dict[str, Any]) -> None: ...


# --------------------------------------------------------------------------- restricted unpickler
class _Inert:
    """Stand-in for a foreign class: keeps the pickled state as attributes, runs nothing."""

    _foreign = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_args"] = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            for part in state:
                self.__dict__.update(part or {})
        elif isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    # list / dict subclasses are pickled with APPENDS / SETITEMS
    def append(self, item: Any) -> None:
        self.__dict__.setdefault("_items", []).append(item)

    def extend(self, items: Any) -> None:
        self.__dict__.setdefault("_items", []).extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("_mapping", {})[key] = value

    def __repr__(self) -> str:
        return f"<inert {self._foreign}>"


#: classes from these packages become inert stand-ins (model objects of foreign checkpoints)
_STAND_IN_PACKAGES = (
    "ultralytics",
    "super_gradients",
    "torch.nn.modules",
    "clip",
    "open_clip",
    "mobileclip",
    "numpy",
    "pathlib",
    "types",
    "argparse",
    "datetime",
)
_stand_ins: dict[tuple[str, str], type] = {}


def _stand_in(module: str, name: str) -> type:
    key = (module, name)
    if key not in _stand_ins:
        _stand_ins[key] = type(name, (_Inert,), {"__module__": "detectkit.inert", "_foreign": f"{module}.{name}"})
    return _stand_ins[key]


def _rebuild_from_type_v2(func: Any, new_type: Any, args: tuple, state: Any) -> torch.Tensor:
    # torch's version would call as_subclass on any type and set any state; allow plain tensors only
    if func not in (torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter):
        raise pickle.UnpicklingError(f"refusing tensor rebuild through {func!r}")
    tensor = func(*args)
    if new_type is nn.Parameter and not isinstance(tensor, nn.Parameter):
        tensor = nn.Parameter(tensor, requires_grad=tensor.requires_grad)
    elif new_type not in (torch.Tensor, nn.Parameter):
        raise pickle.UnpicklingError(f"refusing tensor subclass {new_type!r}")
    return tensor


def _rebuild_parameter(data: torch.Tensor, requires_grad: bool, backward_hooks: Any, *state: Any) -> nn.Parameter:
    return nn.Parameter(data, requires_grad=requires_grad)


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): torch.Tensor,
    ("torch.nn.parameter", "Parameter"): nn.Parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("_codecs", "encode"): lambda text, encoding="latin1": text.encode(encoding),
}


class RestrictedUnpickler(pickle.Unpickler):
    """Tensors, containers and inert stand-ins for model classes; every other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:  # protocol-2 (Python 2) spellings
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if any(module == p or module.startswith(p + ".") for p in _STAND_IN_PACKAGES):
            return _stand_in(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: only tensors, containers and model classes "
            "(as inert stand-ins) are read from checkpoints"
        )


_restricted_pickle = types.ModuleType("detectkit_restricted_pickle")
_restricted_pickle.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
_restricted_pickle.load = lambda f, **kw: RestrictedUnpickler(f, **kw).load()  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- reading
def _sniff(path: Path) -> None:
    """Reject what is plainly not a torch checkpoint before torch sees it (torch's errors for those
    are ``EOFError()`` with no message or "Unsupported operand 149 ... file an issue")."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"{path}: truncated checkpoint ({size} bytes; the archive's end record is missing: "
                "the file was cut off while being written or copied)"
            )
        return
    if head.startswith(_LEGACY_MAGIC):
        return
    try:
        head.decode("utf-8")
        what = "a text file"
    except UnicodeDecodeError:
        what = "unrecognised binary data"
    raise CheckpointError(f"{path}: not a torch checkpoint ({what}; a checkpoint starts with a zip header)")


def _refused_global(err: BaseException) -> str | None:
    match = re.search(r"GLOBAL ([\w.]+)", str(err)) or re.search(r"refusing to load global ([\w.]+)", str(err))
    return match.group(1) if match else None


def read_checkpoint(path: str | os.PathLike, *, verify_hash: bool = True, map_location: Any = "cpu") -> Any:
    """The object stored in ``path``, read without running pickled code, hash-checked if recorded.

    Raises :class:`CheckpointError` (a ``ValueError``) naming the file and the problem.
    """
    path = Path(path)
    _sniff(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as first:
        # pickled objects (an ultralytics .pt's model classes): the restricted unpickler builds
        # inert stand-ins and refuses everything else. This is the one allowed non-weights_only form.
        try:
            obj = torch.load(path, map_location=map_location, weights_only=False, pickle_module=_restricted_pickle)
        except pickle.UnpicklingError as second:
            name = _refused_global(second) or _refused_global(first)
            raise RefusedPickleError(
                f"{path}: refusing to load global {name or '?'}: the file holds pickled code, which detectkit "
                "never runs (it reads only tensors, containers and model classes as inert data)"
            ) from None
        except Exception as e:  # noqa: BLE001 (any torch/zip error -> one message naming the file)
            raise CheckpointError(f"{path}: corrupt checkpoint ({_first_line(e)})") from None
    except (RuntimeError, EOFError, KeyError, IndexError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({_first_line(e)})") from None
    if verify_hash:
        verify(obj, path)
    return obj


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    if not text:
        return type(e).__name__
    return f"{type(e).__name__}: {text[0].split(' This is an internal miniz error')[0]}"


# --------------------------------------------------------------------------- content hash
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


# --------------------------------------------------------------------------- record
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
    from detectkit import __version__
    from detectkit.registry import name_of

    inference = inference if inference is not None else getattr(model, "inference", None)
    names = list(class_names) if class_names is not None else list(getattr(model, "class_names", []) or [])
    cats = category_ids if category_ids is not None else getattr(model, "category_ids", None)
    if model_kwargs is None:
        model_kwargs = getattr(model, "registry_kwargs", None)
    kwargs = {k: v for k, v in dict(model_kwargs or {}).items() if k not in _WEIGHT_KWARGS and k != "num_classes"}
    return {
        "format_version": FORMAT_VERSION,
        "detectkit_version": __version__,
        "model": name or name_of(model),
        "model_kwargs": kwargs,
        "num_classes": int(getattr(model, "num_classes", len(names))),
        "class_names": [str(n) for n in names],
        "architecture": [dict(op) for op in architecture],
        "inference": inference.to_dict() if hasattr(inference, "to_dict") else dict(inference or {}),
        "category_ids": [int(c) for c in cats] if cats is not None else None,
        DIGEST_KEY: "",
    }


# --------------------------------------------------------------------------- architecture
def replay_architecture(model: nn.Module, ops: Iterable[Mapping[str, Any]]) -> nn.Module:
    """Rebuild recorded architecture changes on a freshly built model, in order (weights not
    loaded). Returns the model to use (quantization may return a converted module)."""
    for op in ops:
        kind = op.get("op")
        if kind == "prune":
            from detectkit.compress.prune import apply_pruned_shapes

            apply_pruned_shapes(model, op["shapes"], fused=op.get("fused", True))
        elif kind == "quantize":
            from detectkit.compress.quantize import restore_quantized

            model = restore_quantized(model, op)
        else:
            raise CheckpointError(f"unknown architecture op {kind!r} in the checkpoint record")
    return model


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


# --------------------------------------------------------------------------- loading
def _is_lightning(obj: Any) -> bool:
    return isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping) and _LIGHTNING_KEY in obj


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], path: Any) -> None:
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


def _from_record(obj: Mapping[str, Any], path: Any, num_classes: int | None, name: str | None) -> nn.Module:
    from detectkit.models.base import InferenceDefaults
    from detectkit.registry import create_model

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
    model = create_model(name, num_classes=nc, **record.get("model_kwargs", {}))
    model = replay_architecture(model, record.get("architecture", []))
    state = obj["state_dict"]
    _load_strict(model, _strip(state, "model.") if _is_lightning(obj) else state, path)
    if record.get("class_names"):
        model.class_names = list(record["class_names"])
    model.inference = InferenceDefaults.from_dict(record.get("inference"))
    model.category_ids = list(record["category_ids"]) if record.get("category_ids") is not None else None
    model.record = record
    return model


def _from_old_lightning(obj: Mapping[str, Any], path: Any, num_classes: int | None, name: str | None) -> nn.Module:
    """A detectkit .ckpt written before the record: hyper-parameters + the callbacks' saved states."""
    from detectkit.models.base import InferenceDefaults
    from detectkit.registry import create_model

    hp = obj.get("hyper_parameters") or {}
    _same_model(path, name, hp.get("model") if isinstance(hp.get("model"), str) else None)
    name = name or (hp.get("model") if isinstance(hp.get("model"), str) else None)
    if name is None:
        raise CheckpointError(f"{path}: the checkpoint does not name its model in its hyper-parameters; pass model=")
    kwargs = {k: v for k, v in dict(hp.get("model_kwargs") or {}).items() if k not in _WEIGHT_KWARGS and k != "num_classes"}
    nc = num_classes or hp.get("num_classes") or (len(hp["class_names"]) if hp.get("class_names") else None) or 80
    model = create_model(name, num_classes=int(nc), **kwargs)
    model = replay_architecture(model, architecture_from_callback_states(obj.get("callbacks")))
    _load_strict(model, _strip(obj["state_dict"], "model."), path)
    if hp.get("class_names"):
        model.class_names = list(hp["class_names"])
    model.inference = InferenceDefaults()
    model.record = None
    return model


def _candidates(family: str) -> list[str]:
    from detectkit.registry import list_models

    # a custom architecture (yolo_nas_custom) is never guessed from shapes: its own record names it
    return [n for n in list_models(f"{family}*") if not n.endswith("_custom")]


def _matching(names: list[str], state: Mapping[str, torch.Tensor], num_classes: int, path: Any) -> str:
    """The registered variant whose weights have ``state``'s keys and shapes (built on the meta
    device: no memory, no init cost). ``.rbr_reparam.`` placeholders do not count."""
    from detectkit.registry import create_model

    def shapes(sd: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in sd.items() if ".rbr_reparam." not in k and k not in _OWN_ONLY_KEYS}

    want = shapes(state)
    for name in names:
        with torch.device("meta"):
            model = create_model(name, num_classes=num_classes)
        if shapes(model.state_dict()) == want:
            return name
    raise CheckpointError(f"{path}: the weights match none of {', '.join(names)}; pass model=")


_OWN_ONLY_KEYS = ("txt_feats",)  # YOLO-World vocabulary: its size is the class count, not the variant


def _from_super_gradients(obj: Mapping[str, Any], path: Any, num_classes: int | None, name: str | None) -> nn.Module:
    from detectkit.models.yolo_nas.weights import load_super_gradients_checkpoint, read_super_gradients_state
    from detectkit.registry import create_model

    state = read_super_gradients_state(obj)
    cls = state.get("heads.head1.cls_pred.weight")
    file_classes = int(cls.shape[0]) if cls is not None else 80
    if name is None:
        name = _matching(_candidates("yolo_nas"), state, file_classes, path)
    model = create_model(name, num_classes=num_classes or file_classes)
    load_super_gradients_checkpoint(model, state)
    model.record = None
    return model


def _from_ultralytics(obj: Any, path: Any, num_classes: int | None, name: str | None) -> nn.Module:
    from detectkit.models.yolo_world import weights as yw
    from detectkit.registry import create_model

    if isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        ckpt = yw.UltralyticsCheckpoint(dict(obj))
    else:
        ckpt = yw.ultralytics_checkpoint_from(obj, path)
    if name is None:
        mapped, _ = yw.from_ultralytics(ckpt.state_dict)
        name = _matching(_candidates("yolo_world"), mapped, num_classes or 80, path)
    model = create_model(name, num_classes=num_classes or 80)
    yw.install_ultralytics_checkpoint(model, ckpt)
    model.record = None
    return model


def is_detectkit_checkpoint(obj: Any) -> bool:
    """A detectkit ``.ckpt`` (with or without a record) or a detectkit weights file."""
    return (isinstance(obj, Mapping) and isinstance(obj.get(RECORD_KEY), Mapping) and "state_dict" in obj) or _is_lightning(obj)


def load_state(obj: Any, path: str | os.PathLike = "<checkpoint>", *, model: str | None = None,
               num_classes: int | None = None, model_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """A detector from an already-read checkpoint object (see :func:`load`); not moved, train mode.

    ``model_kwargs`` (builder arguments a caller also passed) must agree with what a detectkit
    checkpoint recorded: the file defines the architecture.
    """
    asked = {k: v for k, v in dict(model_kwargs or {}).items() if k not in _WEIGHT_KWARGS and k != "num_classes"}
    if asked and is_detectkit_checkpoint(obj):
        record = obj.get(RECORD_KEY) if isinstance(obj.get(RECORD_KEY), Mapping) else None
        saved = record.get("model_kwargs", {}) if record else (obj.get("hyper_parameters") or {}).get("model_kwargs") or {}
        differ = sorted(k for k in asked if k not in saved or saved[k] != asked[k])
        if differ:
            raise CheckpointError(f"{path}: the checkpoint was built with model arguments {dict(saved)}; "
                                  f"{', '.join(differ)} given differently")
    if isinstance(obj, Mapping) and isinstance(obj.get(RECORD_KEY), Mapping) and "state_dict" in obj:
        return _from_record(obj, path, num_classes, model)
    if _is_lightning(obj):
        return _from_old_lightning(obj, path, num_classes, model)
    family = _foreign_family(obj)
    if family == "yolo_nas" and (model is None or model.startswith("yolo_nas")):
        return _from_super_gradients(obj, path, num_classes, model)
    if family == "yolo_world" and (model is None or model.startswith("yolo_world")):
        return _from_ultralytics(obj, path, num_classes, model)
    if model is not None and isinstance(obj, Mapping):
        from detectkit.registry import create_model

        state = obj.get("state_dict", obj)
        if isinstance(state, Mapping) and all(isinstance(v, torch.Tensor) for v in state.values()):
            if all(k.startswith("model.") for k in state):
                state = _strip(state, "model.")
            net = create_model(model, num_classes=num_classes or 80)
            _load_strict(net, state, path)
            net.record = None
            return net
    raise CheckpointError(
        f"{path}: not a checkpoint detectkit recognises (expected a detectkit .ckpt / weights file, a "
        "super-gradients .pth, an ultralytics .pt or a state dict with model=)"
    )


def _foreign_family(obj: Any) -> str | None:
    if not isinstance(obj, Mapping):
        return None
    if isinstance(obj.get("net"), Mapping) or isinstance(obj.get("ema_net"), Mapping):
        return "yolo_nas"
    if obj.get("ema") is not None or obj.get("model") is not None and not isinstance(obj.get("model"), (str, Mapping)):
        return "yolo_world"  # an ultralytics .pt: pickled model objects
    keys = [k for k, v in obj.items() if isinstance(v, torch.Tensor)]
    if keys and len(keys) == len(obj):
        stripped = [k[len("module."):] if k.startswith("module.") else k for k in keys]
        if any(k.startswith("heads.head1.") for k in stripped):
            return "yolo_nas"
        if any(re.match(r"^model\.\d+\.", k) for k in keys):
            return "yolo_world"
    return None


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


# --------------------------------------------------------------------------- writing
def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` into memory, then ``<path>.tmp`` next to ``path``, fsync, ``os.replace``.

    The file at ``path`` is either the previous one or the complete new one; a full disk raises
    :class:`DiskFullError` ("no space left on device writing <path>") with nothing left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _unlink_quietly(tmp)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            err = DiskFullError(f"no space left on device writing {path} (the previous file, if any, is intact)")
            err.errno = e.errno
            raise err from None
        raise
    except BaseException:
        _unlink_quietly(tmp)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _unlink_quietly(p: Path) -> None:
    try:
        p.unlink(missing_ok=True)
    except OSError:
        pass


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
        state = _strip(ckpt["state_dict"], "model.") if _is_lightning(ckpt) else dict(ckpt["state_dict"])
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
