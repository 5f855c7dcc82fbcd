"""Prune -> fine-tune with distillation -> QAT -> export, in one fit, and resumed."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from compress_helpers import TinyDetector
from detectkit.callbacks import (
    ExportOnFitEnd,
    KnowledgeDistillation,
    QuantizationAwareTraining,
    StructuredPruning,
)
from detectkit.callbacks.pruning import count_macs_params
from detectkit.callbacks.quantization import is_quantized
from lightning.pytorch.callbacks import ModelCheckpoint

from detectkit.data import AugmentConfig, DetectionDataModule, LoaderConfig
from detectkit.data.synthetic import SyntheticConfig
from detectkit.modules import OptimConfig
from detectkit.modules.detector import DetectionModule
from detectkit.modules.ema import ModelEMA


def _callbacks(teacher, tmp_path):
    return [
        ModelEMA(decay=0.9),
        KnowledgeDistillation(teacher=teacher, feat_weight=0.5),  # listed first on purpose: order must not matter
        QuantizationAwareTraining(start_epoch=2, calib_batches=1, lr_factor=0.1),
        StructuredPruning(target_macs_ratio=0.6, steps=1, start_epoch=0, image_size=64, round_to=4),
        ExportOnFitEnd(image_size=64, nms="batch", conf=0.05, dirpath=str(tmp_path / "export")),
        ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True),
    ]


def test_prune_distill_qat_export_in_one_fit(tmp_path):
    syn = SyntheticConfig(train_images=8, val_images=4, size=64, num_classes=3)

    def dm():
        return DetectionDataModule(image_size=64, loader=LoaderConfig(batch_size=4, num_workers=0),
                                   synthetic=syn, cache_dir=str(tmp_path / "data"),
                                   augment=AugmentConfig(mixup_prob=0.0))

    torch.manual_seed(1)
    teacher = TinyDetector(num_classes=3, width=16)
    torch.manual_seed(0)
    module = DetectionModule(TinyDetector(num_classes=3, width=16), num_classes=3,
                             optim=OptimConfig(lr=1e-3, warmup_steps=1))
    base_macs = count_macs_params(module.model, 64)[0]
    cbs = _callbacks(teacher, tmp_path)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=3, limit_train_batches=1, limit_val_batches=1,
                         accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=cbs, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm())
    qat, prune, export = cbs[2], cbs[3], cbs[4]
    model = module.model
    assert prune.steps_done == 1 and prune.history[0]["macs_ratio"] <= 0.6
    assert qat.quantized_at_epoch == 2 and is_quantized(model)
    # adapters follow the pruned neck and are still optimised after every optimizer rebuild
    feats = [c.rbr_reparam.out_channels if hasattr(c, "rbr_reparam") else c.conv.out_channels
             for c in (model.rep, model.down1, model.down2)]
    assert [a.in_channels for a in module.distill_adapters] == feats
    opt_ids = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert all(id(p) in opt_ids for p in module.distill_adapters.parameters())
    # the exported file is the pruned, quantized detector with NMS, checked in onnxruntime
    assert export.result.op_counts["QuantizeLinear"] > 5 and export.result.detections_match
    assert count_macs_params(model, 64)[0] <= 0.6 * base_macs

    # resume the composed run into fresh float models: shapes, then quantizers, then adapters
    torch.manual_seed(5)
    module2 = DetectionModule(TinyDetector(num_classes=3, width=16), num_classes=3,
                              optim=OptimConfig(lr=1e-3, warmup_steps=1))
    cbs2 = _callbacks(teacher, tmp_path / "resumed")
    trainer2 = pl.Trainer(default_root_dir=tmp_path, max_epochs=4, limit_train_batches=1, limit_val_batches=1,
                          accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                          callbacks=cbs2, num_sanity_val_steps=0)
    trainer2.fit(module2, datamodule=dm(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer2.global_step == 4 and is_quantized(module2.model) and cbs2[3].steps_done == 1
    torch.testing.assert_close(module2.model.down1.conv.input_quantizer.amax.shape, model.down1.conv.input_quantizer.amax.shape)
