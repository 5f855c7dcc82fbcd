"""No pickled code ever runs: ``os.system`` payloads through the training-side readers (teacher,
best-checkpoint export, ``--ckpt_path`` of fit/validate). The zoo of payloads through the loading
entry points (load, create_model, predict, export, serve, yolo_world readers) is test_pickle_zoo.py."""

from __future__ import annotations

import os
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from compress_helpers import tiny_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from test_checkpoint_load import tiny_ckpt_detector  # noqa: F401 (registers the tiny model)

import detectkit
from detectkit.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


class _Touch:
    """Unpickling this runs ``touch <marker>`` (what an attacker's checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _NumpySave:
    """A function of a package whose globals become inert stand-ins (numpy): ``numpy.save`` writes a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import numpy

        return (numpy.save, (str(self.marker), numpy.zeros(1)))


def _payloads(tmp: Path) -> dict[str, tuple[Path, Path]]:
    """name -> (file, marker it would create)."""
    out = {}
    kinds = {
        "plain": lambda evil: evil,
        "ultralytics": lambda evil: {"model": evil, "ema": evil, "date": "2025-01-01"},
        "lightning": lambda evil: {
            "state_dict": {"model.w": torch.zeros(2)}, "pytorch-lightning_version": "2.6.0", "epoch": 0,
            "hyper_parameters": {"model": "tiny_ckpt_detector", "num_classes": 3, "evil": evil},
        },
    }
    for name, make in kinds.items():
        marker = tmp / f"pwned_{name}"
        evil = _Touch(marker)
        path = tmp / f"evil_{name}.ckpt"
        torch.save(make(evil), path)
        out[name] = (path, marker)
    return out


@pytest.fixture
def payloads(tmp_path):
    return _payloads(tmp_path)


def _refused(message: str) -> bool:
    return bool(re.search(r"refusing to load global (posix|os|nt|pathlib)\.", message))


def _check(payloads, call) -> None:
    for name, (path, marker) in payloads.items():
        with pytest.raises((CheckpointError, SystemExit)) as info:
            call(path)
        message = str(info.value.code if isinstance(info.value, SystemExit) else info.value)
        assert str(path) in message and _refused(message), (name, message)
        assert not marker.exists(), f"{name}: pickled code ran"


def test_python_api(payloads):
    _check(payloads, detectkit.load)
    _check(payloads, lambda p: detectkit.create_model("tiny_ckpt_detector", num_classes=3, checkpoint=str(p)))
    _check(payloads, lambda p: detectkit.create_model("yolo_nas_s", checkpoint=str(p)))
    from detectkit.models.yolo_world.weights import load_weights, read_ultralytics_pt

    _check(payloads, read_ultralytics_pt)
    _check(payloads, lambda p: load_weights(None, p))


def test_stand_in_globals_stay_inert(tmp_path):
    """Globals of the stand-in packages (model classes of foreign .pt files) become inert objects:
    calling one runs nothing, and the file is then rejected for what it holds."""
    marker = tmp_path / "pwned.npy"
    path = tmp_path / "evil_numpy.pt"
    torch.save({"model": None, "ema": _NumpySave(marker)}, path)
    for call in (detectkit.load, lambda p: detectkit.create_model("yolo_world_v2_s", checkpoint=str(p))):
        with pytest.raises(ValueError, match=re.escape(str(path))):
            call(path)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["validate", "fit"])
def test_lightning_cli_ckpt_path(payloads, tmp_path, command):
    from detectkit.cli import main

    args = ["--config", str(ROOT / "experiments" / "quickstart.yaml"), "--model.model=tiny_ckpt_detector",
            "--data.image_size=64", "--data.loader.num_workers=0", f"--data.cache_dir={tmp_path / 'data'}",
            f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false"]
    _check(payloads, lambda p: main([command, "--debug", *args, f"--ckpt_path={p}"]))


def test_distillation_teacher(payloads, tmp_path):
    from compress_helpers import tiny_datamodule
    from detectkit.callbacks import KnowledgeDistillation

    from detectkit.modules.detector import DetectionModule

    def fit(path):
        module = DetectionModule("tiny_ckpt_detector", num_classes=3)
        kd = KnowledgeDistillation(teacher="tiny_ckpt_detector", teacher_checkpoint=str(path))
        tiny_trainer(tmp_path, [kd], max_epochs=1, train_batches=1).fit(module, tiny_datamodule(tmp_path / "data"))

    _check(payloads, fit)


def test_export_on_fit_end_best_checkpoint(payloads, tmp_path):
    from detectkit.callbacks import ExportOnFitEnd

    from detectkit.modules.detector import DetectionModule

    module = DetectionModule("tiny_ckpt_detector", num_classes=3)
    best = ModelCheckpoint(dirpath=tmp_path)
    trainer = pl.Trainer(callbacks=[best], logger=False, accelerator="cpu", enable_progress_bar=False)
    export = ExportOnFitEnd(image_size=64, dirpath=str(tmp_path / "export"))

    def export_best(path):
        best.best_model_path = str(path)  # what ModelCheckpoint tracks as the best file of the run
        export.export_model(trainer, module)

    _check(payloads, export_best)


def test_no_unsafe_torch_load_in_the_package():
    """CI guard: ``torch.load`` only in detectkit/checkpoint/safe.py, and ``weights_only=False`` only in its
    one allowed form, with ``pickle_module=_restricted_pickle`` (the unpickler that refuses code)."""
    offenders, loads = [], []
    for folder in ("detectkit", "callbacks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                reading = re.search(r"weights_only\s*=\s*False", code) and ".save_checkpoint(" not in code  # a write
                if reading and not (
                    rel == "detectkit/checkpoint/safe.py" and "pickle_module=_restricted_pickle" in code
                ):
                    offenders.append(f"{rel}:{n}: {line.strip()}")
                if re.search(r"\btorch\.load\(", code) and rel != "detectkit/checkpoint/safe.py":
                    loads.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, "weights_only=False outside the restricted unpickler:\n" + "\n".join(offenders)
    assert not loads, "files must be read through detectkit.checkpoint.read_checkpoint:\n" + "\n".join(loads)
