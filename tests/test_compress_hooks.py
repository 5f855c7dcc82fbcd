"""The module's typed extra-loss hook: what a callback (or anyone) registers is added to the
training loss and logged; nothing is found by duck-typing callbacks."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from compress_helpers import TinyDetector, tiny_datamodule, tiny_trainer
from detectkit.callbacks import KnowledgeDistillation

from detectkit.modules.detector import DetectionModule, ExtraLoss, LossTermRegistry


def _batch() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"images": torch.rand(2, 3, 64, 64, generator=g), "targets": torch.tensor([[0, 1, 10.0, 10.0, 40.0, 40.0]])}


def test_registered_term_is_added_to_the_loss_and_removed_again():
    torch.manual_seed(0)
    module = DetectionModule(TinyDetector(), num_classes=3)
    assert isinstance(module, LossTermRegistry)
    base = float(module.training_step(_batch(), 0)["loss"].detach())

    def term(mod, batch, images, head):
        return head.cls_logits.new_tensor(2.5), {"my_term": 2.5}

    assert isinstance(term, ExtraLoss)
    module.add_loss_term("mine", term)
    assert abs(float(module.training_step(_batch(), 0)["loss"].detach()) - (base + 2.5)) < 1e-4
    module.remove_loss_term("mine")
    assert abs(float(module.training_step(_batch(), 0)["loss"].detach()) - base) < 1e-4


def test_callback_with_an_extra_loss_method_is_not_picked_up_unregistered(tmp_path):
    """Only registered terms count: a callback merely having ``extra_loss`` changes nothing."""

    class Stray(pl.Callback):
        calls = 0

        def extra_loss(self, *args):
            Stray.calls += 1
            return torch.tensor(1.0), {}

    module = DetectionModule(TinyDetector(), num_classes=3)
    trainer = tiny_trainer(tmp_path, [Stray()], max_epochs=1, train_batches=1)
    trainer.fit(module, datamodule=tiny_datamodule(tmp_path / "data"))
    assert Stray.calls == 0


def test_distillation_registers_during_fit_and_leaves_after(tmp_path):
    torch.manual_seed(0)
    module = DetectionModule(TinyDetector(), num_classes=3)
    kd = KnowledgeDistillation(teacher=TinyDetector(), feat_weight=0.5)
    seen = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(sorted(pl_module.loss_terms))

    trainer = tiny_trainer(tmp_path, [kd, Probe()], max_epochs=1, train_batches=2)
    trainer.fit(module, datamodule=tiny_datamodule(tmp_path / "data"))
    assert seen == [["distillation"], ["distillation"]]
    assert "train/kd_feat_epoch" in trainer.callback_metrics or "train/kd_feat" in trainer.callback_metrics
    assert module.loss_terms == {}
