"""Atomic writing: a checkpoint file is either the previous one or the complete new one.

:func:`atomic_save` serialises to memory, writes ``<path>.tmp`` next to the target, fsyncs and
``os.replace``s; a full disk is one clear error and leaves the old file.
"""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import Any

import torch

from detectkit.checkpoint.errors import DiskFullError

__all__ = ["atomic_save"]


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

