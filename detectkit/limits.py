"""Every resource limit detectkit applies to what it reads (standard library only, importable from
any layer).

A checkpoint record, an annotation file or a request says how many classes, pixels or boxes to
expect; believing it blindly lets a hostile or broken file allocate gigabytes before anything
fails. Each such count is checked here, before the allocation, and a refusal is one
:class:`LimitError` line naming the field, the value, the limit and how to raise it.

The limits are a frozen :class:`Limits`; the user raises one with the environment variable
``DETECTKIT_LIMITS="max_classes=200000,max_image_size=12288"`` or ``detectkit --limits ...`` (which
sets that variable), so load, predict, export, serve and their worker processes all see the same
values. :func:`configure` does the same from Python.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from typing import Any

from detectkit.errors import UserError, suggest

__all__ = ["Limits", "LimitError", "ENV", "current", "parse", "configure", "check", "nesting_depth", "loads_json"]

ENV = "DETECTKIT_LIMITS"


@dataclass(frozen=True)
class Limits:
    """The defaults sit far above any real dataset or model and far below what exhausts a machine."""

    #: classes a checkpoint record or dataset may declare (LVIS has 1,203; a 1e9 head is 7 GB)
    max_classes: int = 100_000
    #: class names a checkpoint record may carry
    max_class_names: int = 100_000
    #: longest side in pixels of a model input (a record's training image size)
    max_image_size: int = 8192
    #: pixels (width x height) of a model input
    max_pixels: int = 8192 * 8192
    #: boxes on one image of a dataset (COCO's densest image has 93; SKU-110K about 700)
    max_annotations_per_image: int = 10_000
    #: bytes of one annotation file (COCO train2017's is 448 MB), checked before it is parsed
    max_annotation_file_bytes: int = 2 * 2**30
    #: nesting depth of JSON (annotation files, request bodies) and of checkpoint contents
    max_json_depth: int = 100
    #: uncompressed bytes of a checkpoint archive, read from the zip directory before inflating
    max_checkpoint_bytes: int = 16 * 2**30


class LimitError(UserError, ValueError):
    """A size, count or depth over its limit (a :class:`~detectkit.errors.UserError`: one line)."""


_NAMES = tuple(f.name for f in fields(Limits))


def parse(text: str, source: str = ENV) -> Limits:
    """``"max_classes=5000, max_image_size=4096"`` (commas or spaces) -> :class:`Limits`."""
    changes: dict[str, int] = {}
    for item in text.replace(",", " ").split():
        name, sep, value = item.partition("=")
        if name not in _NAMES:
            raise UserError(f"{source}: unknown limit {name!r}.{suggest(name, _NAMES)} Limits: {', '.join(_NAMES)}")
        try:
            number = int(value.replace("_", ""))
        except ValueError:
            number = -1
        if not sep or number < 1:
            raise UserError(f"{source}: {name} needs a positive whole number (e.g. {name}=1000), got {value!r}")
        changes[name] = number
    return replace(Limits(), **changes)


@lru_cache(maxsize=8)
def _parsed(text: str) -> Limits:
    return parse(text)


def current() -> Limits:
    """The limits in force: the defaults with ``DETECTKIT_LIMITS`` applied (read at every call)."""
    return _parsed(os.environ.get(ENV, ""))


def configure(**changes: int) -> Limits:
    """Raise or lower limits for this process and the processes it starts (serve workers,
    DataLoader workers): written into ``DETECTKIT_LIMITS``."""
    defaults = _as_dict(Limits())
    merged = {k: v for k, v in _as_dict(current()).items() if v != defaults[k]}
    merged.update({k: int(v) for k, v in changes.items()})
    text = ",".join(f"{k}={v}" for k, v in merged.items())
    limits = parse(text)
    os.environ[ENV] = text
    return limits


def _as_dict(limits: Limits) -> dict[str, int]:
    return {name: getattr(limits, name) for name in _NAMES}


def check(what: str, value: int, limit: str, where: str = "", error: type[Exception] = LimitError) -> None:
    """Raise ``error`` (default :class:`LimitError`) when ``value`` (of ``what``, e.g. "checkpoint
    record num_classes") exceeds ``current().<limit>``; ``where`` (a file) prefixes the message.
    A package with its own error type (``DatasetError``) passes it, so its callers catch one type."""
    cap = getattr(current(), limit)
    if value > cap:
        prefix = f"{where}: " if where else ""
        raise error(f"{prefix}{what} {value} exceeds the limit {cap} (raise with {ENV}={limit}=...)")


def nesting_depth(obj: Any, stop: int | None = None) -> int:
    """Depth of nested dicts/lists/tuples (a scalar is 0), walked iteratively (no RecursionError
    however deep); stops early once ``stop`` is exceeded."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        if stop is not None and deepest > stop:
            return deepest
        stack.extend((c, depth) for c in children if isinstance(c, (dict, list, tuple)))
    return deepest


def loads_json(text: str | bytes, source: str) -> Any:
    """``json.loads`` whose result is at most ``max_json_depth`` deep: deeper input is a
    :class:`LimitError` naming ``source``, never a RecursionError. (A ``json.JSONDecodeError`` /
    ``UnicodeDecodeError`` from malformed text passes through for the caller to word.)"""
    limit = current().max_json_depth
    try:
        data = json.loads(text)
    except RecursionError:
        raise LimitError(f"{source}: JSON nesting depth exceeds the limit {limit} "
                         f"(raise with {ENV}=max_json_depth=...)") from None
    depth = nesting_depth(data, stop=limit)
    if depth > limit:
        raise LimitError(f"{source}: JSON nesting depth {depth}+ exceeds the limit {limit} "
                         f"(raise with {ENV}=max_json_depth=...)")
    return data
