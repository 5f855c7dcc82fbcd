"""Shared by the tracking tests: a real ``mlflow server`` on 127.0.0.1 and a tiny CLI config."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from compress_helpers import TinyDetector

from detectkit.registry import register_model


@register_model
def tracking_tiny(num_classes: int = 3, checkpoint: str | None = None, cls_prior: float | None = 0.2) -> TinyDetector:
    """TinyDetector under a registry name, as real recipes name models: checkpoints and weights
    files then say which model they hold and ``detectkit.load`` rebuilds it."""
    if checkpoint is not None:
        raise ValueError("tracking_tiny has no pretrained weights")
    return TinyDetector(num_classes=num_classes, cls_prior=cls_prior)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(root: Path, timeout: float = 180.0):
    """``mlflow server`` bound to 127.0.0.1 with its store and artifacts under ``root``.

    Started in its own session so that teardown can kill the whole process group (uvicorn /
    gunicorn workers included) by the server's PID; the health wait is bounded."""
    exe = Path(sys.executable).with_name("mlflow")
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
    ]
    log = open(root / "server.log", "wb")
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({proc.returncode}): {(root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"mlflow server not healthy after {timeout}s: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        try:  # workers left in the group after the parent went
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()


def tiny_config(tmp: Path, logger: dict[str, Any], callbacks: list[dict[str, Any]], epochs: int = 1,
                model_args: dict[str, Any] | None = None) -> Path:
    """A LightningCLI config: ``tracking_tiny`` on a 12-image synthetic set at 64 px (written under
    ``tmp``; ``model_args`` override DetectionModule arguments)."""
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": epochs,
            "log_every_n_steps": 1,
            "default_root_dir": str(tmp / "run"),
            "logger": logger,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"monitor": "val/map_50", "mode": "max", "save_last": True}},
                *callbacks,
            ],
        },
        "model": {
            "model": "tracking_tiny",
            "optim": {"lr": 1e-3, "warmup_steps": 1},
            **(model_args or {}),
        },
        "data": {
            "image_size": 64,
            "loader": {"batch_size": 4, "num_workers": 0},
            "cache_dir": str(tmp / "data"),
            "synthetic": {"train_images": 8, "val_images": 4, "size": 64, "num_classes": 3},
        },
    }
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "config_in.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
