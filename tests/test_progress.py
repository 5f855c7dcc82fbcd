"""PlainProgressBar: plain, complete progress lines in a captured (non-terminal) stdout."""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from compress_helpers import TinyDetector
from detectkit.callbacks import PlainProgressBar
from detectkit.callbacks.progress import format_duration
from module_helpers import tiny_data

from detectkit.modules import OptimConfig
from detectkit.modules.detector import DetectionModule

NUM = r"[-+0-9.e]+"


def test_tiny_fit_prints_plain_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    module = DetectionModule(TinyDetector(num_classes=2), class_names=["a", "b"],
                             optim=OptimConfig(lr=1e-3, warmup_steps=2))
    t = pl.Trainer(default_root_dir=str(tmp_path), accelerator="cpu", devices=1, max_epochs=2, logger=False,
                   enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                   limit_val_batches=1, callbacks=[PlainProgressBar(every_seconds=0, every_steps=1)])
    t.fit(module, datamodule=tiny_data(tmp_path, n_train=4, n_val=2, batch_size=2))
    out = capsys.readouterr().out
    print(out)  # shown with -s / on failure
    assert "\r" not in out and "\x1b" not in out  # no carriage returns, no terminal escapes
    lines = out.strip().splitlines()
    step = re.compile(rf"^epoch (\d)/2 step (\d)/2 loss {NUM} \(cls {NUM} box {NUM} dfl {NUM}\) {NUM} img/s ETA \d+s$")
    steps = [m for m in map(step.match, lines) if m]
    assert [(m[1], m[2]) for m in steps] == [("1", "1"), ("1", "2"), ("2", "1"), ("2", "2")], out
    assert not any("num_fg" in line or "normalizer" in line for line in lines)  # diagnostics hidden
    done = [line for line in lines if re.match(rf"^epoch \d/2 done in \d+s: loss {NUM} \(cls .*\) {NUM} img/s", line)]
    assert len(done) == 2 and "ETA" in done[0] and "ETA" not in done[1], out
    val = [line for line in lines if line.startswith("validate epoch ")]
    assert len(val) == 2 and re.match(rf"^validate epoch 1/2: 1 batches in \d+s: map {NUM} map_50 {NUM}", val[0]), out
    assert not any("AP/" in line or "-1.0" in line for line in val)  # per-class AP and n/a values left out
    # order within epoch 1: its steps, its validation, then its summary line
    assert lines.index(steps[1].string) < lines.index(val[0]) < lines.index(done[0]) < lines.index(steps[2].string)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 45.4, 750, 3900, 2 * 86400 + 3 * 3600)] == ["0s", "45s", "12m30s", "1h05m", "2d03h"]


def test_validate_test_predict_print_plain_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``detectkit validate|test|predict`` in a log: a start line, a line per batch here (every_seconds
    ~0), and the result line; before, test and predict said nothing until the end (predict: nothing)."""
    torch.manual_seed(0)
    module = DetectionModule(TinyDetector(num_classes=2), class_names=["a", "b"])
    data = tiny_data(tmp_path, n_train=2, n_val=4, batch_size=2)
    t = pl.Trainer(default_root_dir=str(tmp_path), accelerator="cpu", devices=1, logger=False,
                   enable_checkpointing=False, enable_model_summary=False,
                   callbacks=[PlainProgressBar(every_seconds=1e-9)])
    data.setup("validate")
    for name, run in (("validate", t.validate), ("test", t.test), ("predict", t.predict)):
        run(module, dataloaders=data.val_dataloader())
        out = capsys.readouterr().out
        assert "\r" not in out and "\x1b" not in out
        lines = [line for line in out.strip().splitlines() if line.startswith(name)]
        assert lines[0] == f"{name}: 2 batches", out
        assert [re.match(rf"^{name} batch (\d)/2 \(\d+s\)$", line)[1] for line in lines[1:3]] == ["1", "2"], out
        end = (r"^predict: 2 batches \(4 images\) in \d+s$" if name == "predict"
               else rf"^{name}: 2 batches in \d+s: map {NUM} map_50 {NUM}")
        assert len(lines) == 4 and re.match(end, lines[3]), out
