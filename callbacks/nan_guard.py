"""``NanGuard``: a non-finite loss or gradient skips the step; a run of them stops the fit.

Without it a learning rate that is far too high turns every weight (live and EMA) into NaN, the
fit exits 0 and ``last.ckpt`` holds nothing usable. With it:

- the loss is checked before backward (``on_before_backward``), the gradients and the buffers
  (BatchNorm running statistics overflow in a forward whose loss is still finite) just before the
  optimizer step (``on_before_optimizer_step``), as one on-device flag and ONE host sync per
  step (``torch._foreach_norm`` with ``ord=inf`` is one fused kernel per dtype/device and, being
  a max, cannot overflow like a 2-norm); under DDP the flag is all-reduced so every rank takes
  the same decision;
- a bad step is skipped: the gradients are set to ``None`` (AdamW then leaves those weights and
  its moments untouched) and the buffers (BatchNorm running statistics, which the bad forward
  already updated) are restored from a copy taken at the start of the step, so the model is
  exactly as before the batch and the EMA averages only finite weights;
- each skip is counted (``train/nonfinite_steps``) and warned about; after ``max_consecutive``
  bad steps in a row the fit stops with :class:`NonFiniteLossError` naming the step and epoch;
- no checkpoint with non-finite weights is ever written: ``on_save_checkpoint`` checks the
  state dict, the live weights kept beside the EMA and the EMA copy itself, and raises
  :class:`NonFiniteWeightsError` instead (Lightning writes the file only after every callback's
  ``on_save_checkpoint`` returned).

With fp16 mixed precision the ``GradScaler`` already skips steps whose gradients overflow (that
is how it calibrates its scale), so only the loss is checked there.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from detectkit.callbacks.utils import weight_averaging_callbacks
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision

from detectkit.errors import UserError

__all__ = ["NanGuard", "NonFiniteLossError", "NonFiniteWeightsError", "nonfinite_tensors"]

log = logging.getLogger(__name__)


class NonFiniteLossError(UserError, RuntimeError):
    """The fit was stopped because the loss or the gradients stayed NaN/Inf (the CLI prints it as
    one line: the fix is the user's, e.g. a lower learning rate)."""


class NonFiniteWeightsError(NonFiniteLossError):
    """A checkpoint was about to be written with NaN/Inf weights; it was not written."""


def _all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One on-device boolean: every element of every tensor is finite (no host sync)."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    flags = [torch.isfinite(torch.stack(torch._foreach_norm(ts, ord=math.inf))).all() for ts in by_device.values()]
    if not flags:
        return torch.tensor(True)
    first = flags[0].device
    return torch.stack([f.to(first) for f in flags]).all()


def nonfinite_tensors(state: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors in ``state`` holding NaN/Inf (one sync when all are finite)."""
    items = [(k, v.detach()) for k, v in state.items()
             if torch.is_tensor(v) and v.is_floating_point() and v.numel() and not v.is_sparse]
    if not items or bool(_all_finite([v for _, v in items])):
        return []
    return [k for k, v in items if not bool(torch.isfinite(v).all())]


class NanGuard(Callback):
    """Skip steps with a non-finite loss/gradient/buffer, stop after a run of them, never save NaN weights.

    Args:
        max_consecutive: bad steps in a row that stop the fit (``NonFiniteLossError``).
        check_gradients: also check the gradients (not only the loss) before each optimizer step.
        check_checkpoints: refuse to write a checkpoint holding non-finite weights.
    """

    def __init__(self, max_consecutive: int = 10, check_gradients: bool = True, check_checkpoints: bool = True) -> None:
        if max_consecutive < 1:
            raise ValueError(f"NanGuard: max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = int(max_consecutive)
        self.check_gradients = check_gradients
        self.check_checkpoints = check_checkpoints
        self.nonfinite_steps = 0  # skipped steps in this fit (resumes included)
        self.consecutive = 0
        self._loss_bad: torch.Tensor | None = None
        self._buffers: list[torch.Tensor] = []
        self._saved: list[torch.Tensor] = []
        self._snapshot_due = True

    # ------------------------------------------------------------------ per step
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._snapshot_due:  # the first micro-batch of an optimizer step (gradient accumulation)
            self._snapshot_buffers(pl_module)
            self._snapshot_due = False

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        flags = [] if self._loss_bad is None else [self._loss_bad]
        if self.check_gradients and not self._scaler_handles_overflow(trainer):
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                ok = _all_finite(grads)
                flags.append(~ok.to(flags[0].device) if flags else ~ok)
        # BatchNorm statistics can overflow in a forward whose loss is still finite
        stats = [b for b in self._buffers if b.is_floating_point()]
        if stats:
            ok = _all_finite(stats)
            flags.append(~ok.to(flags[0].device) if flags else ~ok)
        self._loss_bad = None
        self._snapshot_due = True
        if not flags:
            return
        bad = torch.stack(flags).any()
        if trainer.world_size > 1:  # the same decision on every rank (a rank's own loss may differ)
            bad = trainer.strategy.reduce(bad.float(), reduce_op="sum") > 0
        if not bool(bad):  # the one host sync per step
            self.consecutive = 0
            return
        optimizer.zero_grad(set_to_none=True)  # AdamW skips parameters without a gradient
        self._restore_buffers()
        self.nonfinite_steps += 1
        self.consecutive += 1
        where = f"global step {trainer.global_step}, epoch {trainer.current_epoch + 1}"  # 1-based, as progress counts
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"NanGuard: the loss, gradients or BatchNorm statistics were NaN/Inf for {self.consecutive} consecutive steps "
                f"(the last at {where}); the fit stops. Skipped steps leave the weights unchanged, so every checkpoint "
                "written holds finite weights. Lower the learning rate (or lengthen the warmup), "
                "enable gradient clipping (trainer.gradient_clip_val), or check the data."
            )
        if trainer.is_global_zero:
            log.warning("NanGuard: non-finite loss, gradient or BatchNorm statistics at %s: step skipped (%d in a row, %d in this fit)",
                        where, self.consecutive, self.nonfinite_steps)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        pl_module.log("train/nonfinite_steps", float(self.nonfinite_steps), on_step=True, on_epoch=False,
                      batch_size=1, rank_zero_only=True)

    @staticmethod
    def _scaler_handles_overflow(trainer: pl.Trainer) -> bool:
        plugin = trainer.precision_plugin
        return isinstance(plugin, MixedPrecision) and plugin.scaler is not None

    # ------------------------------------------------------------- buffers
    def _snapshot_buffers(self, pl_module: pl.LightningModule) -> None:
        """Copy every buffer (one fused copy per step; re-allocated when the architecture changed,
        e.g. after pruning)."""
        buffers = [b for b in pl_module.buffers() if b.numel()]
        same = len(buffers) == len(self._saved) and all(
            b.shape == s.shape and b.dtype == s.dtype and b.device == s.device for b, s in zip(buffers, self._saved))
        self._buffers = buffers
        if not buffers:
            self._saved = []
        elif same:
            torch._foreach_copy_(self._saved, [b.detach() for b in buffers])
        else:
            self._saved = [b.detach().clone() for b in buffers]

    def _restore_buffers(self) -> None:
        if self._buffers and len(self._buffers) == len(self._saved):
            with torch.no_grad():
                torch._foreach_copy_(self._buffers, self._saved)

    # ----------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if not self.check_checkpoints:
            return
        # Callbacks run in list order: the EMA may or may not have swapped its weights into
        # ``state_dict`` yet, so check both places and the EMA copy itself.
        states: list[tuple[str, Iterable[tuple[str, Any]]]] = [("state_dict", checkpoint.get("state_dict", {}).items())]
        if isinstance(checkpoint.get("current_model_state"), Mapping):
            states.append(("current_model_state", checkpoint["current_model_state"].items()))
        for cb in weight_averaging_callbacks(trainer):
            averaged = getattr(cb, "_average_model", None)  # Lightning keeps the AveragedModel here
            if averaged is not None:
                states.append((f"{type(cb).__name__} average", averaged.state_dict().items()))
        for where, items in states:
            bad = nonfinite_tensors(dict(items))
            if bad:
                raise NonFiniteWeightsError(
                    f"NanGuard: refusing to write a checkpoint at global step {trainer.global_step} "
                    f"(epoch {trainer.current_epoch + 1}): {len(bad)} tensors of the {where} hold NaN/Inf "
                    f"(e.g. {', '.join(bad[:3])}). The previous checkpoints are untouched."
                )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"nonfinite_steps": self.nonfinite_steps, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.nonfinite_steps = int(state_dict.get("nonfinite_steps", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))
