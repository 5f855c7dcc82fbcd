"""Knowledge distillation without Lightning: the loss terms, the teacher, the feature adapters.

:class:`Distiller` turns a frozen teacher into one extra loss on a student's raw head output;
a plain PyTorch loop calls ``loss, logs = distiller(images, student_head)`` and adds ``loss``.
:class:`detectkit.callbacks.KnowledgeDistillation` schedules it during a fit (weight schedule,
adapters in the optimizer, resume) and registers it with the module as a loss term.

Terms (all fp32, whatever the autocast):

* **Scores**: BCE of the student's class logits against the teacher's sigmoid probabilities
  (``cls_loss="bce"``) or temperature-scaled KL over the class softmax (``"kl"``), mean per anchor.
* **Boxes**: KL between teacher and student DFL distributions per side (temperature ``T``, scaled
  by ``T**2``), weighted per anchor by the teacher's best class probability so the foreground,
  not the background, drives it. Needs the same ``bins`` (YOLO-NAS 17, YOLO-World 16).
* **Features**: 1x1 conv adapters map each student neck output to the teacher's channels. With
  ``feat_norm="channel"`` (default) both sides are standardised per channel over the batch and
  positions before the MSE (the Pearson-correlation mimicking of PKD, Cao et al. 2022): raw MSE
  is dominated by the few channels with the largest activations and its scale differs between
  neck levels and teachers, which made the feature term either swamp the detection loss or do
  nothing; standardised, every level contributes on the same scale (about 2 at random, 0 when
  the student's features are an affine map of the teacher's). ``"none"`` keeps the raw MSE.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from detectkit.models.outputs import HeadOutput

__all__ = [
    "CLS_LOSSES", "FEAT_NORMS", "SCHEDULES", "Distiller", "check_options", "build_adapters", "distillation_losses", "load_teacher",
    "schedule_factor",
]

CLS_LOSSES = ("bce", "kl")
FEAT_NORMS = ("channel", "none")
SCHEDULES = ("constant", "linear", "cosine")


def load_teacher(teacher: str | nn.Module, num_classes: int, checkpoint: str | None = None, **kwargs: Any) -> nn.Module:
    """A registry name (+ weights file: detectkit ``.ckpt``, super-gradients ``.pth``, ...), or a module.

    The file is read by ``detectkit.checkpoint`` (safe unpickling, integrity check; a detectkit
    ``.ckpt`` gives its EMA weights and recorded architecture). Returned frozen, in eval mode.
    """
    if isinstance(teacher, nn.Module):
        model = teacher
    else:
        from detectkit.checkpoint import create_model  # a teacher may be a detectkit .ckpt

        model = create_model(teacher, num_classes=num_classes, checkpoint=checkpoint, **kwargs)
    model.eval().requires_grad_(False)
    return model


def check_options(cls_loss: str = "bce", feat_norm: str = "channel") -> None:
    """Refuse an unknown score loss or feature normalisation (the callback calls this at
    construction, so a typo in a recipe fails when the config is parsed, not at ``setup``)."""
    if cls_loss not in CLS_LOSSES:
        raise ValueError(f"cls_loss must be one of {CLS_LOSSES}, got {cls_loss!r}")
    if feat_norm not in FEAT_NORMS:
        raise ValueError(f"feat_norm must be one of {FEAT_NORMS}, got {feat_norm!r}")


def _standardise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Zero mean, unit variance per channel over batch and positions."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
    return (x - mean) / (std + eps)


def feature_loss(student_feats, teacher_feats, adapters: nn.ModuleList, feat_norm: str = "channel") -> torch.Tensor:
    """Mean over neck levels of the (standardised) MSE between adapted student and teacher features."""
    check_options(feat_norm=feat_norm)
    terms = []
    for ad, sf, tf in zip(adapters, student_feats, teacher_feats):
        s, t = ad(sf.float()), tf.float()
        if feat_norm == "channel":
            s, t = _standardise(s), _standardise(t)
        terms.append(F.mse_loss(s, t))
    return torch.stack(terms).mean()


def distillation_losses(
    student: HeadOutput,
    teacher: HeadOutput,
    temperature: float = 1.0,
    cls_loss: str = "bce",
    adapters: nn.ModuleList | None = None,
    feat_norm: str = "channel",
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
        raise ValueError(f"cls_loss must be one of {CLS_LOSSES}, got {cls_loss!r}")

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
        kd_feat = feature_loss(student.feats, teacher.feats, adapters, feat_norm)
    return {"kd_cls": kd_cls, "kd_dfl": kd_dfl, "kd_feat": kd_feat}


def neck_channels(model: nn.Module, image_size: int = 64) -> list[int]:
    """Channels of each neck output (``head_forward(x).feats``) from one tiny eval forward."""
    x = torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        channels = [f.shape[1] for f in model.head_forward(x).feats]
    model.train(was_training)
    return channels


def build_adapters(student: nn.Module, teacher: nn.Module) -> nn.ModuleList:
    """1x1 conv per neck level from the student's to the teacher's channels."""
    s, t = neck_channels(student), neck_channels(teacher.to(next(student.parameters()).device))
    if len(s) != len(t):
        raise ValueError(f"student has {len(s)} neck outputs, teacher {len(t)}")
    return nn.ModuleList(nn.Conv2d(i, o, 1) for i, o in zip(s, t))


def schedule_factor(epoch: int, max_epochs: int, schedule: str = "constant", final_ratio: float = 0.0,
                    start_epoch: int = 0) -> float:
    """Multiplier of the KD weight at ``epoch``: 0 before ``start_epoch``, then 1 or a decay to ``final_ratio``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if epoch < start_epoch:
        return 0.0
    if schedule == "constant":
        return 1.0
    span = max(1, max_epochs - 1 - start_epoch)
    progress = min(1.0, (epoch - start_epoch) / span)
    shape = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return final_ratio + (1.0 - final_ratio) * shape


class Distiller:
    """A frozen teacher and the KD weights: ``distiller(images, student_head) -> (loss, logs)``.

    ``adapters`` (from :func:`build_adapters`) must be trained with the student when
    ``feat_weight > 0``; ``factor`` scales the whole term (a schedule's value).
    """

    def __init__(
        self,
        teacher: nn.Module,
        weight: float = 1.0,
        cls_weight: float = 1.0,
        dfl_weight: float = 1.0,
        feat_weight: float = 0.0,
        temperature: float = 1.0,
        cls_loss: str = "bce",
        feat_norm: str = "channel",
    ) -> None:
        check_options(cls_loss, feat_norm)
        self.teacher = teacher.eval().requires_grad_(False)
        self.weight, self.cls_weight, self.dfl_weight, self.feat_weight = weight, cls_weight, dfl_weight, feat_weight
        self.temperature, self.cls_loss, self.feat_norm = float(temperature), cls_loss, feat_norm

    def teacher_head(self, images: torch.Tensor) -> HeadOutput:
        if next(self.teacher.parameters()).device != images.device:
            self.teacher.to(images.device)
        self.teacher.eval()
        with torch.no_grad():
            return self.teacher.head_forward(images)

    def __call__(
        self, images: torch.Tensor, student: HeadOutput, adapters: nn.ModuleList | None = None, factor: float = 1.0
    ) -> tuple[torch.Tensor, dict[str, float]]:
        terms = distillation_losses(student, self.teacher_head(images), self.temperature, self.cls_loss,
                                    adapters if self.feat_weight > 0 else None, self.feat_norm)
        w = self.weight * factor
        loss = w * (self.cls_weight * terms["kd_cls"] + self.dfl_weight * terms["kd_dfl"]
                    + self.feat_weight * terms["kd_feat"])
        logs = {k: float(v.detach()) for k, v in terms.items()}
        logs["kd_weight"] = w
        return loss, logs
