"""``StopOnSignal``: Ctrl-C (SIGINT) or SIGTERM stops a fit at the next step boundary, saves
``last.ckpt``, says so in one line and exits 130 / 143.

Lightning already does the stopping part for SIGTERM: its handler sets ``trainer.received_sigterm``
and the loops raise ``SIGTERMException`` (a ``SystemExit``) once the current training or
validation batch is done, after every callback's batch hooks (EMA update, step checkpoints), so
the state is that of a finished step. What it does not do is save anything, say anything useful
or exit with the signal's code (``SystemExit(None)`` exits 0, as if the fit had finished). And
Ctrl-C raises ``KeyboardInterrupt`` wherever Python happens to be, possibly between a weight
update and its EMA update. So this callback, from the start of training:

- wraps the SIGTERM handler to remember which signal came, and routes the first SIGINT into the
  same Lightning path (a second Ctrl-C interrupts at once, as usual);
- on ``SIGTERMException`` (inside a validation: after swapping the EMA's live weights back) writes ``last.ckpt`` where the run's ``ModelCheckpoint`` writes it
  (through the trainer, so the atomic checkpoint writer and the EMA weights are used), prints
  one line on stderr and sets the exit code to ``128 + signal`` (the shell's convention).
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from detectkit.callbacks.utils import weight_averaging_callbacks
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["StopOnSignal", "last_checkpoint_path"]

#: the signals a fit stops cleanly on; everything else keeps its handler
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def last_checkpoint_path(trainer: pl.Trainer) -> Path | None:
    """Where this run's ``last.ckpt`` goes: the ``ModelCheckpoint`` that keeps one (else the first)."""
    callbacks = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
    chosen = next((cb for cb in callbacks if cb.save_last), callbacks[0] if callbacks else None)
    if chosen is None:
        return None
    return Path(chosen.format_checkpoint_name({}, chosen.CHECKPOINT_NAME_LAST))


class StopOnSignal(Callback):
    """Stop a fit cleanly on SIGINT/SIGTERM: last step finished, ``last.ckpt`` saved, exit 130/143."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    # ------------------------------------------------------------ handlers
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning installs its SIGTERM handler just before training starts: wrap it now."""
        from threading import current_thread, main_thread

        if current_thread() is not main_thread():  # signal handlers can only be set there
            return
        self.signum = None
        lightning_sigterm = signal.getsignal(signal.SIGTERM)
        # its "Received SIGTERM" log line would be a second message beside ours
        logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector").setLevel(logging.WARNING)

        def handler(signum: int, frame: FrameType | None) -> None:
            if signum == signal.SIGINT and self.signum is not None:  # second Ctrl-C: stop at once
                raise KeyboardInterrupt
            self.signum = signum
            if callable(lightning_sigterm):
                lightning_sigterm(signum, frame)  # sets trainer.received_sigterm: the loops stop after this batch
            else:
                trainer.should_stop = True

        for signum in SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, handler)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before Lightning's own teardown puts back what was there before the fit (a restore in
        ``teardown``, which runs after it, would leave a handler of this finished fit behind)."""
        self._restore()

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:
                signal.signal(signum, previous)
        self._previous = {}

    # ------------------------------------------------------------ the stop
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()
        if not isinstance(exception, SIGTERMException):
            return
        signum = self.signum or signal.SIGTERM
        exception.code = 128 + int(signum)
        fitting = trainer.state.fn == "fit"
        path = last_checkpoint_path(trainer) if fitting else None
        if path is not None and (trainer.validating or trainer.sanity_checking):
            # stopped inside a validation, which runs on the averaged weights: swap the live ones back
            # first (what the validation's end would have done), or the file would hold them swapped
            for cb in weight_averaging_callbacks(trainer):
                cb.on_validation_epoch_end(trainer, pl_module)
        if path is not None:
            trainer.save_checkpoint(path)  # the full state (optimizer, loops): a resumable file
        if trainer.is_global_zero:
            stage = f"fit stopped after step {trainer.global_step} (epoch {trainer.current_epoch + 1})" if fitting \
                else f"{trainer.state.fn} stopped"
            where = f"; saved {path} (continue with --ckpt_path last)" if path else \
                ("; no checkpoint saved (checkpointing is off)" if fitting else "")
            print(f"detectkit: {signal.Signals(signum).name}: {stage}{where}", file=sys.stderr, flush=True)
