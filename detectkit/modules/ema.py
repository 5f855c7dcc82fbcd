"""super-gradients' model EMA expressed as a Lightning ``WeightAveraging`` callback.

SG's ``ModelEMA`` keeps a moving average of every floating-point entry of the state dict
(parameters AND BatchNorm running statistics), updated after each optimizer step with a decay
that ramps up with the step count (``decay_type``: ``threshold`` = ``min(decay, (1+s)/(10+s))``,
``exp`` = ``decay * (1 - exp(-beta * s / total))``, ``constant``). Lightning's
``EMAWeightAveraging`` only knows a constant decay, so we subclass ``WeightAveraging`` with SG's
decay function. The step ``s`` is the AveragedModel's ``n_averaged`` counter (1 at the first
update, like SG's ``global_step``), which lives in the checkpoint's ``averaging_state`` and so
survives resume. Validation runs on the averaged weights and checkpoints hold them as
``state_dict`` (the raw weights go to ``current_model_state``): both from ``WeightAveraging``.

Frozen entries (parameters with ``requires_grad=False``, buffers of layers kept in eval mode
while training, e.g. a frozen backbone's BatchNorm statistics: ``model.freeze``) are copied, not
averaged: ``a * d + a * (1 - d)`` is not ``a`` in floating point, and they must stay equal.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import WeightAveraging

__all__ = ["ModelEMA", "ema_decay", "keep_frozen_equal"]

DECAY_TYPES = ("threshold", "exp", "constant")


def ema_decay(decay: float, step: int, total_steps: int, decay_type: str = "threshold", beta: float = 15.0) -> float:
    """SG's ``EMA_DECAY_FUNCTIONS``: the decay used at update number ``step`` (1-based)."""
    if decay_type == "threshold":
        return min(decay, (1.0 + step) / (10.0 + step))
    if decay_type == "exp":
        return decay * (1.0 - math.exp(-beta * step / max(1, total_steps)))
    if decay_type == "constant":
        return decay
    raise ValueError(f"decay_type must be one of {DECAY_TYPES}, got {decay_type!r}")


@torch.no_grad()
def keep_frozen_equal(average: torch.nn.Module, model: torch.nn.Module) -> None:
    """Copy into ``average`` (a copy of ``model``) what training cannot change: frozen parameters
    and, while ``model`` trains, the buffers of its submodules in eval mode."""
    for a, p in zip(average.parameters(), model.parameters()):
        if not p.requires_grad:
            a.copy_(p)
    if model.training:
        for am, m in zip(average.modules(), model.modules()):
            if not m.training:
                for a, b in zip(am.buffers(recurse=False), m.buffers(recurse=False)):
                    a.copy_(b)


class ModelEMA(WeightAveraging):
    """EMA of weights and BN buffers with SG's decay ramp; validation/checkpoints use the average.

    Defaults are the YOLO-NAS COCO recipe (``decay=0.9997, decay_type="threshold"``).
    """

    def __init__(
        self,
        decay: float = 0.9997,
        decay_type: str = "threshold",
        beta: float = 15.0,
        device: str | None = None,
    ) -> None:
        if decay_type not in DECAY_TYPES:
            raise ValueError(f"decay_type must be one of {DECAY_TYPES}, got {decay_type!r}")
        super().__init__(device=device, use_buffers=True, avg_fn=self._average)
        self.decay = decay
        self.decay_type = decay_type
        self.beta = beta
        self.total_steps = 1

    def _average(self, averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        if not averaged.is_floating_point():  # e.g. num_batches_tracked: not averaged by SG either
            return current
        d = ema_decay(self.decay, int(num_averaged), self.total_steps, self.decay_type, self.beta)
        return averaged * d + current.to(averaged.dtype) * (1.0 - d)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self._average_model is not None:
            # AveragedModel copies the model on its first update; SG instead blends the initial
            # weights in from the first step. Counting the initial copy as one update does that.
            self._average_model.n_averaged.fill_(1)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._average_model is not None:
            keep_frozen_equal(self._average_model.module, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.total_steps = max(1, int(trainer.estimated_stepping_batches))

    @property
    def averaged_module(self) -> torch.nn.Module | None:
        """The module holding the averaged weights (None outside fit)."""
        return None if self._average_model is None else self._average_model.module

    def current_decay(self) -> float:
        """Decay that the next update will use (for logging)."""
        if self._average_model is None:
            return 0.0
        n = int(self._average_model.n_averaged)
        return ema_decay(self.decay, n, self.total_steps, self.decay_type, self.beta)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "total_steps": self.total_steps}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Outside fit (validate/test/predict of a checkpoint) there is no average to restore: the
        checkpoint's ``state_dict`` already holds the averaged weights, which is exactly what an
        evaluation should score, so Lightning's "state cannot be restored" warning is noise."""
        if self._average_model is None:
            return
        super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.total_steps = state_dict.get("total_steps", self.total_steps)
