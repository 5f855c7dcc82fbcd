"""Learning-rate schedule of the super-gradients YOLO-NAS recipe, as a per-step multiplier.

SG (``LinearBatchLRWarmup`` + ``CosineLRScheduler``): the lr climbs linearly from
``warmup_initial_lr`` to ``lr`` over ``warmup_steps`` optimizer steps (``np.linspace`` with the
end point included), then follows ``0.5 * lr * (1 + cos(pi * t / (T + 1)))`` rescaled so that it
ends at ``final_lr_ratio * lr``, where ``t`` counts steps after the warmup and ``T`` is the number
of post-warmup steps. SG caps the warmup at one epoch; we do not (a cap tied to the epoch length
would change the recipe when the dataset size changes), but we cap it at the total steps.

``warmup_epochs`` is SG's ``LinearEpochLRWarmup`` (the fine-tuning recipes): the lr is constant
within an epoch and climbs in ``warmup_epochs`` even steps from ``warmup_initial_lr``, reaching
``lr`` at epoch ``warmup_epochs``; the cosine then runs over the remaining steps.

:class:`OptimConfig` groups the optimiser and schedule settings (``model.optim`` in a recipe).
``warmup_fraction`` sizes the warm-up as a share of the run, so one recipe fits a 30-step
laptop run and a 300-epoch COCO run alike (a fixed 1000 steps is longer than a small run).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["OptimConfig", "warmup_cosine_factor", "warmup_cosine_scheduler"]

log = logging.getLogger("detectkit.modules")


@dataclass
class OptimConfig:
    """AdamW (no decay on biases / norm params) and the warm-up + cosine schedule.

    Args:
        lr, weight_decay, betas: AdamW.
        warmup_steps: SG's per-step linear warm-up (``LinearBatchLRWarmup``) in optimizer steps.
        warmup_epochs: SG's per-epoch warm-up (``LinearEpochLRWarmup``, fine-tuning recipes);
            replaces ``warmup_steps`` when > 0.
        warmup_fraction: per-step warm-up over this share of the run's optimizer steps (0..1);
            replaces ``warmup_steps`` when > 0. Fits any run length.
        warmup_initial_lr: the absolute lr the warm-up starts from.
        final_lr_ratio: where the cosine ends, as a fraction of ``lr``.
        lr_mult: per-group learning-rate multipliers, ``{pattern: factor}`` over the detector's
            parameter names (a module prefix such as ``backbone`` or an fnmatch pattern; the first
            matching pattern wins). The whole schedule of a group is scaled, warm-up included.
    """

    lr: float = 2e-4
    weight_decay: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 1000
    warmup_epochs: int = 0
    warmup_fraction: float = 0.0
    warmup_initial_lr: float = 1e-6
    final_lr_ratio: float = 0.1
    lr_mult: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lr_mult = {str(k): float(v) for k, v in (self.lr_mult or {}).items()}
        bad = [k for k, v in self.lr_mult.items() if not v > 0]
        if bad:
            raise ValueError(f"optim.lr_mult[{bad[0]!r}] must be > 0 (freeze parameters with model.freeze)")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"optim.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.warmup_steps < 0 or self.warmup_epochs < 0:
            raise ValueError("optim.warmup_steps and optim.warmup_epochs must be >= 0")
        if self.warmup_fraction > 0 and self.warmup_epochs > 0:
            raise ValueError("optim: give warmup_epochs or warmup_fraction, not both")

    def warmup_length(self, total_steps: int, steps_per_epoch: int) -> int:
        """The warm-up in optimizer steps for a run of ``total_steps``."""
        if self.warmup_fraction > 0:
            return int(round(self.warmup_fraction * total_steps))
        if self.warmup_epochs > 0:
            return self.warmup_epochs * max(1, steps_per_epoch)
        return self.warmup_steps

    def scheduler(self, optimizer: Optimizer, total_steps: int, steps_per_epoch: int) -> LambdaLR:
        """The schedule for a run of ``total_steps``; says so once when the warm-up takes half of
        the run or more (the lr would barely leave the warm-up before the run ends)."""
        warmup = self.warmup_length(total_steps, steps_per_epoch)
        if total_steps > 0 and warmup >= total_steps / 2:
            log.warning("the lr warm-up (%d steps) is %d%% of this run's %d steps: set model.optim.warmup_fraction "
                        "(e.g. 0.1) for a run this short", warmup, round(100 * warmup / total_steps), total_steps)
        steps = warmup if self.warmup_fraction > 0 else self.warmup_steps
        return warmup_cosine_scheduler(optimizer, total_steps, steps, self.warmup_initial_lr, self.final_lr_ratio,
                                       warmup_epochs=self.warmup_epochs, steps_per_epoch=steps_per_epoch)


def warmup_cosine_factor(
    step: int,
    total_steps: int,
    warmup_steps: int,
    warmup_start_ratio: float,
    final_lr_ratio: float,
    warmup_epochs: int = 0,
    steps_per_epoch: int = 1,
) -> float:
    """The multiplier of the base lr used for optimizer step ``step`` (0-based)."""
    if warmup_epochs > 0:
        steps_per_epoch = max(1, steps_per_epoch)
        warmup_steps = warmup_epochs * steps_per_epoch
        if step < warmup_steps:
            return warmup_start_ratio + (1.0 - warmup_start_ratio) * (step // steps_per_epoch) / warmup_epochs
    warmup_steps = max(0, min(warmup_steps, total_steps))
    if step < warmup_steps:
        if warmup_steps == 1:
            return 1.0
        return warmup_start_ratio + (1.0 - warmup_start_ratio) * step / (warmup_steps - 1)
    t = step - warmup_steps
    t_max = max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(t, t_max) / (t_max + 1)))
    return cosine * (1.0 - final_lr_ratio) + final_lr_ratio


def warmup_cosine_scheduler(
    optimizer: Optimizer,
    total_steps: int,
    warmup_steps: int,
    warmup_initial_lr: float,
    final_lr_ratio: float,
    warmup_epochs: int = 0,
    steps_per_epoch: int = 1,
) -> LambdaLR:
    """A ``LambdaLR`` (stepped once per optimizer step) implementing :func:`warmup_cosine_factor`.

    ``warmup_initial_lr`` is absolute (as in SG), turned into a ratio per parameter group; a
    group's ``lr_mult`` (:func:`detectkit.modules.detector.param_groups`) scales it too, so that
    group follows the same curve times its multiplier.
    """
    lambdas = []
    for group in optimizer.param_groups:
        base = group.get("initial_lr", group["lr"])
        ratio = warmup_initial_lr * group.get("lr_mult", 1.0) / base if base > 0 else 1.0
        lambdas.append(
            partial(
                warmup_cosine_factor,
                total_steps=total_steps,
                warmup_steps=warmup_steps,
                warmup_start_ratio=ratio,
                final_lr_ratio=final_lr_ratio,
                warmup_epochs=warmup_epochs,
                steps_per_epoch=steps_per_epoch,
            )
        )
    return LambdaLR(optimizer, lambdas)
