"""Two short ``detectkit fit`` runs logged to a real ``mlflow server`` (127.0.0.1) and read back:
parameters once each, the learning rate, one config per run, a small weights artifact that
``detectkit.load`` reads, and a registered model that ``mlflow.pyfunc.load_model`` predicts with."""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from compress_helpers import TinyDetector, tiny_datamodule  # noqa: E402
from tracking_helpers import mlflow_server, tiny_config  # noqa: E402

from detectkit.modules import OptimConfig
from detectkit.ops import PostprocessConfig

pytest.importorskip("mlflow")


def _all_artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for f in client.list_artifacts(run_id, path):
        out.extend(_all_artifacts(client, run_id, f.path) if f.is_dir else [f.path])
    return out


def _mlflow_logger(url: str, save_dir: Path) -> dict:
    return {"class_path": "detectkit.integrations.tracking.MLFlowLogger",
            "init_args": {"experiment_name": "tiny", "tracking_uri": url, "save_dir": str(save_dir)}}


@pytest.mark.slow
def test_fit_logs_everything_to_mlflow_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    import detectkit
    from detectkit.cli import DetectkitCLI
    from detectkit.integrations.tracking import flatten_config

    shared = tmp_path / "runs"  # both runs log to one save_dir, as a team's recipe does
    with mlflow_server(tmp_path / "server") as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        track = {"class_path": "detectkit.callbacks.TrackRun", "init_args": {"register_model": "tiny-detector"}}
        first = tiny_config(
            tmp_path / "a", logger=_mlflow_logger(url, shared),
            callbacks=[track, {"class_path": "detectkit.callbacks.LogValidationPredictions", "init_args": {"num_images": 2}}],
            model_args={"predict_postprocess": {"conf": 0.01, "max_det": 10}},  # the pyfunc uses the checkpoint's defaults
        )
        cli = DetectkitCLI(args=["fit", "--config", str(first)])
        second = tiny_config(tmp_path / "b", logger=_mlflow_logger(url, shared), callbacks=[track], model_args={"optim": {"lr": 2e-3, "warmup_steps": 1}})
        DetectkitCLI(args=["fit", "--config", str(second)])

        client = MlflowClient(tracking_uri=url)
        exp = client.get_experiment_by_name("tiny")
        runs = sorted(client.search_runs([exp.experiment_id]), key=lambda r: r.info.start_time)
        assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
        run = runs[0]
        dl = tmp_path / "dl"

        # one config per run: uploaded to the run and written into the run's own folder
        for r, lr in zip(runs, ("0.001", "0.002")):
            local = Path(client.download_artifacts(r.info.run_id, "config/config.yaml", str(dl / r.info.run_id)))
            config = yaml.safe_load(local.read_text())
            assert config["model"]["optim"]["lr"] == float(lr) and "tracking_tiny" in local.read_text()
            own = shared / exp.experiment_id / r.info.run_id / "config.yaml"
            assert own.read_text() == local.read_text()
            # parameters: the flattened resolved config, each once; no second copy of the
            # module's hyper-parameters under their bare names
            expected = {k for k, v in flatten_config(config).items() if v is not None}
            params = r.data.params
            assert set(params) == expected and len(params) == len(expected), sorted(set(params) ^ expected)
            assert params["model.optim.lr"] == lr and params["data.image_size"] == "64" and params["trainer.max_epochs"] == "1"
            assert not {"optim/lr", "image_size", "optim", "config/model.optim.lr"} & set(params)

        # metrics: losses, learning rate per param group, mAP and per-class AP
        metrics = run.data.metrics
        assert {"train/loss_epoch", "train/loss_step", "train/lr_decay", "train/lr_no_decay", "val/map_50"} <= set(metrics)
        assert [k for k in metrics if k.startswith("val/AP/")], sorted(metrics)
        assert len(client.get_metric_history(run.info.run_id, "train/lr_decay")) >= 2

        files = _all_artifacts(client, run.info.run_id)
        assert "config/config.yaml" in files, files
        assert any(f.startswith("val_images/") and f.endswith(".png") for f in files), files
        assert any(f.startswith("plots/val_pr_curve") for f in files), files
        assert any(f.startswith("plots/val_confusion_matrix") for f in files), files
        assert {"model/MLmodel", "model/artifacts/weights.pt", "model/requirements.txt"} <= set(files), files
        assert not [f for f in files if f.endswith(".ckpt")], files  # no training checkpoint uploaded

        # the weights artifact: far smaller than the training checkpoint, the trained weights
        weights = Path(client.download_artifacts(run.info.run_id, "model/artifacts/weights.pt", str(dl / "w")))
        ckpt = next((shared / exp.experiment_id / run.info.run_id / "checkpoints").glob("last*.ckpt"))
        assert weights.stat().st_size < ckpt.stat().st_size / 2, (weights.stat().st_size, ckpt.stat().st_size)
        loaded = detectkit.load(weights)
        assert loaded.class_names == list(cli.model.class_names)
        assert tuple(loaded.inference.image_size) == (64, 64)
        trained = cli.model.model.eval()
        x = torch.rand(2, 3, 64, 64)
        with torch.no_grad():
            for a, b in zip(loaded(x), trained(x)):
                torch.testing.assert_close(a, b)

        # the registered model loads with MLflow alone and predicts what detectkit predicts
        versions = sorted(client.search_model_versions("name='tiny-detector'"), key=lambda v: int(v.version))
        assert [v.run_id for v in versions] == [runs[0].info.run_id, runs[1].info.run_id]
        monkeypatch.setenv("DETECTKIT_PYFUNC_ALLOWED_DIRS", str(tmp_path))  # paths only where the deployer allows
        pyfunc = mlflow.pyfunc.load_model("models:/tiny-detector/1")
        image = sorted(p for p in (tmp_path / "a" / "data").rglob("*") if p.suffix in (".jpg", ".png"))[0]
        b64 = base64.b64encode(image.read_bytes()).decode()
        import pandas as pd

        out = pyfunc.predict(pd.DataFrame({"image": [str(image), b64]}))
        assert {"image", "box", "score", "class_name"} <= set(out.columns)
        assert 0 < len(out[out.image == 0]) <= 10  # predict_conf 0.01 / predict_max_det 10 from the checkpoint
        a, b = out[out.image == 0].reset_index(drop=True), out[out.image == 1].reset_index(drop=True)
        assert a.score.tolist() == b.score.tolist() and a.box.tolist() == b.box.tolist()  # path and base64 alike
        ref = loaded.predict([str(image)])[0]
        assert a.score.tolist() == pytest.approx(ref.scores.tolist())
        assert a.class_name.tolist() == ref.names
        assert set(a.class_name) <= set(cli.model.class_names)


def test_default_mlflow_store_is_local_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No server, no MLFLOW_ALLOW_FILE_STORE: the default store is sqlite under save_dir."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow.tracking import MlflowClient

    from detectkit.integrations.tracking import MLFlowLogger

    logger = MLFlowLogger(experiment_name="local", save_dir=str(tmp_path / "runs"))
    logger.log_metrics({"x": 1.5}, step=0)
    logger.finalize("success")
    assert logger._tracking_uri.startswith("sqlite:///")
    assert (tmp_path / "runs" / "mlflow.db").is_file()
    run = MlflowClient(logger._tracking_uri).get_run(logger.run_id)
    assert run.data.metrics["x"] == 1.5
    assert run.info.artifact_uri.startswith((tmp_path / "runs" / "mlartifacts").as_uri())


def test_pyfunc_inputs_and_clear_errors(tmp_path: Path) -> None:
    """The pyfunc's input forms give the same detections; bad inputs name the image and the problem."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from detectkit.integrations.mlflow_pyfunc import OUTPUT_COLUMNS, DetectkitPythonModel, InputPolicy

    pyfunc = DetectkitPythonModel()
    pyfunc.policy = InputPolicy(allowed_dirs=(os.path.realpath(tmp_path),))  # what load_context sets from the config
    pyfunc.model = TinyDetector(num_classes=3, cls_prior=0.3).eval()  # what load_context sets from the weights
    pyfunc.model.class_names = ["a", "b", "c"]
    rgb = np.random.default_rng(0).integers(0, 255, (64, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    raw = (tmp_path / "x.png").read_bytes()

    from_path = pyfunc.predict(None, pd.DataFrame({"image": [str(tmp_path / "x.png")]}))
    assert list(from_path.columns) == list(OUTPUT_COLUMNS) and len(from_path) > 0
    assert set(from_path.class_name) <= {"a", "b", "c"} and from_path.source.iloc[0] == os.path.realpath(tmp_path / "x.png")
    for other in ([rgb], rgb, rgb[None], [raw], pd.DataFrame({"anything": [base64.b64encode(raw).decode()]})):
        out = pyfunc.predict(None, other)
        assert out.score.tolist() == from_path.score.tolist() and out.box.tolist() == from_path.box.tolist()
    assert len(pyfunc.predict(None, [])) == 0

    with pytest.raises(ValueError, match="image 1: no such file in the allowed folders"):
        pyfunc.predict(None, [str(tmp_path / "x.png"), str(tmp_path / "missing.png")])
    with pytest.raises(ValueError, match="image 0: not a readable image"):
        pyfunc.predict(None, [b"not an image"])
    with pytest.raises(ValueError, match="image 0: arrays must be HWC RGB uint8"):
        pyfunc.predict(None, [rgb.astype(np.float32)])
    with pytest.raises(ValueError, match="needs an 'image' column"):
        pyfunc.predict(None, pd.DataFrame({"a": [1], "b": [2]}))


def test_plain_trainer_full_checkpoint_artifact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside the CLI (no config): Lightning's hyper-parameters are the params, once; with
    ``artifact="checkpoint"`` the pyfunc model wraps the full checkpoint and still predicts."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import lightning.pytorch as pl
    import mlflow
    import numpy as np
    from detectkit.callbacks import TrackRun
    from lightning.pytorch.callbacks import ModelCheckpoint
    from mlflow.tracking import MlflowClient

    from detectkit.integrations.tracking import MLFlowLogger
    from detectkit.modules.detector import DetectionModule

    logger = MLFlowLogger(experiment_name="plain", save_dir=str(tmp_path / "runs"))
    track = TrackRun(artifact="checkpoint")
    module = DetectionModule("tracking_tiny", num_classes=3, optim=OptimConfig(lr=1e-3, warmup_steps=1),
                             predict_postprocess=PostprocessConfig(conf=0.01, max_det=5))
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1,
                         accelerator="cpu", logger=logger, callbacks=[ModelCheckpoint(save_last=True), track],
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=tiny_datamodule(tmp_path / "data"))

    client = MlflowClient(logger._tracking_uri)
    run = client.get_run(logger.run_id)
    params = run.data.params
    assert params["optim/lr"] == "0.001" and params["model"] == "tracking_tiny"  # Lightning's hparams, bare names
    assert not [k for k in params if k.startswith(("model.", "trainer.", "config"))], sorted(params)
    files = _all_artifacts(client, logger.run_id)
    assert [f for f in files if f.endswith(".ckpt")] == [f"model/artifacts/{Path(track._checkpoint(trainer)).name}"], files
    assert not [f for f in files if f.startswith("config/")], files
    assert track.config_path is None and track.weights_path is None
    pyfunc = mlflow.pyfunc.load_model(f"{run.info.artifact_uri}/model")
    image = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    out = pyfunc.predict([image])
    assert 0 < len(out) <= 5 and set(out.class_name) <= set(module.class_names)


def test_models_saved_before_the_move_still_load():
    """An MLflow model saved earlier carries a copy of the old "model from code" file, which imports
    ``detectkit.mlflow_pyfunc``: that path must keep naming the same model class."""
    pytest.importorskip("mlflow")
    import detectkit.integrations.mlflow_pyfunc as current
    import detectkit.mlflow_pyfunc as saved_path

    assert saved_path.DetectkitPythonModel is current.DetectkitPythonModel
