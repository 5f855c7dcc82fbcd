"""A short ``detectkit fit`` logged to a real ``mlflow server`` (127.0.0.1) and read back."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tracking_helpers import mlflow_server, tiny_config  # noqa: E402

pytest.importorskip("mlflow")


def _all_artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for f in client.list_artifacts(run_id, path):
        out.extend(_all_artifacts(client, run_id, f.path) if f.is_dir else [f.path])
    return out


@pytest.mark.slow
def test_fit_logs_everything_to_mlflow_server(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from detectkit.cli import main

    with mlflow_server(tmp_path / "server") as url:
        cfg = tiny_config(
            tmp_path,
            logger={"class_path": "detectkit.tracking.MLFlowLogger",
                    "init_args": {"experiment_name": "tiny", "tracking_uri": url, "save_dir": str(tmp_path / "run")}},
            callbacks=[
                {"class_path": "detectkit.callbacks.TrackRun", "init_args": {"register_model": "tiny-detector"}},
                {"class_path": "detectkit.callbacks.LogValidationPredictions", "init_args": {"num_images": 2}},
            ],
        )
        main(["fit", "--config", str(cfg)])

        client = MlflowClient(tracking_uri=url)
        exp = client.get_experiment_by_name("tiny")
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == 1
        run = runs[0]
        assert run.info.status == "FINISHED"
        params, metrics = run.data.params, run.data.metrics
        # module hyperparameters (Lightning) and the flattened resolved CLI config (TrackRun)
        assert float(params["lr"]) == pytest.approx(1e-3)
        assert params["config/data.image_size"] == "64"
        assert params["config/trainer.max_epochs"] == "1"
        # metrics: losses, mAP and per-class AP
        assert "train/loss_epoch" in metrics or "train/loss_step" in metrics
        assert "val/map_50" in metrics
        per_class = [k for k in metrics if k.startswith("val/AP/")]
        assert per_class, sorted(metrics)
        history = client.get_metric_history(run.info.run_id, "val/map")
        assert len(history) >= 1

        files = _all_artifacts(client, run.info.run_id)
        assert "config/config.yaml" in files, files
        assert any(f.startswith("val_images/") and f.endswith(".png") for f in files), files
        assert any(f.startswith("plots/val_pr_curve") for f in files), files
        assert any(f.startswith("plots/val_confusion_matrix") for f in files), files
        assert any(f.startswith("checkpoints/") and f.endswith(".ckpt") for f in files), files

        # the uploaded config and checkpoint are the real files
        local = Path(client.download_artifacts(run.info.run_id, "config/config.yaml", str(tmp_path / "dl")))
        text = local.read_text()
        assert "TinyDetector" in text and "image_size: 64" in text
        ckpt_name = next(f for f in files if f.startswith("checkpoints/"))
        import torch

        ckpt = torch.load(client.download_artifacts(run.info.run_id, ckpt_name, str(tmp_path / "dl")),
                          map_location="cpu", weights_only=False)
        assert any(k.startswith("model.") for k in ckpt["state_dict"])

        versions = client.search_model_versions("name='tiny-detector'")
        assert len(versions) == 1 and versions[0].run_id == run.info.run_id


def test_default_mlflow_store_is_local_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No server, no MLFLOW_ALLOW_FILE_STORE: the default store is sqlite under save_dir."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow.tracking import MlflowClient

    from detectkit.tracking import MLFlowLogger

    logger = MLFlowLogger(experiment_name="local", save_dir=str(tmp_path / "runs"))
    logger.log_metrics({"x": 1.5}, step=0)
    logger.finalize("success")
    assert logger._tracking_uri.startswith("sqlite:///")
    assert (tmp_path / "runs" / "mlflow.db").is_file()
    run = MlflowClient(logger._tracking_uri).get_run(logger.run_id)
    assert run.data.metrics["x"] == 1.5
    assert run.info.artifact_uri.startswith((tmp_path / "runs" / "mlartifacts").as_uri())
