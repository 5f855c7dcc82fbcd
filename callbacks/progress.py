"""``PlainProgressBar``: progress as plain periodic lines, for logs that are not a terminal.

A cluster job's stdout is a file: tqdm/rich bars either print nothing useful there or one
carriage-returned line per refresh. This bar prints one complete line every ``every_seconds``
(and/or every ``every_steps`` training batches) and at the end of each epoch::

    epoch 3/100 step 120/500 loss 1.234 (cls 0.5 box 0.4 dfl 0.3) 45.2 img/s ETA 12m30s
    epoch 3/100 done in 4m10s: loss 1.198 (cls 0.48 box 0.39 dfl 0.29) 44.8 img/s
    validate epoch 3/100: 125 batches in 35s: map 0.412 map_50 0.601 ...

``detectkit validate|test|predict`` on their own print a start line, the same periodic lines and
a result line (a long evaluation in a log is never silent)::

    validate: 10 batches
    validate batch 4/10 (31s)
    validate: 10 batches in 1m15s: map 0.412 map_50 0.601 ...
    predict: 10 batches (73 images) in 1m02s

The losses are the means since the epoch started, accumulated on the device from the values the
module logged this step (``trainer.callback_metrics``, which Lightning's own bars read each step
too; the host sync happens once per printed line); images/s is the training throughput of all
ranks together (validation time excluded); the ETA covers the rest of the fit (from the wall
time per optimizer step so far, validation included). Rank 0 prints; the other ranks are silent.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

__all__ = ["PlainProgressBar", "format_duration"]


def format_duration(seconds: float) -> str:
    """``12m30s``, ``1h05m``, ``45s``, ``2d03h``."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _num(v: float) -> str:
    return f"{v:.4g}"


def _eval_total(trainer: pl.Trainer) -> float:
    """Batches of the running validation/test/prediction over all its dataloaders (``inf``: unknown)."""
    batches = (trainer.num_test_batches if trainer.testing else trainer.num_predict_batches if trainer.predicting
               else trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches)
    return float(sum(batches)) if isinstance(batches, list) else float(batches or 0)


class PlainProgressBar(ProgressBar):
    """One plain line every ``every_seconds`` / ``every_steps`` and at each epoch end.

    Args:
        every_seconds: print at most this often during an epoch (0: no time trigger).
        every_steps: also print every N training batches (0: no step trigger).
        hide: logged ``train/*`` values left out of the parentheses (diagnostics, not losses).
    """

    def __init__(self, every_seconds: float = 30.0, every_steps: int = 0,
                 hide: Sequence[str] = ("num_fg", "normalizer", "nonfinite_steps")) -> None:
        super().__init__()
        self.every_seconds, self.every_steps, self.hide = float(every_seconds), int(every_steps), tuple(hide)
        self._enabled = True
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._images = 0
        self._epoch_t0 = self._last_print = self._fit_t0 = 0.0
        self._steps_at_start = 0
        self._val_t0 = self._last_val_print = 0.0
        self._val_batches = 0
        self._val_seconds = 0.0  # validation time inside the current training epoch

    # ----------------------------------------------------------- ProgressBar
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled  # ProgressBar.setup disables it on every rank but 0

    @property
    def is_disabled(self) -> bool:
        return not self._enabled

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.is_enabled:
            print(*args, **kwargs, file=sys.stdout, flush=True)

    # -------------------------------------------------------------- training
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_t0 = time.perf_counter()
        self._steps_at_start = trainer.global_step

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sums, self._count, self._images, self._val_seconds = {}, 0, 0, 0.0
        self._epoch_t0 = self._last_print = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.is_enabled:
            return
        for k, v in trainer.callback_metrics.items():  # this step's values, still on the device
            if k.startswith("train/") and k.endswith("_step") and torch.is_tensor(v) and v.numel() == 1:
                name = k[len("train/"):-len("_step")]
                if name not in self.hide:
                    v = v.detach().float()
                    self._sums[name] = self._sums[name] + v if name in self._sums else v.clone()
        self._count += 1
        self._images += self._batch_size(batch) * trainer.world_size
        now = time.perf_counter()
        by_time = self.every_seconds > 0 and now - self._last_print >= self.every_seconds
        by_steps = self.every_steps > 0 and (batch_idx + 1) % self.every_steps == 0
        if by_time or by_steps:
            self._last_print = now
            self.print(self._train_line(trainer, batch_idx + 1, now))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.is_enabled:
            return
        now = time.perf_counter()
        elapsed = now - self._epoch_t0
        train = elapsed - self._val_seconds
        rate = self._images / train if train > 0 else 0.0  # training throughput, validation excluded
        line = f"{self._epoch_str(trainer)} done in {format_duration(elapsed)}: {self._losses()} {rate:.1f} img/s"
        eta = self._eta(trainer, now)
        self.print(line + (f" ETA {eta}" if eta and not self._last_epoch(trainer) else ""))

    # ------------------------------------------------------------ evaluation
    # validate / test / predict, inside fit or on their own: a start line (on their own), a line
    # every ``every_seconds``, and the result line at the end.
    def _eval_start(self, trainer: pl.Trainer) -> None:
        self._val_t0 = self._last_val_print = time.perf_counter()
        self._val_batches = self._eval_images = 0
        if self.is_enabled and trainer.state.fn != "fit":  # on its own: say at once that it started, and its length
            total = self._of(_eval_total(trainer))
            self.print(f"{self._eval_word(trainer)}: {total[1:] if total else 'an unknown number of'} batches")

    def _eval_batch(self, trainer: pl.Trainer, batch: Any) -> None:
        self._val_batches += 1
        self._eval_images += self._batch_size(batch)
        if not self.is_enabled or trainer.sanity_checking:
            return
        now = time.perf_counter()
        if self.every_seconds > 0 and now - self._last_val_print >= self.every_seconds:
            self._last_val_print = now
            self.print(f"{self._eval_word(trainer)} batch {self._val_batches}{self._of(_eval_total(trainer))} "
                       f"({format_duration(now - self._val_t0)})")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch(trainer, batch)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the module logged this validation's metrics."""
        self._val_seconds += time.perf_counter() - self._val_t0
        if self.is_enabled and not trainer.sanity_checking:
            self.print(self._eval_line(trainer, "val/"))

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch(trainer, batch)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.is_enabled:
            self.print(self._eval_line(trainer, "test/"))

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer)

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch(trainer, batch)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.is_enabled:
            took = format_duration(time.perf_counter() - self._val_t0)
            self.print(f"predict: {self._val_batches} batches ({self._eval_images} images) in {took}")

    # ---------------------------------------------------------------- lines
    def _train_line(self, trainer: pl.Trainer, batches_done: int, now: float) -> str:
        total = self.total_train_batches
        of = f"/{int(total)}" if total != float("inf") else ""
        elapsed = now - self._epoch_t0 - self._val_seconds
        rate = self._images / elapsed if elapsed > 0 else 0.0
        eta = self._eta(trainer, now)
        return (f"{self._epoch_str(trainer)} step {batches_done}{of} {self._losses()} {rate:.1f} img/s"
                + (f" ETA {eta}" if eta else ""))

    def _eval_line(self, trainer: pl.Trainer, prefix: str) -> str:
        metrics = {k[len(prefix):]: v for k, v in trainer.callback_metrics.items()
                   if k.startswith(prefix) and not k.startswith(prefix + "AP/")}
        values = " ".join(f"{k} {float(v):.4f}" for k, v in metrics.items() if float(v) >= 0)  # -1: n/a
        took = format_duration(time.perf_counter() - self._val_t0)
        return f"{self._eval_word(trainer)}: {self._val_batches} batches in {took}: {values or '(no metrics)'}"

    @staticmethod
    def _of(total: float) -> str:
        return f"/{int(total)}" if total and total != float("inf") else ""

    def _eval_word(self, trainer: pl.Trainer) -> str:
        if trainer.testing:
            return "test"
        if trainer.predicting:
            return "predict"
        return f"validate {self._epoch_str(trainer)}" if trainer.state.fn == "fit" else "validate"

    def _losses(self) -> str:
        if not self._count:
            return "loss -"
        means = {k: float(v) / self._count for k, v in self._sums.items()}  # the host sync, once per line
        total = means.pop("loss", None)
        head = f"loss {_num(total)}" if total is not None else "loss -"
        return head + (" (" + " ".join(f"{k} {_num(v)}" for k, v in means.items()) + ")" if means else "")

    @staticmethod
    def _epoch_str(trainer: pl.Trainer) -> str:
        of = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        return f"epoch {trainer.current_epoch + 1}{of}"

    @staticmethod
    def _last_epoch(trainer: pl.Trainer) -> bool:
        return bool(trainer.max_epochs and trainer.max_epochs > 0 and trainer.current_epoch + 1 >= trainer.max_epochs)

    def _eta(self, trainer: pl.Trainer, now: float) -> str | None:
        """Remaining optimizer steps x wall time per step so far (validation included)."""
        done = trainer.global_step - self._steps_at_start
        total = trainer.estimated_stepping_batches
        if done <= 0 or not total or total == float("inf"):
            return None
        return format_duration((now - self._fit_t0) / done * max(0, total - trainer.global_step))

    @staticmethod
    def _batch_size(batch: Any) -> int:
        if isinstance(batch, dict) and torch.is_tensor(batch.get("images")):
            return int(batch["images"].shape[0])
        if isinstance(batch, list | tuple) and batch and torch.is_tensor(batch[0]):
            return int(batch[0].shape[0])
        return 0
