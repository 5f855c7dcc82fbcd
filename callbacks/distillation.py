"""``KnowledgeDistillation``: a frozen teacher detector adds score, box-distribution and feature
terms to the student's loss (e.g. ``yolo_nas_m`` -> ``yolo_nas_s``, or the dense model -> its
pruned copy). The terms and the teacher live in :mod:`detectkit.compress.distill` (usable
without Lightning); this callback schedules them:

* **Registration**: in ``setup`` it registers :meth:`extra_loss` with the module's typed hook
  (``pl_module.add_loss_term``, :class:`detectkit.modules.detector.LossTermRegistry`);
  ``training_step`` adds it inside the student's autocast. Removed in ``teardown``.
* **Adapters** (``feat_weight > 0``): 1x1 convs from each student neck output to the teacher's
  channels. They train with the student: the LightningModule's declared ``distill_adapters``
  submodule (:class:`~detectkit.modules.detector.DistillationHost`; installed in ``setup`` through
  ``set_distill_adapters``, so resume restores them) that joins the optimizer in
  ``on_fit_start`` if ``configure_optimizers`` did not include them (DetectionModule optimizes
  ``self.model`` only); they never reach the detector's checkpoint keys (``model.*``) nor the
  export. Re-created when pruning changes the student's neck widths.
* **Schedule**: the total weight is ``weight * factor(epoch)``; ``factor`` is 1 (``constant``)
  or decays from 1 to ``final_ratio`` between ``start_epoch`` and the last epoch (``linear``,
  ``cosine``); 0 before ``start_epoch``.

The teacher is built in ``setup`` from a registry name (+ weights) or a LightningModule
checkpoint, kept in eval mode with gradients off, moved to the student's device on first use.
Only its *source* is saved in checkpoints. Under DDP each rank holds its own teacher; the
adapters are DDP-synchronised as part of the LightningModule.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from detectkit.callbacks.utils import detector_of, reset_weight_averaging
from lightning.pytorch.callbacks import Callback

from detectkit.checkpoint import ArchitectureRecorder
from detectkit.compress.distill import (
    SCHEDULES,
    Distiller,
    build_adapters,
    check_options,
    distillation_losses,
    load_teacher,
    neck_channels,
    schedule_factor,
)
from detectkit.models.outputs import HeadOutput
from detectkit.modules.detector import DistillationHost, LossTermRegistry

__all__ = ["KnowledgeDistillation", "distillation_losses", "load_teacher"]  # the last two re-exported

log = logging.getLogger(__name__)
LOSS_TERM = "distillation"


class KnowledgeDistillation(Callback):
    """Distil a frozen teacher into the trained detector (see the module docstring).

    Args:
        teacher: registry name (e.g. ``"yolo_nas_m"``) or a built detector.
        teacher_checkpoint: weights for the teacher (registry weights file or a detectkit ``.ckpt``).
        teacher_kwargs: extra registry builder arguments.
        weight: overall KD weight; ``cls_weight``, ``dfl_weight``, ``feat_weight`` per term.
        temperature: softening of the DFL (and ``kl`` class) distributions.
        feat_norm: ``"channel"`` (standardised feature mimicking) or ``"none"`` (raw MSE).
        schedule: ``constant``, ``linear`` or ``cosine`` decay to ``final_ratio`` of ``weight``.
        start_epoch: KD terms are 0 before it.
    """

    def __init__(
        self,
        teacher: str | nn.Module = "yolo_nas_m",
        teacher_checkpoint: str | None = None,
        teacher_kwargs: dict[str, Any] | None = None,
        weight: float = 1.0,
        cls_weight: float = 1.0,
        dfl_weight: float = 1.0,
        feat_weight: float = 0.0,
        temperature: float = 1.0,
        cls_loss: str = "bce",
        feat_norm: str = "channel",
        schedule: str = "constant",
        final_ratio: float = 0.0,
        start_epoch: int = 0,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        check_options(cls_loss, feat_norm)
        self.teacher_source = teacher if isinstance(teacher, str) else type(teacher).__name__
        self._teacher_arg = teacher
        self.teacher_checkpoint, self.teacher_kwargs = teacher_checkpoint, dict(teacher_kwargs or {})
        self.weight, self.cls_weight, self.dfl_weight, self.feat_weight = weight, cls_weight, dfl_weight, feat_weight
        self.temperature, self.cls_loss, self.feat_norm = float(temperature), cls_loss, feat_norm
        self.schedule, self.final_ratio, self.start_epoch = schedule, float(final_ratio), int(start_epoch)
        self.teacher: nn.Module | None = None
        self._max_epochs = 1
        self._module: pl.LightningModule | None = None
        self._listening: pl.LightningModule | None = None
        self.distiller: Distiller | None = None

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._module = pl_module
        student = detector_of(pl_module)
        if self.teacher is None:
            self.teacher = load_teacher(self._teacher_arg, student.num_classes, self.teacher_checkpoint,
                                        **self.teacher_kwargs)
        self._max_epochs = max(1, trainer.max_epochs or 1)
        self.distiller = Distiller(self.teacher, self.weight, self.cls_weight, self.dfl_weight, self.feat_weight,
                                   self.temperature, self.cls_loss, self.feat_norm)
        if isinstance(pl_module, LossTermRegistry):
            pl_module.add_loss_term(LOSS_TERM, self.extra_loss)
        if self.feat_weight > 0:
            if not isinstance(pl_module, DistillationHost):
                raise TypeError(f"feat_weight > 0 needs a module with declared distillation adapters "
                                f"(DistillationHost, e.g. DetectionModule), not {type(pl_module).__name__}")
            if pl_module.distill_adapters is None:
                pl_module.set_distill_adapters(self._build_adapters(student))
        if isinstance(pl_module, ArchitectureRecorder) and self._listening is not pl_module:
            # resume: after the module replays a pruned student, size the adapters as saved
            pl_module.add_restore_listener(self._restore_adapters)
            self._listening = pl_module

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and isinstance(pl_module, LossTermRegistry):
            pl_module.remove_loss_term(LOSS_TERM)

    def _restore_adapters(self, checkpoint: Mapping[str, Any]) -> None:
        """Adapters sized as saved (the student may have been pruned) before the weights load."""
        pl_module = self._module
        state = (checkpoint.get("callbacks") or {}).get(self.state_key) or {}
        sizes = state.get("adapters")
        if sizes and isinstance(pl_module, DistillationHost) and pl_module.distill_adapters is not None:
            pl_module.set_distill_adapters(nn.ModuleList(nn.Conv2d(i, o, 1) for i, o in sizes))

    def _refresh_adapters(self, pl_module: pl.LightningModule) -> bool:
        """Re-create the adapters when the student's neck widths changed (pruning); True if so."""
        adapters = _adapters(pl_module)
        if adapters is None:
            return False
        student = detector_of(pl_module)
        channels = neck_channels(student)
        if channels == [a.in_channels for a in adapters]:
            return False
        new = self._build_adapters(student).to(next(student.parameters()).device)
        pl_module.set_distill_adapters(new)
        log.info("KD: student neck widths changed to %s: feature adapters re-created", channels)
        return True

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """First batch of an epoch (after pruning/QAT epoch-start surgery): adapters fit and are optimised."""
        if batch_idx != 0 or _adapters(pl_module) is None:
            return
        if self._refresh_adapters(pl_module):
            reset_weight_averaging(trainer, pl_module)
        self.on_fit_start(trainer, pl_module)  # optimizer rebuilt by surgery -> re-add the adapters

    def _build_adapters(self, student: nn.Module) -> nn.ModuleList:
        """1x1 conv per neck level, channels read from one tiny forward of each model."""
        assert self.teacher is not None
        return build_adapters(student, self.teacher)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Runs after ``configure_optimizers`` and before optimizer state is restored on resume."""
        adapters = _adapters(pl_module)
        if adapters is None or not trainer.optimizers:
            return
        optimizer = trainer.optimizers[0]
        known = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [p for p in adapters.parameters() if id(p) not in known]
        if missing:
            optimizer.add_param_group({"params": missing, "weight_decay": 0.0, "name": "distill_adapters"})
            for cfg in trainer.lr_scheduler_configs:  # LambdaLR & co: the new group follows group 0's curve
                sched = cfg.scheduler
                if hasattr(sched, "lr_lambdas"):
                    sched.lr_lambdas.append(sched.lr_lambdas[0])
                if hasattr(sched, "base_lrs"):
                    sched.base_lrs.append(optimizer.param_groups[-1].get("initial_lr", optimizer.param_groups[-1]["lr"]))
                    optimizer.param_groups[-1].setdefault("initial_lr", sched.base_lrs[-1])

    # ------------------------------------------------------------------ the loss
    def factor(self, epoch: int) -> float:
        """Schedule multiplier of ``weight`` at ``epoch``."""
        return schedule_factor(epoch, self._max_epochs, self.schedule, self.final_ratio, self.start_epoch)

    def extra_loss(
        self, pl_module: pl.LightningModule, batch: Any, images: torch.Tensor, head: HeadOutput
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The registered :class:`~detectkit.modules.detector.ExtraLoss` (called inside ``training_step``)."""
        if self.distiller is None:
            raise RuntimeError("KnowledgeDistillation.setup did not run")
        adapters = _adapters(pl_module)
        return self.distiller(images, head, adapters, self.factor(pl_module.current_epoch))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        # the teacher's source, never its weights; adapter sizes so resume can rebuild them
        adapters = _adapters(self._module)
        sizes = [[a.in_channels, a.out_channels] for a in adapters] if adapters is not None else None
        return {"teacher": self.teacher_source, "teacher_checkpoint": self.teacher_checkpoint, "adapters": sizes}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("teacher") not in (None, self.teacher_source):
            log.warning("KD: checkpoint was distilled from %s, resuming with %s", state_dict["teacher"],
                        self.teacher_source)


def _adapters(pl_module: Any) -> nn.ModuleList | None:
    """The module's declared distillation adapters (None: none yet, or not a DistillationHost)."""
    return pl_module.distill_adapters if isinstance(pl_module, DistillationHost) else None
