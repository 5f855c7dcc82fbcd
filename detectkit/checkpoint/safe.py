"""Safe reading of checkpoint files: no pickled code ever runs.

``torch.load(weights_only=True)`` first; a file that holds pickled objects (an ultralytics ``.pt``
pickles its model classes) is read again with :class:`RestrictedUnpickler`, which builds inert
stand-ins for model classes, rebuilds tensors with torch's own functions and refuses every other
global. Unreadable files raise :class:`CheckpointError` naming the file and what is wrong
(missing, empty, truncated, not a checkpoint, refused code); a recorded content hash is checked.
"""

from __future__ import annotations

import _compat_pickle
import os
import pickle
import re
import types
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from detectkit import limits
from detectkit.checkpoint.errors import CheckpointError, RefusedPickleError
from detectkit.checkpoint.record import check_record, verify

__all__ = ["Inert", "RestrictedUnpickler", "read_checkpoint"]

_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a"  # torch's pre-1.6 format starts by pickling its magic number (protocol 2)


class Inert:
    """Stand-in for a foreign class: keeps the pickled state as attributes, runs nothing."""

    _foreign = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
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
        _stand_ins[key] = type(name, (Inert,), {"__module__": "detectkit.inert", "_foreign": f"{module}.{name}"})
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
        limits.check("checkpoint uncompressed size (bytes)", _unpacked_size(path), "max_checkpoint_bytes", str(path))
        return
    if head.startswith(_LEGACY_MAGIC):
        limits.check("checkpoint size (bytes)", size, "max_checkpoint_bytes", str(path))
        return
    try:
        head.decode("utf-8")
        what = "a text file"
    except UnicodeDecodeError:
        what = "unrecognised binary data"
    raise CheckpointError(f"{path}: not a torch checkpoint ({what}; a checkpoint starts with a zip header)")


def _unpacked_size(path: Path) -> int:
    """Bytes the archive's members inflate to, from the zip directory alone (a zip bomb is refused
    before torch inflates anything)."""
    try:
        with zipfile.ZipFile(path) as z:
            return sum(max(info.file_size, 0) for info in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt checkpoint archive ({_first_line(e)})") from None


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
    check_record(obj, path)  # before the hash walk and before anything is built from it
    if verify_hash:
        verify(obj, path)
    return obj


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    if not text:
        return type(e).__name__
    return f"{type(e).__name__}: {text[0].split(' This is an internal miniz error')[0]}"


