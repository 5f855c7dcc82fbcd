"""`detectkit export`: Lightning checkpoint (pruned) -> ONNX with NMS / INT8 TensorRT graph."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import numpy as np
import onnx
import torch
from compress_helpers import TinyDetector
from detectkit.callbacks import StructuredPruning
from lightning.pytorch.callbacks import ModelCheckpoint

from detectkit.cli import main as cli_main
from detectkit.cli.export import load_for_export
from detectkit.data import AugmentConfig, DetectionDataModule, LoaderConfig
from detectkit.data.synthetic import SyntheticConfig
from detectkit.export.deploy import run_onnx
from detectkit.modules import OptimConfig
from detectkit.modules.detector import DetectionModule
from detectkit.registry import _MODELS, register_model

if "tiny_compress_test" not in _MODELS:

    @register_model(name="tiny_compress_test")
    def tiny_compress_test(num_classes: int = 3, checkpoint=None, **kwargs):
        return TinyDetector(num_classes=num_classes, width=16)


def test_export_command_pruned_checkpoint(tmp_path, capsys):
    syn = SyntheticConfig(train_images=8, val_images=4, size=64, num_classes=3)
    dm = DetectionDataModule(image_size=64, loader=LoaderConfig(batch_size=4, num_workers=0), synthetic=syn,
                             cache_dir=str(tmp_path / "data"), augment=AugmentConfig(mixup_prob=0.0))
    module = DetectionModule("tiny_compress_test", num_classes=3, optim=OptimConfig(lr=1e-3, warmup_steps=1))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1,
                         accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[StructuredPruning(target_macs_ratio=0.6, image_size=64, round_to=4), ckpt],
                         num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    last = str(tmp_path / "ckpt" / "last.ckpt")

    # the pruned architecture comes back from the checkpoint (model name from its hyper-parameters)
    model = load_for_export(None, last)
    module.model.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[1], module.model(x)[1])

    out = tmp_path / "flat.onnx"
    rc = cli_main(["export", "--checkpoint", last, "--size", "64", "--nms", "flat", "--conf", "0.05",
                   "--uint8", "--layout", "nhwc", "--output", str(out)])
    assert rc == 0 and out.is_file()
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["detections_match"] is True and summary["input_dtype"] == "uint8"
    (flat,) = run_onnx(out, np.zeros((2, 64, 64, 3), dtype=np.uint8))
    assert flat.ndim == 2 and flat.shape[1] == 7

    images = sorted((tmp_path / "data").rglob("*.jpg"))
    assert images
    rc = cli_main(["export", "--model", "tiny_compress_test", "--checkpoint", last, "--format", "tensorrt",
                   "--int8", "--calib", str(images[0].parent), "--calib-batches", "2", "--size", "64",
                   "--output", str(tmp_path / "int8.onnx")])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["quantized"] is True and summary["op_counts"]["QuantizeLinear"] > 5
    graph = onnx.load(tmp_path / "int8.trt.onnx")
    ops = {n.op_type for n in graph.graph.node}
    assert {"EfficientNMS_TRT", "QuantizeLinear", "DequantizeLinear"} <= ops
    script = (tmp_path / "int8.trt.trtexec.sh").read_text()
    assert "--int8" in script and "int8.engine" in script
    # CPU deployment: onnxruntime's own static INT8 of the float checkpoint
    rc = cli_main(["export", "--checkpoint", last, "--int8", "--int8-backend", "onnxruntime", "--calib",
                   str(images[0].parent), "--calib-batches", "4", "--size", "64", "--output", str(tmp_path / "cpu.onnx")])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["backend"] == "onnxruntime" and summary["op_counts"]["QuantizeLinear"] > 5
    boxes, scores = run_onnx(tmp_path / "cpu.onnx", np.random.rand(1, 3, 64, 64).astype(np.float32))
    assert boxes.shape == (1, 84, 4) and scores.shape == (1, 84, 3)


def _logged_error(text: str) -> float:
    """The max_abs_error figure of the export's log line."""
    (line,) = [ln for ln in text.splitlines() if "max_abs_error" in ln]
    return float(line.split("max_abs_error ")[1].split()[0])


def test_export_default_puts_nms_in_the_graph_and_logs_the_reported_error(tmp_path, capsys, caplog):
    from detectkit.checkpoint import save_weights
    from detectkit.registry import create_model

    torch.manual_seed(0)
    weights = save_weights(create_model("tiny_compress_test", num_classes=3), tmp_path / "tiny.pt")
    out = tmp_path / "default.onnx"
    with caplog.at_level("INFO", "detectkit.export.deploy"):
        rc = cli_main(["export", "--checkpoint", str(weights), "--size", "64", "--conf", "0.01",
                       "--output", str(out)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the README's promise: NMS inside the graph without asking for it
    assert summary["output_names"] == ["num_predictions", "pred_boxes", "pred_scores", "pred_classes"]
    assert [o.name for o in onnx.load(out).graph.output][0] == "num_predictions"
    assert summary["detections_match"] is True and summary["num_detections"] > 0
    # one figure: the log line prints exactly the number the JSON report holds
    assert summary["max_abs_error"] == _logged_error(caplog.text) and summary["max_abs_error"] < 1e-3

    caplog.clear()
    raw = tmp_path / "raw.onnx"
    with caplog.at_level("INFO", "detectkit.export.deploy"):
        rc = cli_main(["export", "--checkpoint", str(weights), "--size", "64", "--nms", "none",
                       "--output", str(raw)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["output_names"] == ["boxes", "scores"]
    assert summary["max_abs_error"] == _logged_error(caplog.text)
