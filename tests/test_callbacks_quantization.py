"""QAT/PTQ on nvidia-modelopt: fit, resume, Q/DQ ONNX, sensitivity ranking."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from compress_helpers import TinyDetector, tiny_datamodule, tiny_trainer
from detectkit.callbacks import ExportOnFitEnd, QuantizationAwareTraining
from detectkit.callbacks.quantization import is_quantized, quantization_sensitivity, select_skip_layers
from lightning.pytorch.callbacks import ModelCheckpoint

from detectkit.export.deploy import ExportConfig, export_detector, run_onnx
from detectkit.modules import OptimConfig
from detectkit.modules.detector import DetectionModule
from detectkit.modules.ema import ModelEMA


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


def _module(seed: int = 0) -> DetectionModule:
    torch.manual_seed(seed)
    return DetectionModule(TinyDetector(num_classes=3), num_classes=3,
                           optim=OptimConfig(lr=1e-3, warmup_steps=1))


def test_qat_fit_resume_and_qdq_export(tmp_path, data_dir):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    qat = QuantizationAwareTraining(start_epoch=1, calib_batches=2, lr_factor=0.1, skip_layers=["cls_pred.0"])
    ema = ModelEMA(decay=0.9)
    module = _module()
    trainer = tiny_trainer(tmp_path, [qat, ema, ckpt], max_epochs=2)
    trainer.fit(module, datamodule=tiny_datamodule(data_dir))
    model = module.model
    assert qat.quantized and qat.quantized_at_epoch == 1 and is_quantized(model)
    assert model.rep.fusion == "partial"  # QARepVGG merged, post_bn kept
    assert not model.cls_pred[0].weight_quantizer.is_enabled  # skip_layers kept in float
    assert model.cls_pred[1].weight_quantizer.is_enabled
    assert ema not in trainer.callbacks  # EMA off during QAT
    lr_float = 1e-3
    assert max(g["lr"] for g in trainer.optimizers[0].param_groups) <= lr_float * 0.1 + 1e-12

    # Q/DQ ONNX runs in onnxruntime and tracks the fake-quantized PyTorch model
    res = export_detector(model, tmp_path / "qdq.onnx", ExportConfig(image_size=64), check=False)
    assert res.op_counts.get("QuantizeLinear", 0) > 10 and res.op_counts.get("DequantizeLinear", 0) > 10
    x = torch.rand(2, 3, 64, 64)
    boxes, scores = run_onnx(res.path, x)
    model.eval()
    with torch.no_grad():
        ref_boxes, ref_scores = model(x)
    assert np.abs(scores - ref_scores.numpy()).max() < 0.02
    assert np.abs(boxes - ref_boxes.numpy()).mean() < 0.5  # px, on a 64 px image

    # resume: a fresh float model is rebuilt as quantized before the weights are loaded
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    amax_key = "model.down1.conv.input_quantizer._amax"
    assert amax_key in saved["state_dict"]
    qat2 = QuantizationAwareTraining(start_epoch=1, calib_batches=2, lr_factor=0.1, skip_layers=["cls_pred.0"])
    module2 = _module(seed=1)
    seen = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["amax"] = pl_module.model.down1.conv.input_quantizer.amax.clone()
            seen["lr"] = max(g["lr"] for g in trainer.optimizers[0].param_groups)

    trainer2 = tiny_trainer(tmp_path, [qat2, ModelEMA(decay=0.9), Probe()], max_epochs=3)
    trainer2.fit(module2, datamodule=tiny_datamodule(data_dir), ckpt_path=str(last))
    assert is_quantized(module2.model) and qat2.quantized and qat2.quantized_at_epoch == 1
    torch.testing.assert_close(seen["amax"], saved["state_dict"][amax_key])
    assert seen["lr"] <= lr_float * 0.1 + 1e-12
    assert not any(isinstance(cb, ModelEMA) for cb in trainer2.callbacks)


def test_ptq_mode_calibrates_without_training_and_exports_qdq(tmp_path, data_dir):
    module = _module()
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    ptq = QuantizationAwareTraining(ptq=True, calib_batches=2)
    export = ExportOnFitEnd(image_size=64, nms="flat", conf=0.05, tensorrt=True)
    trainer = tiny_trainer(tmp_path, [ptq, export], max_epochs=3)
    trainer.fit(module, datamodule=tiny_datamodule(data_dir))
    assert trainer.global_step == 0 and is_quantized(module.model)
    # no optimizer step: conv kernels are the float ones (fused QARepVGG aside)
    torch.testing.assert_close(module.model.down1.conv.weight, before["down1.conv.weight"])
    assert export.result.op_counts["QuantizeLinear"] > 10 and export.result.detections_match
    names = [p.rsplit("/", 1)[-1] for p in export.files]
    assert "model.onnx" in names and "model.trt.onnx" in names and "model.json" in names
    script = [p for p in export.files if p.endswith(".trtexec.sh")]
    assert script and "--int8" in open(script[0]).read()


def test_sensitivity_ranks_layers_and_metric_drop(data_dir):
    torch.manual_seed(0)
    model = TinyDetector(num_classes=3).eval()
    with torch.no_grad():  # one huge, unused input channel: down2's per-tensor input scale crushes the rest
        model.down1.bn.bias[0] = 500.0
        model.down2.conv.weight[:, 0] = 0.0
    batches = [torch.rand(2, 3, 64, 64) for _ in range(2)]
    ranking = quantization_sensitivity(model, batches, num_batches=2)
    names = [n for n, _ in ranking]
    assert len(names) >= 8 and len(set(names)) == len(names)
    assert all(ranking[i][1] >= ranking[i + 1][1] for i in range(len(ranking) - 1))
    assert names[0] == "down2.conv"
    assert select_skip_layers(ranking, 2) == names[:2]
    # a metric: the metric drop is ranked instead (here: negative output error)
    ref = model(batches[0])[1]
    scored = quantization_sensitivity(model, batches, num_batches=2, layers=["down*"],
                                      metric_fn=lambda m: -float((m(batches[0])[1] - ref).abs().mean()))
    assert {n for n, _ in scored} == {"down1.conv", "down2.conv"}
