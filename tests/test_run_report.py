"""RunReport: a tiny fit leaves results.csv, the curve/PR/confusion PNGs, a validation grid and
prints the final per-class table."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from compress_helpers import TinyDetector
from detectkit.callbacks import RunReport
from detectkit.callbacks.prediction_images import confusion_figure, pr_figure
from detectkit.callbacks.run_report import metrics_table, run_folder
from lightning.pytorch.loggers import CSVLogger
from module_helpers import tiny_data
from PIL import Image

from detectkit.modules import OptimConfig
from detectkit.modules.curves import ValidationCurves
from detectkit.modules.detector import DetectionModule

NAMES = ["circle_thing", "square_thing"]


def _fit(tmp_path: Path, epochs: int, logger=None, plots: bool = True, conf: float = 0.25,  # noqa: ANN001
         **trainer_kw) -> tuple[pl.Trainer, RunReport]:
    torch.manual_seed(0)
    module = DetectionModule(TinyDetector(num_classes=2), class_names=NAMES,
                             optim=OptimConfig(lr=1e-3, warmup_steps=2))
    report = RunReport(num_images=3, plots=plots, conf=conf)
    t = pl.Trainer(default_root_dir=str(tmp_path), accelerator="cpu", devices=1, max_epochs=epochs,
                   logger=logger if logger is not None else False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   callbacks=[report], **trainer_kw)
    t.fit(module, datamodule=tiny_data(tmp_path, size=64, n_train=4, n_val=4, batch_size=2))
    return t, report


def test_tiny_fit_writes_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logger = CSVLogger(save_dir=str(tmp_path), name="logs")
    t, report = _fit(tmp_path, epochs=2, logger=logger)
    run = Path(logger.log_dir)  # the run's own folder: <save_dir>/logs/version_0
    assert report.dir == run and run.name == "version_0"

    with open(run / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    # epochs counted from 1, as the progress lines and the final table count them
    assert [r["epoch"] for r in rows] == ["1", "2"] and [r["step"] for r in rows] == ["2", "4"]
    cols = list(rows[0])
    assert cols[:2] == ["epoch", "step"] and cols[-1] == "epoch_time"
    for c in ("train/loss", "train/cls", "train/box", "train/dfl", "val/map", "val/map_50", "val/map_75",
              "val/mar_100", "lr/decay", "lr/no_decay"):
        assert c in cols, cols
    # each class's AP50-95 after the summary columns, the value the final table shows
    ap_cols = [c for c in cols if c.startswith("val/AP/")]
    assert ap_cols == [f"val/AP/{n}" for n in NAMES] and cols.index(ap_cols[0]) > cols.index("val/mar_100")
    for name, c in zip(NAMES, ap_cols):
        ap = next(r["ap"] for r in report._per_class if r["name"] == name)
        assert abs(float(rows[-1][c]) - ap) < 1e-5
    for r in rows:
        assert float(r["train/loss"]) > 0 and 0 <= float(r["val/map_50"]) <= 1 and float(r["epoch_time"]) > 0
    assert float(rows[0]["lr/decay"]) != float(rows[1]["lr/decay"])  # the warmup/cosine moved it

    for name, fmt in (("results.png", "PNG"), ("PR_curve.png", "PNG"), ("confusion_matrix.png", "PNG"),
                      ("val_batch_pred.jpg", "JPEG")):
        path = run / name
        assert path.stat().st_size > 5_000, name
        with Image.open(path) as im:
            assert im.format == fmt and min(im.size) >= 200, (name, im.size)
            assert len(set(im.convert("L").getdata())) > 10, name  # not a blank canvas
    with Image.open(run / "val_batch_pred.jpg") as im:  # 3 images, enlarged to 320 px, in a 2x2 grid
        assert im.size == (2 * 320 + 4, 2 * 320 + 4)

    # the PR curves come from the same detections val/map scored: their AP50s average to val/map_50
    ap50 = [r["ap50"] for r in report._per_class]
    assert len(ap50) == 2 and abs(sum(ap50) / 2 - float(rows[-1]["val/map_50"])) < 1e-4

    out = capsys.readouterr().out
    assert "final validation (epoch 2)" in out
    for name in (*NAMES, "all", "AP50", "AP50-95", "instances"):
        assert name in out, out


def test_val_only_every_other_epoch_and_resume_state(tmp_path: Path) -> None:
    """Epochs without validation get empty val columns (not the previous epoch's values), and the
    rows travel in the callback state (a resumed fit writes the whole history)."""
    t, report = _fit(tmp_path, epochs=2, plots=False, check_val_every_n_epoch=2, limit_train_batches=1,
                     limit_val_batches=1)
    with open(tmp_path / "results.csv") as fh:  # no logger: default_root_dir
        rows = list(csv.DictReader(fh))
    assert rows[0]["val/map"] == "" and rows[1]["val/map"] != ""
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.jpg"))  # plots=False
    again = RunReport()
    again.load_state_dict(report.state_dict())
    assert [r["epoch"] for r in again.rows] == [1, 2]


def test_metrics_table_and_run_folder_without_logger(tmp_path: Path) -> None:
    header, rows = metrics_table({"map": 0.5, "map_50": 0.75, "images": 4},
                                 [{"name": "a", "images": 3, "instances": 5, "ap50": 0.8, "ap": 0.55},
                                  {"name": "b", "images": 2, "instances": 2, "ap50": None, "ap": -1.0}])
    assert header == ["class", "images", "instances", "AP50", "AP50-95"]
    assert rows == [["a", "3", "5", "0.800", "0.550"], ["b", "2", "2", "-", "-"], ["all", "4", "7", "0.750", "0.500"]]
    t = pl.Trainer(default_root_dir=str(tmp_path / "root"), logger=False, accelerator="cpu")
    assert run_folder(t) == tmp_path / "root"


def test_nothing_above_conf_shows_the_hint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A model that predicts nothing above the report's threshold: the grid and the confusion matrix
    say why (the predict/serve hint: best score seen, the threshold to try), not a blank picture."""
    t, report = _fit(tmp_path, epochs=1, conf=0.99, limit_train_batches=1)
    assert report.hint is not None and report.hint.startswith("0 detections above conf 0.99 in 4 images (best score ")
    assert "lower it with RunReport(conf=" in report.hint
    with Image.open(tmp_path / "val_batch_pred.jpg") as im:  # the 2x2 grid under a caption strip
        assert im.size[0] == 2 * 320 + 4 and im.size[1] > 2 * 320 + 4 + 10
    assert report.hint in capsys.readouterr().out  # and printed under the final table

    m = np.zeros((3, 3), np.int64)
    fig = confusion_figure(m, NAMES, normalize=True, conf=0.99, note=report.hint)
    assert any(report.hint.split(" (")[0] in text.get_text() for text in fig.texts)


def test_pr_legend_beside_the_axes() -> None:
    """Many classes: the legend sits right of the plot, not over the curves."""
    names = [f"class_{i}" for i in range(12)]
    recall = np.linspace(0, 1, 101)
    curves = ValidationCurves(recall=recall, precision=np.tile(1 - recall, (12, 1)), classes=list(range(12)),
                              ap50={i: 0.5 for i in range(12)}, confusion=np.zeros((13, 13), np.int64),
                              instances=np.ones(12, np.int64), images=np.ones(12, np.int64), num_images=1)
    fig = pr_figure(curves, names)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend, axes_box = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    assert legend.x0 >= axes_box.x1  # entirely to the right of the axes
    assert legend.x1 <= fig.bbox.x1 + 1  # and inside the image
