"""``TrackRun``: what a tracked experiment needs beyond the metrics Lightning logs by itself.

At fit start (CLI runs): the resolved LightningCLI config, written as ``config.yaml`` into this
run's own folder (``<save_dir>/<experiment or project>/<run id>/``, where ``ModelCheckpoint``
puts ``checkpoints/``) and uploaded to this run; and the same config flattened as the run's
parameters, each logged once (see ``log_config``).
At fit teardown (after every ``on_fit_end``, so exporters have written their files, and before
the loggers are finalised): a weights-only file (EMA weights + the detectkit record, optionally
fp16) instead of the full training checkpoint, ONNX/engine files found in the run folder, and for
MLflow an MLflow ``pyfunc`` model around that file (``mlflow.pyfunc.load_model(uri).predict``,
see :mod:`detectkit.integrations.mlflow_pyfunc`), optionally registered.
The learning rate is logged by ``DetectionModule`` itself (``train/lr_<param group>``) in every
fit, tracked or not; per-class AP as ``val/AP/<class>``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

from detectkit.integrations.tracking import flatten_config, run_dir

__all__ = ["TrackRun"]

log = logging.getLogger(__name__)

_MODEL_SUFFIXES = (".onnx", ".engine", ".plan")
ARTIFACTS = ("weights", "checkpoint")


class TrackRun(Callback):
    """Log the config, the trained weights and exported files of a run to MLflow and/or W&B.

    Args:
        log_config: write/upload this run's resolved CLI ``config.yaml`` and log the flattened
            config (``model.lr``, ``data.image_size``, ``trainer.max_epochs``, ...) as the run's
            parameters. It is then the one source of parameters: Lightning's own hyperparameter
            logging (the module's and datamodule's init arguments again, under other names) is
            switched off for the fit through the public ``Trainer.enable_autolog_hparams``.
            Outside the CLI there is no config and Lightning's hyperparameters are logged as usual.
        artifact: what to upload from the best checkpoint (else the last, else the module at fit
            end): ``"weights"`` (default) a weights-only file written by
            :func:`detectkit.checkpoint.save_weights` (EMA weights + detectkit record, loads with
            :func:`detectkit.load`), ``"checkpoint"`` the full Lightning checkpoint (optimizer
            and EMA state: resumable, several times larger), ``None`` nothing.
        half: store the weights file in fp16 (half the size; ``detectkit.load`` casts back).
        log_exports: upload ``*.onnx`` / ``*.engine`` files found under the run folder.
        register_model: MLflow registered-model name; a new version points at this run's
            ``model`` (the pyfunc model around the uploaded weights). ``None``: no registration.
        config_filename: the name of the per-run config file.
    """

    def __init__(
        self,
        log_config: bool = True,
        artifact: Literal["weights", "checkpoint"] | None = "weights",
        half: bool = False,
        log_exports: bool = True,
        register_model: str | None = None,
        config_filename: str = "config.yaml",
    ) -> None:
        if artifact not in (*ARTIFACTS, None):
            raise ValueError(f"TrackRun: artifact must be one of {ARTIFACTS} or None, got {artifact!r}")
        self.log_config = log_config
        self.artifact = artifact
        self.half = half
        self.log_exports = log_exports
        self.register_model = register_model
        self.config_filename = config_filename
        self.logged: list[str] = []
        self.model_version: str | None = None
        self.weights_path: Path | None = None
        self.config_path: Path | None = None

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.log_config:
            return
        text, config = self._cli_config(trainer)
        if config is None:
            return
        # one source of parameters (every rank agrees; only rank zero's loggers write)
        trainer.enable_autolog_hparams = False
        if not trainer.is_global_zero:
            return
        params = {k: v for k, v in flatten_config(config).items() if v is not None}
        for logger in trainer.loggers:
            try:
                if isinstance(logger, WandbLogger):
                    logger.experiment.config.update(params, allow_val_change=True)
                else:
                    logger.log_hyperparams(params)
            except Exception as e:  # tracking must never stop training
                log.warning("TrackRun: could not log the config to %s: %s", type(logger).__name__, e)
        folder = run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        self.config_path = folder / self.config_filename
        self.config_path.write_text(text)
        self._upload(trainer, self.config_path, "config")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero or not _tracking_loggers(trainer):
            return
        if self.artifact is not None:
            path = self._model_file(trainer, pl_module)
            if path is not None:
                self._log_model_file(trainer, path)
        elif self.register_model:
            log.warning("TrackRun: register_model needs an artifact (artifact=None uploads none); not registered")
        if self.log_exports:
            for path in self._exported_files(trainer):
                self._upload(trainer, path, "export", wandb_type="model")

    # ------------------------------------------------------------ the work
    @staticmethod
    def _cli_config(trainer: pl.Trainer) -> tuple[str, dict[str, Any] | None]:
        """The resolved CLI config as YAML text (exactly what ``SaveConfigCallback`` writes) and
        as a dict; ``("", None)`` outside the CLI."""
        import yaml
        from lightning.pytorch.cli import SaveConfigCallback

        for cb in trainer.callbacks:
            if isinstance(cb, SaveConfigCallback):
                text = cb.parser.dump(cb.config, skip_none=False)
                return text, yaml.safe_load(text)  # the params are the file, nothing else
        return "", None

    @staticmethod
    def _checkpoint(trainer: pl.Trainer) -> Path | None:
        for cb in trainer.checkpoint_callbacks:
            for attr in ("best_model_path", "last_model_path"):
                p = getattr(cb, attr, "")
                if p and os.path.isfile(p):
                    return Path(p)
        return None

    def _model_file(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        """The file to upload: the full checkpoint, or a weights file written next to it."""
        ckpt = self._checkpoint(trainer)
        if self.artifact == "checkpoint":
            if ckpt is None:
                log.warning("TrackRun: artifact='checkpoint' but no checkpoint file was written; nothing uploaded")
            return ckpt
        # the best checkpoint, when there is one, is what ModelCheckpoint chose; else the module,
        # which holds the averaged weights at teardown (WeightAveraging copies them in at train end)
        source: Any = ckpt if ckpt is not None else pl_module
        path = run_dir(trainer) / ("weights_fp16.pt" if self.half else "weights.pt")
        try:
            from detectkit.checkpoint import save_weights

            save_weights(source, path, half=self.half)
        except Exception as e:
            log.warning("TrackRun: could not write the weights file %s: %s", path, e)
            return None
        self.weights_path = path
        return path

    def _log_model_file(self, trainer: pl.Trainer, path: Path) -> None:
        for logger in trainer.loggers:
            kind = type(logger).__name__
            if isinstance(logger, MLFlowLogger):
                self._mlflow_model(logger, path)
            elif isinstance(logger, WandbLogger):
                try:
                    self._wandb_artifact(logger.experiment, path, "model")
                    self.logged.append(f"{kind}:model/{path.name}")
                except Exception as e:
                    log.warning("TrackRun: could not log %s to %s: %s", path, kind, e)

    def _mlflow_model(self, logger: Any, path: Path) -> None:
        """``model/``: an MLflow pyfunc model holding the file (one copy), then the registration."""
        client = logger.experiment
        try:
            from detectkit.integrations.mlflow_pyfunc import save_pyfunc_model

            with tempfile.TemporaryDirectory() as tmp:
                model_dir = save_pyfunc_model(path, Path(tmp) / "model")
                client.log_artifacts(logger.run_id, str(model_dir), artifact_path="model")
            self.logged.append(f"{type(logger).__name__}:model/artifacts/{path.name}")
        except Exception as e:  # an MLflow model problem must not lose the weights
            log.warning("TrackRun: could not log an MLflow pyfunc model (%s); uploading %s alone", e, path.name)
            self._upload_to(logger, path, "weights")
            return
        if self.register_model:
            self._register(logger)

    def _exported_files(self, trainer: pl.Trainer) -> list[Path]:
        """Model files under this run's folder that no exporter callback has uploaded already.

        Not ``trainer.log_dir``: for MLflow and W&B that is the ``save_dir`` every run shares."""
        from detectkit.callbacks.export import ExportOnFitEnd

        already = set()
        for cb in trainer.callbacks:
            if isinstance(cb, ExportOnFitEnd):
                already.update(os.path.abspath(f) for f in cb.files)
        roots = {run_dir(trainer)}
        for cb in trainer.checkpoint_callbacks:
            if getattr(cb, "dirpath", None):
                roots.add(Path(cb.dirpath).parent)
        found: list[Path] = []
        for root in roots:
            if not root.is_dir():
                continue
            for p in sorted(root.rglob("*")):
                if p.suffix in _MODEL_SUFFIXES and p.is_file() and os.path.abspath(p) not in already and p not in found:
                    found.append(p)
        return found

    def _upload(self, trainer: pl.Trainer, path: Path, artifact_path: str, wandb_type: str = "file") -> None:
        for logger in trainer.loggers:
            kind = type(logger).__name__
            if isinstance(logger, MLFlowLogger):
                self._upload_to(logger, path, artifact_path)
            elif isinstance(logger, WandbLogger):
                try:
                    if wandb_type == "file":
                        self._wandb_file(logger.experiment, path)
                    else:
                        self._wandb_artifact(logger.experiment, path, wandb_type)
                    self.logged.append(f"{kind}:{artifact_path}/{path.name}")
                except Exception as e:  # an upload failure must not lose the run
                    log.warning("TrackRun: could not log %s to %s: %s", path, kind, e)

    def _upload_to(self, logger: Any, path: Path, artifact_path: str) -> None:
        try:
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=artifact_path)
            self.logged.append(f"{type(logger).__name__}:{artifact_path}/{path.name}")
        except Exception as e:  # an upload failure must not lose the run
            log.warning("TrackRun: could not log %s to %s: %s", path, type(logger).__name__, e)

    @staticmethod
    def _wandb_file(run: Any, path: Path) -> None:
        """Small text files: part of the run's files (visible offline); renamed because W&B keeps
        its own ``config.yaml`` in the same folder."""
        dest = Path(run.dir) / f"lightning_{path.name}"
        shutil.copyfile(path, dest)
        run.save(str(dest), base_path=str(run.dir), policy="now")

    @staticmethod
    def _wandb_artifact(run: Any, path: Path, wandb_type: str) -> None:
        import wandb

        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{run.id}-{path.stem}")
        artifact = wandb.Artifact(name, type=wandb_type, metadata={"file": path.name})
        artifact.add_file(str(path))
        run.log_artifact(artifact)

    def _register(self, logger: Any) -> None:
        client = logger.experiment
        try:
            from mlflow.exceptions import MlflowException

            try:
                client.create_registered_model(self.register_model)
            except MlflowException:
                pass  # exists already
            run = client.get_run(logger.run_id)
            source = f"{run.info.artifact_uri}/model"
            mv = client.create_model_version(self.register_model, source=source, run_id=logger.run_id,
                                             description=f"detectkit {self.artifact} ({'fp16' if self.half else 'fp32'})")
            self.model_version = str(mv.version)
            log.info("TrackRun: registered %s version %s", self.register_model, mv.version)
        except Exception as e:
            log.warning("TrackRun: model registration failed: %s", e)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"logged": list(self.logged), "model_version": self.model_version}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.logged = list(state_dict.get("logged", []))
        self.model_version = state_dict.get("model_version")


def _tracking_loggers(trainer: pl.Trainer) -> bool:
    """Whether any logger here is one TrackRun uploads to (MLflow, W&B)."""
    return any(isinstance(logger, MLFlowLogger | WandbLogger) for logger in trainer.loggers)
