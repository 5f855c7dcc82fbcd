"""ExportOnFitEnd: best checkpoint with EMA weights, fused, uint8 input, TensorRT graph, artifacts."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from compress_helpers import TinyDetector
from detectkit.callbacks import ExportOnFitEnd
from lightning.pytorch.callbacks import ModelCheckpoint

from detectkit.data import AugmentConfig, DetectionDataModule, LoaderConfig
from detectkit.data.synthetic import SyntheticConfig
from detectkit.export.deploy import run_onnx
from detectkit.modules import OptimConfig
from detectkit.modules.detector import DetectionModule
from detectkit.modules.ema import ModelEMA


def test_exports_best_ema_checkpoint_fused_with_artifacts(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    syn = SyntheticConfig(train_images=8, val_images=4, size=64, num_classes=3)
    dm = DetectionDataModule(image_size=64, loader=LoaderConfig(batch_size=4, num_workers=0), synthetic=syn,
                             cache_dir=str(tmp_path / "data"), augment=AugmentConfig(mixup_prob=0.0))
    torch.manual_seed(0)
    module = DetectionModule(TinyDetector(num_classes=3), num_classes=3,
                             optim=OptimConfig(lr=1e-2, warmup_steps=1))
    # best = epoch 0 (lowest epoch number): the export must use it, not the final weights
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="epoch", mode="min", save_top_k=1)
    export = ExportOnFitEnd(dirpath=str(tmp_path / "export"), image_size=64, nms="batch", conf=0.05,
                            uint8_input=True, layout="nhwc", channel_order="bgr")
    logger = MLFlowLogger(experiment_name="export", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                          artifact_location=str(tmp_path / "artifacts"))
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=1,
                         accelerator="cpu", logger=logger, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ModelEMA(decay=0.5), ckpt, export], num_sanity_val_steps=0, log_every_n_steps=1)
    trainer.fit(module, datamodule=dm)
    assert ckpt.best_model_path.endswith("epoch=0-step=2.ckpt")
    best = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=False)
    assert "current_model_state" in best  # WeightAveraging saved the EMA weights as state_dict
    ref = TinyDetector(num_classes=3)
    ref.load_state_dict({k[6:]: v for k, v in best["state_dict"].items() if k.startswith("model.")})
    ref.eval().fuse()

    onnx_path = tmp_path / "export" / "model.onnx"
    assert export.result.detections_match and export.result.input_dtype == "uint8"
    raw = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    num, boxes, scores, classes = run_onnx(onnx_path, raw.numpy())
    with torch.no_grad():
        _, ref_scores = ref(raw.flip(-1).permute(0, 3, 1, 2).float() / 255)
    top = ref_scores.max(-1).values.sort(descending=True).values
    np.testing.assert_allclose(scores[:, 0], top[:, 0].numpy(), atol=1e-5)  # best score per image = best ckpt's

    meta = json.loads((tmp_path / "export" / "model.json").read_text())
    assert meta["quantized"] is False and meta["config"]["layout"] == "nhwc"
    trt_graph = tmp_path / "export" / "model.trt.onnx"
    assert trt_graph.is_file()
    # artifacts went to the MLflow run
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    names = {a.path for a in client.list_artifacts(logger.run_id, "export")}
    assert {"export/model.onnx", "export/model.trt.onnx", "export/model.json"} <= names
