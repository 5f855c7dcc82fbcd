"""``LastCheckpoint``: ``last.ckpt`` is the last epoch's model and ``best.ckpt`` the monitored best.

Lightning's ``ModelCheckpoint(monitor=..., save_last=True)`` rewrites ``last.ckpt`` only when it also
saves a top-k file, i.e. only when the monitored metric improved: after a fit whose last epochs do
not improve, ``last.ckpt`` is an old epoch (and the best file is named ``epoch=N-step=M.ckpt``).
The CLI adds this callback to every trainer (``TRAINER_DEFAULTS``), so every recipe gets the same
two files without repeating it in each YAML:

- ``last.ckpt``: written at the end of every training epoch (after its validation) by this callback;
- ``best.ckpt``: the recipe's monitored ``ModelCheckpoint`` (``save_top_k: 1`` and no ``filename``
  of its own) is named ``best``; it no longer writes ``last.ckpt`` itself (two writers of one file
  would race, and Lightning would name the second one ``last-v1.ckpt``).

A recipe whose own unmonitored ``ModelCheckpoint`` already writes ``last.ckpt`` at each save (e.g.
every N steps, for mid-epoch restarts) keeps it, and this callback then writes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

__all__ = ["LastCheckpoint", "assign_checkpoint_roles", "BEST_NAME"]

#: the file name (without ``.ckpt``) of a monitored single best checkpoint
BEST_NAME = "best"


def _writes_last_each_save(cb: ModelCheckpoint) -> bool:
    """An unmonitored checkpoint that keeps files writes ``last.ckpt`` at each of its saves."""
    return bool(cb.save_last) and cb.monitor is None and cb.save_top_k != 0


def assign_checkpoint_roles(callbacks: Sequence[Callback], last: ModelCheckpoint) -> bool:
    """Make the monitored checkpoints write ``best.ckpt`` only and decide whether ``last`` is needed;
    returns ``True`` when ``last`` must write ``last.ckpt`` (no other callback does it every epoch)."""
    others = [cb for cb in callbacks if isinstance(cb, ModelCheckpoint) and cb is not last]
    for cb in others:
        if cb.monitor is None:
            continue
        cb.save_last = False  # it would rewrite last.ckpt only on improvement
        if cb.filename is None and cb.save_top_k == 1:
            cb.filename = BEST_NAME
    return not any(_writes_last_each_save(cb) for cb in others)


class LastCheckpoint(ModelCheckpoint):
    """Writes ``<run>/checkpoints/last.ckpt`` at the end of every training epoch (see module doc).

    Args:
        dirpath: the checkpoint folder; by default the run's ``checkpoints/`` (Lightning's rule).
    """

    def __init__(self, dirpath: str | None = None) -> None:
        super().__init__(dirpath=dirpath, monitor=None, save_last=True, save_top_k=0, save_on_train_epoch_end=True)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not assign_checkpoint_roles(trainer.callbacks, self):
            self.save_last = False

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Nothing: the epoch's file is written once, at its end (after this validation)."""
