"""Experiment-tracking helpers: where MLflow stores runs by default, and logger factories.

MLflow 3 refuses its plain file store unless ``MLFLOW_ALLOW_FILE_STORE=true``, so the local
default here is a sqlite database (plus an artifact folder) inside the run directory. A team
points ``tracking_uri`` at an ``mlflow server`` instead (``http://host:5000``); nothing else
changes. W&B runs offline when ``WANDB_MODE=offline`` (or ``offline=True``) and can be synced
later with ``wandb sync <save_dir>/wandb/offline-run-*``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers import MLFlowLogger as _LightningMLFlowLogger

__all__ = [
    "MLFlowLogger",
    "default_mlflow_uri",
    "default_artifact_location",
    "flatten_config",
    "mlflow_logger",
    "wandb_logger",
    "find_logger",
    "run_dir",
]


def default_mlflow_uri(save_dir: str | os.PathLike = "runs") -> str:
    """``sqlite:///<abs save_dir>/mlflow.db``: a local store that needs no server and no opt-in."""
    path = Path(save_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


def default_artifact_location(save_dir: str | os.PathLike = "runs") -> str:
    """Artifacts of local runs live next to the sqlite file (MLflow would use ``./mlruns``)."""
    return (Path(save_dir).expanduser().resolve() / "mlartifacts").as_uri()


class MLFlowLogger(_LightningMLFlowLogger):
    """Lightning's ``MLFlowLogger`` whose default store is sqlite under ``save_dir``.

    Use it from YAML as ``class_path: detectkit.integrations.tracking.MLFlowLogger``. With ``tracking_uri``
    (or ``MLFLOW_TRACKING_URI``) set, it is exactly Lightning's logger talking to that server.
    """

    def __init__(
        self,
        experiment_name: str = "detectkit",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, Any] | None = None,
        save_dir: str = "runs",
        log_model: Literal[True, False, "all"] = False,
        prefix: str = "",
        artifact_location: str | None = None,
        run_id: str | None = None,
        synchronous: bool | None = None,
    ) -> None:
        uri = tracking_uri or os.getenv("MLFLOW_TRACKING_URI")
        if not uri:
            uri = default_mlflow_uri(save_dir)
            artifact_location = artifact_location or default_artifact_location(save_dir)
        self._detectkit_save_dir = str(save_dir)
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name,
            tracking_uri=uri,
            tags=tags,
            save_dir=save_dir,
            log_model=log_model,
            prefix=prefix,
            artifact_location=artifact_location,
            run_id=run_id,
            synchronous=synchronous,
        )

    @property
    def save_dir(self) -> str | None:
        """The local run folder (Lightning's returns ``None`` for non-file URIs), so that
        ``trainer.log_dir`` and the saved ``config.yaml`` land under it, not in the cwd."""
        return self._detectkit_save_dir


def mlflow_logger(
    experiment_name: str = "detectkit",
    tracking_uri: str | None = None,
    save_dir: str = "runs",
    run_name: str | None = None,
    **kwargs: Any,
) -> MLFlowLogger:
    """An MLflow logger: the given server/URI, ``MLFLOW_TRACKING_URI``, or local sqlite."""
    return MLFlowLogger(experiment_name=experiment_name, tracking_uri=tracking_uri, save_dir=save_dir,
                        run_name=run_name, **kwargs)


def wandb_logger(
    project: str = "detectkit",
    save_dir: str = "runs",
    name: str | None = None,
    offline: bool | None = None,
    **kwargs: Any,
) -> Logger:
    """A W&B logger; offline when asked or when ``WANDB_MODE`` is ``offline``/``disabled``."""
    from lightning.pytorch.loggers import WandbLogger

    if offline is None:
        offline = os.getenv("WANDB_MODE", "").lower() in ("offline", "dryrun")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(project=project, save_dir=save_dir, name=name, offline=offline, **kwargs)


def flatten_config(config: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested config -> ``{"model.lr": 0.001, ...}`` (lists become strings).

    jsonargparse's ``init_args`` level (subclass mode: ``data.init_args.image_size``) is left out
    of the names, so a parameter keeps one name whether or not its section names a class.
    """
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key == "init_args" and isinstance(value, Mapping):
            out.update(flatten_config(value, prefix, sep))
            continue
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten_config(value, name, sep))
        elif isinstance(value, list | tuple) and any(isinstance(v, Mapping) for v in value):
            # callbacks, loggers: one name per entry and field, not one long (truncated) string
            out.update(flatten_config({str(i): v for i, v in enumerate(value)}, name, sep))
        elif isinstance(value, list | tuple):
            out[name] = str(list(value))
        else:
            out[name] = value
    return out


def run_dir(trainer: Any) -> Path:
    """This run's own folder: ``ModelCheckpoint``'s default rule minus ``checkpoints/``.

    ``trainer.log_dir`` is the logger's ``save_dir`` for MLflow and W&B, shared by every run
    logged there; the per-run folder is ``<save_dir>/<experiment id or project>/<run id>``
    (``<save_dir>/<name>/version_<n>`` for TensorBoard/CSV); without a logger ``default_root_dir``.
    """
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    if type(logger).__name__ in ("CSVLogger", "TensorBoardLogger"):  # their own per-version folder
        return Path(logger.log_dir)
    if logger.save_dir is None:
        return Path(trainer.default_root_dir)
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(logger.save_dir) / str(logger.name) / version


def find_logger(loggers: list[Logger], kind: str) -> Logger | None:
    """The first logger whose class name contains ``kind`` (``"MLFlow"``, ``"Wandb"``, ``"TensorBoard"``)."""
    for logger in loggers:
        if kind.lower() in type(logger).__name__.lower():
            return logger
    return None
