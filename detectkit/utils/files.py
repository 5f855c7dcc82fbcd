"""THE atomic file write: a reader (another process, a resumed run, a server) sees the old file or
the complete new one, never half of one, and a full disk leaves the old file in place.

Checkpoints, COCO results and annotation files, the server's exported graph and the run report
all write through :func:`atomic_write`. The bytes go to :func:`partial_path` next to the target
(same filesystem, so ``os.replace`` is a rename, atomic on POSIX), are fsynced, replace the
target, and the folder entry is fsynced too. The process id in the partial name keeps two
processes writing the same file (two server workers exporting one graph) out of each other's way.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["DiskFullError", "atomic_write", "partial_path"]

Writer = Callable[[Path], object]


class DiskFullError(OSError):
    """No space left writing a file; the previous file, if any, is intact."""


def partial_path(path: str | os.PathLike) -> Path:
    """Where :func:`atomic_write` puts the bytes before they replace ``path``."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | os.PathLike, data: bytes | bytearray | memoryview | str | Writer) -> Path:
    """Write ``data`` to ``path`` atomically and return ``path``.

    ``data``: bytes, text (UTF-8), or a callback ``write(partial: Path)`` that writes the whole
    file itself (``torch.onnx.export``, a CSV writer). Parent folders are created. A full disk or
    quota raises :class:`DiskFullError` naming ``path``; any failure removes the partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        if callable(data):
            data(tmp)
            _fsync_file(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
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
    _fsync_dir(path.parent)
    return path


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (not possible on every filesystem: best effort)."""
    try:
        _fsync_file(folder)
    except OSError:
        pass


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass
