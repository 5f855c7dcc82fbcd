"""The documented custom-callback example, registered from YAML ``trainer.callbacks`` and run
through the real ``detectkit fit`` CLI."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from tracking_helpers import tiny_config  # noqa: E402


def test_custom_callback_from_yaml_through_cli(tmp_path: Path) -> None:
    from detectkit.callbacks.examples import GradientNormMonitor

    from detectkit.cli import main

    cfg = tiny_config(
        tmp_path,
        logger={"class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path / "run"), "name": "csv"}},
        callbacks=[{"class_path": "detectkit.callbacks.examples.GradientNormMonitor",
                    "init_args": {"every_n_steps": 1}}],
    )
    assert main(["fit", "--config", str(cfg), "--trainer.log_every_n_steps", "1"]) == 0

    log_dir = tmp_path / "run" / "csv" / "version_0"
    rows = list(csv.DictReader(open(log_dir / "metrics.csv")))
    norms = [float(r["train/grad_norm"]) for r in rows if r.get("train/grad_norm")]
    assert len(norms) == 2 and all(math.isfinite(n) and n > 0 for n in norms), norms  # 8 images / batch 4

    # the resolved config records the callback with its arguments
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    entry = [c for c in saved["trainer"]["callbacks"] if c["class_path"].endswith("GradientNormMonitor")]
    assert entry and entry[0]["init_args"]["every_n_steps"] == 1

    # its state is in the checkpoint under its state_key
    ckpt = torch.load(next((log_dir / "checkpoints").glob("last*.ckpt")), map_location="cpu", weights_only=False)
    key = GradientNormMonitor(every_n_steps=1).state_key
    assert ckpt["callbacks"][key] == {"nonfinite_steps": 0}
