"""``KnowledgeDistillation``: a frozen teacher detector adds score, box-distribution and feature
terms to the student's loss (e.g. ``yolo_nas_m`` -> ``yolo_nas_s``).

* **Scores**: BCE of the student's class logits against the teacher's sigmoid probabilities
  (``cls_loss="bce"``; or ``"kl"``: temperature-scaled KL over the class softmax), mean per anchor.
* **Boxes**: KL between teacher and student DFL distributions per side (temperature ``T``,
  scaled by ``T**2``), weighted per anchor by the teacher's best class probability so the
  foreground, not the background, drives it. Needs the same ``bins`` (YOLO-NAS 17, YOLO-World 16).
* **Features** (``feat_weight > 0``): 1x1 conv adapters map each student neck output to the
  teacher's channels, MSE against the teacher's. The adapters train with the student: they
  are a submodule of the LightningModule (``distill_adapters``, created in ``setup`` so resume
  restores them) and join the optimizer in ``on_fit_start`` if ``configure_optimizers`` did not
  include them (DetectionModule optimizes ``self.model`` only); they never reach the detector's
  checkpoint keys (``model.*``) nor the export.
* **Schedule**: the total weight is ``weight * factor(epoch)``; ``factor`` is 1 (``constant``)
  or decays from 1 to ``final_ratio`` between ``start_epoch`` and the last epoch (``linear``,
  ``cosine``); 0 before ``start_epoch``.

The teacher is built in ``setup`` from a registry name (+ weights) or a LightningModule
checkpoint, kept in eval mode with gradients off, moved to the student's device on first use,
and run under the same autocast as the student's forward (the hook is called from inside
``training_step``). Only its *source* is saved in checkpoints. Under DDP each rank holds its
own teacher; the adapters are DDP-synchronised as part of the LightningModule. The training
module calls ``callback.extra_loss(module, batch, images, head)`` for every callback that has it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from detectkit.callbacks.utils import detector_of, weight_averaging_callbacks
from lightning.pytorch.callbacks import Callback

from detectkit.checkpoint import ArchitectureRecorder
from detectkit.models.outputs import HeadOutput

__all__ = ["KnowledgeDistillation", "distillation_losses", "load_teacher"]

log = logging.getLogger(__name__)
ADAPTERS_ATTR = "distill_adapters"


def load_teacher(teacher: str | nn.Module, num_classes: int, checkpoint: str | None = None, **kwargs: Any) -> nn.Module:
    """A registry name (+ weights file: detectkit ``.ckpt``, super-gradients ``.pth``, ...), or a module.

    The file is read by ``detectkit.checkpoint`` (safe unpickling, integrity check; a detectkit
    ``.ckpt`` gives its EMA weights and recorded architecture).
    """
    if isinstance(teacher, nn.Module):
        model = teacher
    else:
        from detectkit.registry import create_model

        model = create_model(teacher, num_classes=num_classes, checkpoint=checkpoint, **kwargs)
    model.eval().requires_grad_(False)
    return model


def distillation_losses(
    student: HeadOutput,
    teacher: HeadOutput,
    temperature: float = 1.0,
    cls_loss: str = "bce",
    adapters: nn.ModuleList | None = None,
) -> dict[str, torch.Tensor]:
    """The three KD terms (fp32) from the student's and the teacher's raw head outputs."""
    s_cls, t_cls = student.cls_logits.float(), teacher.cls_logits.float()
    if s_cls.shape != t_cls.shape:
        raise ValueError(f"student/teacher class logits differ: {tuple(s_cls.shape)} vs {tuple(t_cls.shape)}")
    t_prob = t_cls.sigmoid()
    if cls_loss == "bce":
        kd_cls = F.binary_cross_entropy_with_logits(s_cls, t_prob, reduction="none").sum(-1).mean()
    elif cls_loss == "kl":
        t = temperature
        kd_cls = F.kl_div(F.log_softmax(s_cls / t, -1), F.log_softmax(t_cls / t, -1), reduction="none", log_target=True)
        kd_cls = kd_cls.sum(-1).mean() * t * t
    else:
        raise ValueError(f"cls_loss must be 'bce' or 'kl', got {cls_loss!r}")

    if student.bins != teacher.bins:
        raise ValueError(f"DFL bins differ (student {student.bins}, teacher {teacher.bins})")
    b, a, _ = student.reg_distri.shape
    s_reg = student.reg_distri.float().reshape(b, a, 4, student.bins)
    t_reg = teacher.reg_distri.float().reshape(b, a, 4, teacher.bins)
    t = temperature
    kl = F.kl_div(F.log_softmax(s_reg / t, -1), F.log_softmax(t_reg / t, -1), reduction="none", log_target=True)
    kl = kl.sum(-1).mean(-1) * t * t  # [B,A]
    weight = t_prob.max(-1).values
    kd_dfl = (kl * weight).sum() / weight.sum().clamp(min=1e-6)

    kd_feat = s_cls.new_zeros(())
    if adapters is not None and len(adapters):
        terms = [F.mse_loss(ad(sf).float(), tf.float()) for ad, sf, tf in zip(adapters, student.feats, teacher.feats)]
        kd_feat = torch.stack(terms).mean()
    return {"kd_cls": kd_cls, "kd_dfl": kd_dfl, "kd_feat": kd_feat}


class KnowledgeDistillation(Callback):
    """Distil a frozen teacher into the trained detector (see the module docstring).

    Args:
        teacher: registry name (e.g. ``"yolo_nas_m"``) or a built detector.
        teacher_checkpoint: weights for the teacher (registry weights file or a detectkit ``.ckpt``).
        teacher_kwargs: extra registry builder arguments.
        weight: overall KD weight; ``cls_weight``, ``dfl_weight``, ``feat_weight`` per term.
        temperature: softening of the DFL (and ``kl`` class) distributions.
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
        schedule: str = "constant",
        final_ratio: float = 0.0,
        start_epoch: int = 0,
    ) -> None:
        if schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"schedule must be constant, linear or cosine, got {schedule!r}")
        self.teacher_source = teacher if isinstance(teacher, str) else type(teacher).__name__
        self._teacher_arg = teacher
        self.teacher_checkpoint, self.teacher_kwargs = teacher_checkpoint, dict(teacher_kwargs or {})
        self.weight, self.cls_weight, self.dfl_weight, self.feat_weight = weight, cls_weight, dfl_weight, feat_weight
        self.temperature, self.cls_loss = float(temperature), cls_loss
        self.schedule, self.final_ratio, self.start_epoch = schedule, float(final_ratio), int(start_epoch)
        self.teacher: nn.Module | None = None
        self._max_epochs = 1
        self._module: pl.LightningModule | None = None
        self._listening: pl.LightningModule | None = None

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
        if self.feat_weight > 0 and not hasattr(pl_module, ADAPTERS_ATTR):
            setattr(pl_module, ADAPTERS_ATTR, self._build_adapters(student))
        if isinstance(pl_module, ArchitectureRecorder) and self._listening is not pl_module:
            # resume: after the module replays a pruned student, size the adapters as saved
            pl_module.add_restore_listener(self._restore_adapters)
            self._listening = pl_module

    def _restore_adapters(self, checkpoint: Mapping[str, Any]) -> None:
        """Adapters sized as saved (the student may have been pruned) before the weights load."""
        pl_module = self._module
        state = (checkpoint.get("callbacks") or {}).get(self.state_key) or {}
        sizes = state.get("adapters")
        if sizes and pl_module is not None and getattr(pl_module, ADAPTERS_ATTR, None) is not None:
            setattr(pl_module, ADAPTERS_ATTR, nn.ModuleList(nn.Conv2d(i, o, 1) for i, o in sizes))

    def _refresh_adapters(self, pl_module: pl.LightningModule) -> bool:
        """Re-create the adapters when the student's neck widths changed (pruning); True if so."""
        adapters = getattr(pl_module, ADAPTERS_ATTR, None)
        if adapters is None:
            return False
        student = detector_of(pl_module)
        x = torch.zeros(1, 3, 64, 64, device=next(student.parameters()).device)
        was_training = student.training
        student.eval()
        with torch.no_grad():
            channels = [f.shape[1] for f in student.head_forward(x).feats]
        student.train(was_training)
        if channels == [a.in_channels for a in adapters]:
            return False
        new = self._build_adapters(student).to(x.device)
        setattr(pl_module, ADAPTERS_ATTR, new)
        log.info("KD: student neck widths changed to %s: feature adapters re-created", channels)
        return True

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """First batch of an epoch (after pruning/QAT epoch-start surgery): adapters fit and are optimised."""
        if batch_idx != 0 or getattr(pl_module, ADAPTERS_ATTR, None) is None:
            return
        if self._refresh_adapters(pl_module):
            for ema in weight_averaging_callbacks(trainer):
                if getattr(ema, "_average_model", None) is not None:
                    ema.setup(trainer, pl_module, "fit")
        self.on_fit_start(trainer, pl_module)  # optimizer rebuilt by surgery -> re-add the adapters

    def _build_adapters(self, student: nn.Module) -> nn.ModuleList:
        """1x1 conv per neck level, channels read from one tiny forward of each model."""
        x = torch.zeros(1, 3, 64, 64, device=next(student.parameters()).device)
        was_training = student.training
        student.eval()
        with torch.no_grad():
            s_feats = student.head_forward(x).feats
            t_feats = self.teacher.to(x.device).head_forward(x).feats
        student.train(was_training)
        if len(s_feats) != len(t_feats):
            raise ValueError(f"student has {len(s_feats)} neck outputs, teacher {len(t_feats)}")
        return nn.ModuleList(nn.Conv2d(s.shape[1], t.shape[1], 1) for s, t in zip(s_feats, t_feats))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Runs after ``configure_optimizers`` and before optimizer state is restored on resume."""
        adapters = getattr(pl_module, ADAPTERS_ATTR, None)
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
        if epoch < self.start_epoch:
            return 0.0
        if self.schedule == "constant":
            return 1.0
        span = max(1, self._max_epochs - 1 - self.start_epoch)
        progress = min(1.0, (epoch - self.start_epoch) / span)
        if self.schedule == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.final_ratio + (1.0 - self.final_ratio) * shape

    def extra_loss(
        self, pl_module: pl.LightningModule, batch: Any, images: torch.Tensor, head: HeadOutput
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Called by the training module inside ``training_step`` (same autocast as the student)."""
        assert self.teacher is not None, "KnowledgeDistillation.setup did not run"
        if next(self.teacher.parameters()).device != images.device:
            self.teacher.to(images.device)
        self.teacher.eval()
        with torch.no_grad():
            t_head = self.teacher.head_forward(images)
        adapters = getattr(pl_module, ADAPTERS_ATTR, None) if self.feat_weight > 0 else None
        terms = distillation_losses(head, t_head, self.temperature, self.cls_loss, adapters)
        w = self.weight * self.factor(pl_module.current_epoch)
        loss = w * (self.cls_weight * terms["kd_cls"] + self.dfl_weight * terms["kd_dfl"]
                    + self.feat_weight * terms["kd_feat"])
        logs = {k: float(v.detach()) for k, v in terms.items()}
        logs["kd_weight"] = w
        return loss, logs

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        # the teacher's source, never its weights; adapter sizes so resume can rebuild them
        adapters = getattr(self._module, ADAPTERS_ATTR, None) if self._module is not None else None
        sizes = [[a.in_channels, a.out_channels] for a in adapters] if adapters is not None else None
        return {"teacher": self.teacher_source, "teacher_checkpoint": self.teacher_checkpoint, "adapters": sizes}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("teacher") not in (None, self.teacher_source):
            log.warning("KD: checkpoint was distilled from %s, resuming with %s", state_dict["teacher"],
                        self.teacher_source)
