"""A worked example of extending detectkit with your own callback.

Everything a recipe does beyond the LightningModule lives in callbacks, and a callback written
in *your* package plugs into any experiment YAML without touching detectkit::

    trainer:
      callbacks:
        - class_path: detectkit.callbacks.examples.GradientNormMonitor   # or my_pkg.MyCallback
          init_args:
            every_n_steps: 10

Conventions the shipped callbacks follow (and this one shows):

* one concern per callback; the hooks it overrides say when it runs
  (``on_before_optimizer_step``: gradients exist and are unscaled, the step has not happened);
* constructor arguments are plain typed values, so LightningCLI can build it from YAML and
  ``config.yaml`` records them;
* anything that must survive a resume goes through ``state_dict``/``load_state_dict``
  (Lightning stores it in the checkpoint under the callback's ``state_key``);
* under DDP, log with ``sync_dist`` or only from rank zero, and never let one rank skip a
  collective the others run.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

__all__ = ["GradientNormMonitor"]


class GradientNormMonitor(Callback):
    """Log the global L2 norm of the gradients (``train/grad_norm``) and count non-finite steps.

    Why: a detector whose loss plateaus or explodes usually shows it in the gradient norm
    first; with AMP, inf/NaN gradients (skipped steps) are otherwise silent.

    Args:
        every_n_steps: log every N optimizer steps.
        norm_type: the p of the p-norm.
    """

    def __init__(self, every_n_steps: int = 10, norm_type: float = 2.0) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.norm_type = float(norm_type)
        self.nonfinite_steps = 0
        self.last_norm: float | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, norm_type=self.norm_type)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        grads = [p.grad.detach() for p in pl_module.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.float(), self.norm_type) for g in grads]), self.norm_type
        )
        self.last_norm = float(norm)
        if not math.isfinite(self.last_norm):
            self.nonfinite_steps += 1
        # after DDP's all-reduce every rank holds the same gradients: no sync needed
        pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        pl_module.log("train/nonfinite_grad_steps", float(self.nonfinite_steps), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"nonfinite_steps": self.nonfinite_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.nonfinite_steps = int(state_dict.get("nonfinite_steps", 0))
