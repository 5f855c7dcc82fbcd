"""``AtomicCheckpointIO``: a checkpoint file is either the old one or the complete new one, and
what is read back is verified.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction: the bytes go to a
``tempfile.mkstemp()`` file in the *system temp dir*, then ``shutil.move`` puts it in place. When
``$TMPDIR`` is on another filesystem than the run folder (tmpfs ``/tmp``, a node-local scratch
disk, a network share), that move is a copy into the final path, so a job killed during the copy
(SLURM preemption, OOM killer, SIGKILL) or a full disk leaves a truncated ``last.ckpt``; nothing is
fsynced either. Here the checkpoint is serialised in memory, written next to its destination
(``<path>.tmp``), fsynced and ``os.replace``d (atomic on POSIX within one filesystem) by
:func:`detectkit.checkpoint.write.atomic_save`; a full disk is one :class:`~detectkit.checkpoint.errors.DiskFullError`
("no space left on device writing <path>") with the previous file intact and no ``.tmp`` left.
Reading goes through :func:`detectkit.checkpoint.safe.read_checkpoint` (no pickled code runs; the
record's content hash is checked, so a corrupted file is an error naming it). Remote (``s3://``
etc.) paths go to Lightning's implementation unchanged.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from detectkit.checkpoint.safe import read_checkpoint
from detectkit.checkpoint.write import atomic_save

__all__ = ["AtomicCheckpointIO"]


def _local(path: Any) -> bool:
    return type(get_filesystem(path)).__name__ == "LocalFileSystem"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` that never leaves a partial checkpoint at its final path and
    verifies what it reads.

    Use: ``Trainer(plugins=[AtomicCheckpointIO()])`` or in YAML
    ``trainer.plugins: [{class_path: detectkit.checkpoint.lightning_io.AtomicCheckpointIO}]``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if not _local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"`storage_options` is not supported by {type(self).__name__}")
        atomic_save(checkpoint, str(path).removeprefix("file://"))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if not _local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        # always the safe reader, whatever ``weights_only`` Lightning passes
        return read_checkpoint(str(path).removeprefix("file://"), map_location=map_location or "cpu")
