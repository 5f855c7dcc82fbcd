"""`detectkit benchmark`: every available format of a tiny checkpoint gets a row with numbers."""

from __future__ import annotations

import importlib.util
import json

import lightning.pytorch as pl
import pytest
import torch
from compress_helpers import TinyDetector

from detectkit.checkpoint import save_weights
from detectkit.cli import main as cli_main
from detectkit.cli.benchmark import FORMATS, MISSING, recorded_map
from detectkit.data import DetectionDataModule, LoaderConfig
from detectkit.data.synthetic import SyntheticConfig, generate_synthetic
from detectkit.models.base import InferenceDefaults
from detectkit.modules.detector import DetectionModule
from detectkit.registry import _MODELS, create_model, register_model

if "tiny_compress_test" not in _MODELS:

    @register_model(name="tiny_compress_test")
    def tiny_compress_test(num_classes: int = 3, checkpoint=None, **kwargs):
        return TinyDetector(num_classes=num_classes, width=16)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = create_model("tiny_compress_test", num_classes=3)
    model.inference = InferenceDefaults(image_size=(64, 64), longest=None)
    return save_weights(model, tmp_path / "tiny.pt")


def _run(capsys, *argv: str) -> tuple[str, dict]:
    assert cli_main(["benchmark", *argv]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    return "\n".join(out[:-1]), json.loads(out[-1])


def test_benchmark_rows_for_every_available_format(tmp_path, tiny_checkpoint, capsys):
    data = generate_synthetic(tmp_path / "data", SyntheticConfig(train_images=0, val_images=6, size=64, num_classes=3))
    table, summary = _run(capsys, "--checkpoint", str(tiny_checkpoint), "--data", str(data / "val"),
                          "--runs", "2", "--warmup", "1", "--batch", "4", "--calib-images", "4", "--threads", "1")
    rows = {r["format"]: r for r in summary["rows"]}
    # every format but the opt-in compiled one, in table order
    assert list(rows) == [f for f in FORMATS if f != "torch-compiled"]
    assert summary["threads"] == 1 and torch.get_num_threads() == 1
    assert summary["map_source"].startswith("--data") and "6 images" in summary["map_source"]
    installed = {"onnxruntime": importlib.util.find_spec("onnxruntime") is not None,
                 "openvino": importlib.util.find_spec("openvino") is not None}
    expect_ok = ["torch", "torchscript"] + [f for f in ("onnxruntime", "onnxruntime-int8") if installed["onnxruntime"]] \
        + [f for f in ("openvino", "openvino-int8") if installed["openvino"] and installed["onnxruntime"]]
    for name in expect_ok:
        row = rows[name]
        assert row["status"] == "ok", (name, row["status"])
        assert row["size_mb"] > 0 and 0 < row["p50_ms"] <= row["p90_ms"] and row["throughput"] > 0
        assert 0.0 <= row["map"] <= 1.0 and 0.0 <= row["map50"] <= 1.0
        assert name in table
    # the FP32 files compute the same network: the same mAP as eager PyTorch
    for name in ("torchscript", "onnxruntime", "openvino"):
        if rows[name]["status"] == "ok":
            assert rows[name]["map"] == pytest.approx(rows["torch"]["map"], abs=2e-3), name
    # the eager row's mAP is the one validation gives (the fit's own path: datamodule, validation step)
    module = DetectionModule("tiny_compress_test", num_classes=3, checkpoint=str(tiny_checkpoint))
    dm = DetectionDataModule(data_dir=str(data), image_size=64, loader=LoaderConfig(batch_size=4, num_workers=0))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    val = trainer.validate(module, datamodule=dm, verbose=False)[0]
    assert val["val/map"] > 0 and rows["torch"]["map"] == pytest.approx(val["val/map"], abs=1e-4)
    # INT8 stores int8 weights: a smaller file than FP32
    if installed["onnxruntime"]:
        assert rows["onnxruntime-int8"]["size_mb"] < rows["onnxruntime"]["size_mb"]
    if importlib.util.find_spec("tensorrt") is None:
        assert rows["tensorrt"]["status"] == MISSING["tensorrt"]
        assert MISSING["tensorrt"] in table


def test_benchmark_without_data_says_where_map_comes_from(tiny_checkpoint, capsys):
    table, summary = _run(capsys, "--checkpoint", str(tiny_checkpoint), "--formats", "torch,onnxruntime-int8",
                          "--runs", "2", "--warmup", "0", "--batch", "2")
    rows = {r["format"]: r for r in summary["rows"]}
    assert rows["torch"]["status"] == "ok" and rows["torch"]["map"] is None
    assert rows["onnxruntime-int8"]["status"].startswith("needs --data")
    assert "not measured (no --data)" in table and summary["recorded_map"] is None


def test_benchmark_bad_options_are_one_line(tiny_checkpoint, capsys):
    assert cli_main(["benchmark", "--checkpoint", str(tiny_checkpoint), "--formats", "onnxruntme"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown format 'onnxruntme'" in err and "onnxruntime" in err
    assert cli_main(["benchmark", "--checkpoint", "missing.ckpt"]) == 1
    assert "missing.ckpt: no such file" in capsys.readouterr().err


def test_recorded_map_reads_a_monitored_model_checkpoint():
    ckpt = {"callbacks": {"ModelCheckpoint{'monitor': 'val/map'}": {"monitor": "val/map", "best_model_score": torch.tensor(0.5)},
                          "ModelCheckpoint{'monitor': None}": {"monitor": None, "best_model_score": None}}}
    assert recorded_map(ckpt) == ("val/map", 0.5)
    assert recorded_map({"callbacks": {"ModelCheckpoint{}": {"monitor": None}}}) is None
