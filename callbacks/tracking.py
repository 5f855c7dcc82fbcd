"""``TrackRun``: what a tracked experiment needs beyond the metrics Lightning logs by itself.

At fit start: the resolved LightningCLI config file (``config.yaml`` written by the CLI's
``SaveConfigCallback`` into ``trainer.log_dir``) and the flattened config as parameters.
At fit teardown (after every ``on_fit_end``, so exporters have written their files, and before
the loggers are finalised): the best checkpoint, ONNX/engine files found in the run folder, and
optionally an MLflow registered-model version pointing at the logged checkpoint.
Per-class AP is already logged by ``DetectionModule`` as ``val/AP/<class>``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from detectkit.tracking import find_logger, flatten_config

__all__ = ["TrackRun"]

log = logging.getLogger(__name__)

_MODEL_SUFFIXES = (".onnx", ".engine", ".plan")


class TrackRun(Callback):
    """Log the config, checkpoint and exported files of a run to MLflow and/or W&B.

    Args:
        log_config: upload the CLI's ``config.yaml`` and log the flattened config as params.
        log_checkpoint: upload the best checkpoint (else the last one) at the end of fit.
        log_exports: upload ``*.onnx`` / ``*.engine`` files found under the run folder.
        register_model: MLflow registered-model name; a new version points at the uploaded
            checkpoint folder (``None``: no registration).
        config_filename: the name ``SaveConfigCallback`` writes (LightningCLI's default).
    """

    def __init__(
        self,
        log_config: bool = True,
        log_checkpoint: bool = True,
        log_exports: bool = True,
        register_model: str | None = None,
        config_filename: str = "config.yaml",
    ) -> None:
        self.log_config = log_config
        self.log_checkpoint = log_checkpoint
        self.log_exports = log_exports
        self.register_model = register_model
        self.config_filename = config_filename
        self.logged: list[str] = []
        self.model_version: str | None = None

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not self.log_config:
            return
        cfg_path, config = self._cli_config(trainer)
        if config:
            params = {f"config/{k}": v for k, v in flatten_config(config).items() if v is not None}
            for logger in trainer.loggers:
                try:
                    if "Wandb" in type(logger).__name__:
                        logger.experiment.config.update({"config": config}, allow_val_change=True)
                    else:
                        logger.log_hyperparams(params)
                except Exception as e:  # tracking must never stop training
                    log.warning("TrackRun: could not log the config to %s: %s", type(logger).__name__, e)
        if cfg_path is not None and cfg_path.is_file():
            self._upload(trainer, cfg_path, "config")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        ckpt = self._checkpoint(trainer) if self.log_checkpoint else None
        if ckpt is not None:
            self._upload(trainer, ckpt, "checkpoints", wandb_type="model")
            if self.register_model:
                self._register(trainer, ckpt)
        if self.log_exports:
            for path in self._exported_files(trainer):
                self._upload(trainer, path, "export", wandb_type="model")

    # ------------------------------------------------------------ the work
    def _cli_config(self, trainer: pl.Trainer) -> tuple[Path | None, dict[str, Any] | None]:
        """The file the CLI saved and the resolved config it holds (``None`` outside the CLI)."""
        from lightning.pytorch.cli import SaveConfigCallback

        for cb in trainer.callbacks:
            if isinstance(cb, SaveConfigCallback):
                config = cb.config.as_dict() if hasattr(cb.config, "as_dict") else dict(cb.config)
                path = Path(trainer.log_dir or trainer.default_root_dir) / cb.config_filename
                return path, config
        path = Path(trainer.log_dir or trainer.default_root_dir) / self.config_filename
        return (path if path.is_file() else None), None

    @staticmethod
    def _checkpoint(trainer: pl.Trainer) -> Path | None:
        for cb in trainer.checkpoint_callbacks:
            for attr in ("best_model_path", "last_model_path"):
                p = getattr(cb, attr, "")
                if p and os.path.isfile(p):
                    return Path(p)
        return None

    def _exported_files(self, trainer: pl.Trainer) -> list[Path]:
        """Model files under the run folder that no exporter callback has uploaded already."""
        already = set()
        for cb in trainer.callbacks:
            if type(cb).__name__ == "ExportOnFitEnd":
                already.update(os.path.abspath(f) for f in getattr(cb, "files", []))
        roots = {Path(trainer.log_dir or trainer.default_root_dir)}
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
            try:
                if "MLFlow" in kind:
                    logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=artifact_path)
                elif "Wandb" in kind:
                    self._wandb_upload(logger.experiment, path, wandb_type)
                else:
                    continue
                self.logged.append(f"{kind}:{artifact_path}/{path.name}")
            except Exception as e:  # an upload failure must not lose the run
                log.warning("TrackRun: could not log %s to %s: %s", path, kind, e)

    @staticmethod
    def _wandb_upload(run: Any, path: Path, wandb_type: str) -> None:
        if wandb_type == "file":  # small text files: part of the run's files (visible offline)
            import shutil

            # renamed: W&B keeps its own ``config.yaml`` in the same folder
            dest = Path(run.dir) / f"lightning_{path.name}"
            shutil.copyfile(path, dest)
            run.save(str(dest), base_path=str(run.dir), policy="now")
            return
        import re

        import wandb

        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{run.id}-{path.stem}")
        artifact = wandb.Artifact(name, type=wandb_type)
        artifact.add_file(str(path))
        run.log_artifact(artifact)

    def _register(self, trainer: pl.Trainer, ckpt: Path) -> None:
        logger = find_logger(trainer.loggers, "MLFlow")
        if logger is None:
            log.warning("TrackRun: register_model needs an MLFlowLogger; skipped")
            return
        client = logger.experiment
        try:
            from mlflow.exceptions import MlflowException

            try:
                client.create_registered_model(self.register_model)
            except MlflowException:
                pass  # exists already
            run = client.get_run(logger.run_id)
            source = f"{run.info.artifact_uri}/checkpoints"
            mv = client.create_model_version(self.register_model, source=source, run_id=logger.run_id,
                                             description=f"checkpoint {ckpt.name}")
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
