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
"""

from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


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

    ``warmup_initial_lr`` is absolute (as in SG), turned into a ratio per parameter group.
    """
    lambdas = []
    for group in optimizer.param_groups:
        base = group.get("initial_lr", group["lr"])
        ratio = warmup_initial_lr / base if base > 0 else 1.0
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
