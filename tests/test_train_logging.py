"""What every fit logs without a tracker: the learning rate per param group, and losses whose
epoch means are reduced over ranks without Lightning's ``sync_dist`` warning."""

from __future__ import annotations

import csv
import socket
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from compress_helpers import TinyDetector, tiny_datamodule  # noqa: E402

from detectkit.modules import OptimConfig


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fit_logs_lr_and_no_sync_dist_warning_for_train_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A DDP fit (one gloo process, so torch.distributed is initialised as on a cluster): the
    train losses at epoch level are reduced with sync_dist and Lightning has nothing to warn
    about; the learning rate of both AdamW groups reaches the logger every logged step."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from detectkit.modules.detector import DetectionModule

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    module = DetectionModule(TinyDetector(num_classes=3, cls_prior=0.2),
                             optim=OptimConfig(lr=1e-3, warmup_steps=2))
    logger = CSVLogger(tmp_path, name="run")
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=1,
                         accelerator="cpu", devices=1, strategy="ddp", logger=logger, log_every_n_steps=1,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, datamodule=tiny_datamodule(tmp_path / "data"))
        assert torch.distributed.is_initialized()  # the warning's precondition held during the fit
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    sync_warnings = [str(w.message) for w in caught if "sync_dist" in str(w.message)]
    # (val/* from DetectionModule._log_map are the metric's: computed from synced states, owned there)
    assert not [m for m in sync_warnings if "'train/" in m], sync_warnings

    rows = list(csv.DictReader((Path(logger.log_dir) / "metrics.csv").read_text().splitlines()))
    lr = [(int(r["step"]), float(r["train/lr_decay"]), float(r["train/lr_no_decay"])) for r in rows if r.get("train/lr_decay")]
    assert [s for s, _, _ in lr] == [0, 1, 2, 3], lr
    assert lr[0][1] < lr[1][1], "the warmup must raise the lr over the first steps"
    assert all(d == n for _, d, n in lr)  # both groups follow one schedule
    epoch_losses = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    step_losses = [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]
    assert len(epoch_losses) == 2 and len(step_losses) == 4
    assert epoch_losses[0] == pytest.approx(sum(step_losses[:2]) / 2, rel=1e-5)  # the mean of the epoch's steps
    # visible to callbacks (run report, progress, NaN guard) under their names
    assert {"train/lr_decay", "train/loss", "train/loss_epoch"} <= set(trainer.callback_metrics)
    assert "train/loss" not in rows[0]  # ... and not logged twice
