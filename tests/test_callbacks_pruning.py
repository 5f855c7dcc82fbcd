"""Structured pruning on torch-pruning: MACs target across epochs, resume, YOLO-NAS, export."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from compress_helpers import TinyDetector, tiny_datamodule, tiny_trainer
from detectkit.callbacks import StructuredPruning
from detectkit.callbacks.pruning import apply_pruned_shapes, count_macs_params, prune_model, record_shapes
from detectkit.callbacks.quantization import partial_fuse
from lightning.pytorch.callbacks import ModelCheckpoint

from detectkit.export.deploy import ExportConfig, export_detector
from detectkit.modules import OptimConfig
from detectkit.modules.detector import DetectionModule
from detectkit.modules.ema import ModelEMA


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


def _module(seed: int = 0) -> DetectionModule:
    torch.manual_seed(seed)
    return DetectionModule(TinyDetector(num_classes=3, width=16), num_classes=3,
                           optim=OptimConfig(lr=1e-3, warmup_steps=1))


def test_iterative_macs_target_fit_resume_export(tmp_path, data_dir):
    prune = StructuredPruning(target_macs_ratio=0.5, steps=2, epochs_between=1, image_size=64, round_to=4)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    module = _module()
    base_macs, base_params = count_macs_params(module.model, 64)
    trainer = tiny_trainer(tmp_path, [ModelEMA(decay=0.9), prune, ckpt], max_epochs=3, train_batches=1)
    trainer.fit(module, datamodule=tiny_datamodule(data_dir))
    model = module.model
    assert prune.steps_done == 2 and [h["epoch"] for h in prune.history] == [0, 1]
    assert 0.5 < prune.history[0]["macs_ratio"] <= 0.75  # step 1 of 2: 75% target, not yet 50%
    macs, params = count_macs_params(model, 64)
    assert macs <= 0.5 * base_macs and params < base_params
    assert macs >= 0.3 * base_macs  # small increments: not far past the target
    # head predictors keep their outputs; QARepVGG was fused and follows its pruned conv
    assert [c.out_channels for c in model.cls_pred] == [3, 3, 3]
    assert [c.out_channels for c in model.reg_pred] == [32, 32, 32]
    assert model.rep.fusion == "partial" and model.rep.out_channels == model.rep.rbr_reparam.out_channels < 32
    # training went on after pruning with the new parameters (optimizer rebuilt) and the EMA copy
    assert trainer.global_step == 3

    # resume into a fresh, unpruned model: the architecture is rebuilt before the weights load
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    module2 = _module(seed=1)
    prune2 = StructuredPruning(target_macs_ratio=0.5, steps=2, epochs_between=1, image_size=64, round_to=4)
    seen = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["w"] = pl_module.model.down2.conv.weight.detach().clone()

    trainer2 = tiny_trainer(tmp_path, [ModelEMA(decay=0.9), prune2, Probe()], max_epochs=4, train_batches=1)
    trainer2.fit(module2, datamodule=tiny_datamodule(data_dir), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    torch.testing.assert_close(seen["w"], saved["current_model_state"]["model.down2.conv.weight"])
    assert prune2.steps_done == 2 and count_macs_params(module2.model, 64)[0] == macs
    assert trainer2.global_step == 4

    res = export_detector(module2.model.eval().fuse(), tmp_path / "pruned.onnx", ExportConfig(image_size=64))
    assert res.max_abs_error < 1e-3


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_importance_criteria(importance):
    torch.manual_seed(0)
    model = TinyDetector(num_classes=3, width=16)
    if importance == "taylor":  # gradients of the (partially fused) kernels that get pruned
        head = partial_fuse(model).train()(torch.rand(2, 3, 64, 64))
        (head.cls_logits.sigmoid().mean() + head.reg_distri.pow(2).mean()).backward()
    before = count_macs_params(model, 64)[0]
    prune_model(model, 0.5, importance=importance, round_to=None)
    assert model.down1.conv.out_channels == 16 and count_macs_params(model, 64)[0] < 0.5 * before


def test_yolo_nas_s_prune_and_rebuild():
    from detectkit import create_model

    torch.manual_seed(0)
    model = create_model("yolo_nas_s", num_classes=3).eval()
    base_params = sum(p.numel() for p in model.parameters())
    prune_model(model, 0.25)
    assert sum(p.numel() for p in model.parameters()) < 0.75 * base_params
    alphas = [p for n, p in model.named_parameters() if n.endswith("alpha")]
    assert alphas and all(p.shape == (1,) for p in alphas)  # scalar residual scales untouched
    heads = [m for n, m in model.named_modules() if n.endswith(("cls_pred", "reg_pred"))]
    assert sorted({m.out_channels for m in heads}) == [3, 68]
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    shapes = record_shapes(model)
    fresh = apply_pruned_shapes(create_model("yolo_nas_s", num_classes=3), shapes).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        out = fresh(x)
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(out[1], ref[1])
