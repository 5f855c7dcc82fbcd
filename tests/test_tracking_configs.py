"""The experiment overlays (MLflow, W&B, DDP) parse against the real CLI on top of quickstart.yaml:
every class_path resolves and every key is a real argument."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.mark.parametrize("overlay", ["quickstart_mlflow.yaml", "quickstart_wandb.yaml", "quickstart_ddp.yaml"])
def test_overlay_parses_on_quickstart(overlay: str) -> None:
    from detectkit.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(EXPERIMENTS / "quickstart.yaml"), "--config", str(EXPERIMENTS / overlay),
              "--print_config"])
    assert exc.value.code in (0, None)
    cfg = yaml.safe_load(out.getvalue())
    assert cfg["model"]["model"] == "yolo_nas_s"  # the quickstart underneath is kept
    callbacks = [c["class_path"] for c in cfg["trainer"]["callbacks"]]
    assert "lightning.pytorch.callbacks.RichProgressBar" in callbacks
    if overlay == "quickstart_mlflow.yaml":
        assert cfg["trainer"]["logger"]["class_path"] == "detectkit.integrations.tracking.MLFlowLogger"
        assert {"detectkit.callbacks.TrackRun", "detectkit.callbacks.LogValidationPredictions"} <= set(callbacks)
    if overlay == "quickstart_ddp.yaml":
        assert cfg["trainer"]["strategy"] == "ddp"
        assert cfg["trainer"]["plugins"][0]["class_path"] == "detectkit.checkpoint.lightning_io.AtomicCheckpointIO"
