"""``AtomicCheckpointIO``: a checkpoint file is either the old one or the complete new one.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction: the bytes go to a
``tempfile.mkstemp()`` file in the *system temp dir*, then ``shutil.move`` puts it in place. When
``$TMPDIR`` is on another filesystem than the run folder (tmpfs ``/tmp``, a node-local scratch
disk, a network share), that move is a copy into the final path, so a job killed during the copy
(SLURM preemption, OOM killer, SIGKILL) leaves a truncated ``last.ckpt``; nothing is fsynced
either. Here the file is written next to its destination (``<path>.tmp``), fsynced, and
``os.replace``d, which is atomic on POSIX within one filesystem. Remote (``s3://`` etc.) paths
go to Lightning's implementation unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "atomic_torch_save"]


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``<path>.tmp`` in the same folder, fsync, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` that never leaves a partial checkpoint at its final path.

    Use: ``Trainer(plugins=[AtomicCheckpointIO()])`` or in YAML
    ``trainer.plugins: [{class_path: detectkit.checkpoint_io.AtomicCheckpointIO}]``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        fs = get_filesystem(path)
        if type(fs).__name__ != "LocalFileSystem":
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"`storage_options` is not supported by {type(self).__name__}")
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))
