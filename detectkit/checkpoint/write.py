"""Atomic writing: a checkpoint file is either the previous one or the complete new one.

:func:`atomic_save` serialises to memory and hands the bytes to the one atomic write
(:func:`detectkit.utils.files.atomic_write`); a full disk is one clear error and leaves the old file.
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch

from detectkit.utils.files import atomic_write

__all__ = ["atomic_save"]


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` into memory, then :func:`atomic_write` (partial file, fsync, ``os.replace``).

    The file at ``path`` is either the previous one or the complete new one; a full disk raises
    :class:`~detectkit.utils.files.DiskFullError` ("no space left on device writing <path>") with
    nothing left behind.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getbuffer())
