"""Helpers the compression callbacks share: find the detector, the EMA, rebuild optimizers.

Pruning and QAT replace parameters mid-fit. Lightning keeps references to the old ones in the
optimizers, the LR schedulers and a ``WeightAveraging`` copy, so each change of architecture
ends with :func:`rebuild_after_surgery`. Resume does not happen here: the callbacks append
architecture ops to the module (``pl_module.record_architecture``) and the module's
``on_load_checkpoint`` replays them (``detectkit.checkpoint.replay_architecture``).

Private Lightning attributes: only two remain, both here. ``WeightAveraging`` has no public
accessor for its averaged copy (``_average_model``; detectkit's ``ModelEMA.averaged_module`` is
used when the callback is one), and a DDP strategy has no public way to wrap a module again after
its parameters were replaced (``strategy._setup_model``).
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch.nn as nn
from lightning.pytorch.callbacks import WeightAveraging

log = logging.getLogger(__name__)

__all__ = [
    "detector_of",
    "weight_averaging_callbacks",
    "copy_average_to_model",
    "rebuild_after_surgery",
    "averaged_module",
    "reset_weight_averaging",
]


def detector_of(pl_module: nn.Module) -> nn.Module:
    """The ``Detector`` a LightningModule trains (``pl_module.model``), or the module itself."""
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, nn.Module) else pl_module


def weight_averaging_callbacks(trainer: pl.Trainer) -> list[WeightAveraging]:
    return [cb for cb in trainer.callbacks if isinstance(cb, WeightAveraging)]


def averaged_module(cb: WeightAveraging) -> nn.Module | None:
    """The module holding ``cb``'s averaged weights, or None before the first fit step."""
    from detectkit.modules.ema import ModelEMA

    if isinstance(cb, ModelEMA):
        return cb.averaged_module
    averaged = getattr(cb, "_average_model", None)  # WeightAveraging exposes no public accessor
    return None if averaged is None else averaged.module


def reset_weight_averaging(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Restart every running average from the module's current (new) architecture."""
    for cb in weight_averaging_callbacks(trainer):
        if averaged_module(cb) is not None:
            cb.setup(trainer, pl_module, "fit")


def copy_average_to_model(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Load the EMA weights into the module (surgery starts from the weights that get validated)."""
    import torch

    copied = False
    for cb in weight_averaging_callbacks(trainer):
        averaged = averaged_module(cb)
        if averaged is None:
            continue
        avg = averaged.state_dict()
        with torch.no_grad():
            for k, dst in pl_module.state_dict().items():
                if k in avg and avg[k].shape == dst.shape:
                    dst.copy_(avg[k])
        copied = True
    return copied


def rebuild_after_surgery(
    trainer: pl.Trainer, pl_module: pl.LightningModule, lr_factor: float = 1.0, reset_averaging: bool = True
) -> None:
    """Re-create optimizers/schedulers (keeping the schedule position) and the EMA copy.

    Optimizer moments of replaced parameters are dropped (their shapes changed); the schedulers'
    step counters are carried over so the LR curve continues; ``lr_factor`` scales every base LR
    (QAT fine-tunes at a lower LR). Under DDP the module is wrapped again so the reducer sees the
    new parameters.
    """
    strategy = trainer.strategy
    if trainer.world_size > 1 and hasattr(strategy, "_setup_model") and strategy.model is not pl_module:
        strategy.model = strategy._setup_model(pl_module)  # DDP: new reducer over the new parameters
    old = [(cfg.scheduler.state_dict() if hasattr(cfg.scheduler, "state_dict") else None) for cfg in trainer.lr_scheduler_configs]
    strategy.setup_optimizers(trainer)
    for cfg, state in zip(trainer.lr_scheduler_configs, old):
        if state is not None and "last_epoch" in state:
            sched = cfg.scheduler  # only the position: base LRs and groups are the new optimizer's
            position = {k: state[k] for k in ("last_epoch", "_step_count") if k in state}
            sched.load_state_dict({**sched.state_dict(), **position})
    if lr_factor != 1.0:
        for cfg in trainer.lr_scheduler_configs:
            if hasattr(cfg.scheduler, "base_lrs"):
                cfg.scheduler.base_lrs = [lr * lr_factor for lr in cfg.scheduler.base_lrs]
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] *= lr_factor
                if "initial_lr" in group:
                    group["initial_lr"] *= lr_factor
    # put each group's LR where the schedule is now
    for cfg in trainer.lr_scheduler_configs:
        sched = cfg.scheduler
        if hasattr(sched, "get_lr") and hasattr(sched, "last_epoch") and hasattr(sched, "lr_lambdas"):
            for group, lr in zip(sched.optimizer.param_groups, sched.get_lr()):
                group["lr"] = lr
    if reset_averaging:
        reset_weight_averaging(trainer, pl_module)  # a fresh average of the new architecture
