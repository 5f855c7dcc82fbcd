"""Knowledge distillation: teacher frozen and unsaved, adapters trained, KD terms, schedule, resume."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from compress_helpers import TinyDetector, tiny_datamodule, tiny_trainer
from detectkit.callbacks import KnowledgeDistillation
from detectkit.callbacks.distillation import distillation_losses
from lightning.pytorch.callbacks import ModelCheckpoint

from detectkit.modules import OptimConfig
from detectkit.modules.detector import DetectionModule


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


def test_kd_terms_are_zero_for_identical_models_and_positive_otherwise():
    torch.manual_seed(0)
    a, b = TinyDetector(num_classes=3).train(), TinyDetector(num_classes=3).train()
    x = torch.rand(2, 3, 64, 64)
    ha, hb = a(x), b(x)
    same = distillation_losses(ha, ha, temperature=2.0, cls_loss="kl")
    assert same["kd_cls"].abs() < 1e-5 and same["kd_dfl"].abs() < 1e-5
    diff = distillation_losses(ha, hb)
    assert diff["kd_dfl"] > 0 and diff["kd_cls"] > distillation_losses(hb, hb)["kd_cls"]  # BCE minimum is at p_t


def test_kd_fit_teacher_frozen_adapters_trained_resume(tmp_path, data_dir):
    torch.manual_seed(0)
    teacher = TinyDetector(num_classes=3, width=16)  # a wider teacher: adapters map 16/16/32 -> 32/32/64 channels
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    kd = KnowledgeDistillation(teacher=teacher, feat_weight=1.0, temperature=2.0, schedule="linear", final_ratio=0.5)
    module = DetectionModule(TinyDetector(num_classes=3), num_classes=3,
                             optim=OptimConfig(lr=1e-2, warmup_steps=1))
    logged = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append({k: float(v) for k, v in trainer.callback_metrics.items() if "kd_" in k})

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = tiny_trainer(tmp_path, [kd, Probe(), ckpt], max_epochs=2)
    adapters0 = None

    class Grab(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            nonlocal adapters0
            adapters0 = [p.detach().clone() for p in pl_module.distill_adapters.parameters()]

    trainer.callbacks.append(Grab())
    trainer.fit(module, datamodule=tiny_datamodule(data_dir))
    # the teacher never changed and stays in eval mode without gradients
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, teacher_before[k])
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    # the adapters were optimised with the student
    assert [a.out_channels for a in module.distill_adapters] == [32, 32, 64]
    assert any((p - p0).abs().max() > 0 for p, p0 in zip(module.distill_adapters.parameters(), adapters0))
    # KD terms were logged; linear schedule: weight 1.0 in epoch 0, 0.5 at the last epoch
    assert logged and all(k in logged[-1] for k in ("train/kd_cls", "train/kd_dfl", "train/kd_feat"))
    assert kd.factor(0) == 1.0 and kd.factor(1) == 0.5
    # checkpoints hold the teacher's source only, not its weights
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert not any("teacher" in k for k in saved["state_dict"])
    assert any(k.startswith("distill_adapters.") for k in saved["state_dict"])
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("KnowledgeDistillation")]
    assert state == {"teacher": "TinyDetector", "teacher_checkpoint": None, "adapters": [[16, 32], [16, 32], [32, 64]]}
    # resume: adapters and their optimizer group come back
    kd2 = KnowledgeDistillation(teacher=teacher, feat_weight=1.0, temperature=2.0, schedule="linear", final_ratio=0.5)
    module2 = DetectionModule(TinyDetector(num_classes=3), num_classes=3,
                              optim=OptimConfig(lr=1e-2, warmup_steps=1))
    trainer2 = tiny_trainer(tmp_path, [kd2], max_epochs=3)
    trainer2.fit(module2, datamodule=tiny_datamodule(data_dir), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer2.global_step == 6 and len(trainer2.optimizers[0].param_groups) == 3


def test_teacher_from_registry_under_autocast():
    from detectkit import create_model

    torch.manual_seed(0)
    kd = KnowledgeDistillation(teacher="yolo_nas_s", cls_loss="kl")
    student = create_model("yolo_nas_s", num_classes=2).train()

    class Holder(pl.LightningModule):  # the student's LightningModule, outside a fit
        def __init__(self):
            super().__init__()
            self.model = student

    holder = Holder()
    kd.teacher = None
    kd.setup(pl.Trainer(max_epochs=1, logger=False, accelerator="cpu"), holder, "fit")
    x = torch.rand(1, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        head = student(x)
        loss, logs = kd.extra_loss(holder, None, x, head)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert student.heads.head1.cls_pred.weight.grad is not None
    assert kd.teacher.num_classes == 2 and not kd.teacher.training
