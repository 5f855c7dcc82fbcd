"""The ``detectkit`` entry point: instant help, lazy imports, suggestions, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from detectkit.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def test_import_is_lazy():
    """`import detectkit.cli` (what `detectkit --help` costs) imports neither torch nor lightning."""
    code = ("import detectkit.cli, detectkit.cli.predict, detectkit.cli.export, sys; "
            "heavy = [m for m in ('torch', 'lightning', 'torchvision', 'cv2') if m in sys.modules]; "
            "assert not heavy, heavy; detectkit.cli.main(['--help'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    for name in ("fit", "validate", "test", "predict", "export", "data", "serve"):
        assert f"\n  {name} " in out.stdout


def test_help_and_version(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in COMMANDS) and len(text.splitlines()) < 25
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("detectkit 0.")
    with pytest.raises(SystemExit) as e:
        main(["predict", "--help"])
    assert e.value.code == 0 and "--source" in capsys.readouterr().out


def test_did_you_mean(capsys):
    assert main(["prdict"]) == 2
    assert "Did you mean 'predict'?" in capsys.readouterr().err
    assert main(["predict", "--source", "x.jpg", "--checkpoint", "y.ckpt", "--conff", "0.3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--conff" in err and "Did you mean '--conf'?" in err
    assert main(["export", "--checkpoint", "y.ckpt", "--max-dets", "5"]) == 1
    assert "Did you mean '--max-det'?" in capsys.readouterr().err


def test_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "missing.ckpt"
    assert main(["predict", "--source", str(tmp_path), "--checkpoint", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(missing) in err and "Traceback" not in err
    assert main(["export", "--checkpoint", str(missing)]) == 1
    assert str(missing) in capsys.readouterr().err
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x00" * 64 + b"not a checkpoint")
    assert main(["predict", "--source", str(tmp_path), "--checkpoint", str(junk)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(junk) in err
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        main(["predict", "--debug", "--source", str(tmp_path), "--checkpoint", str(missing)])
    monkeypatch.setenv("DETECTKIT_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(["predict", "--source", str(tmp_path), "--checkpoint", str(missing)])


def test_serve_is_dispatched_or_explained(capsys):
    try:
        import detectkit.serve.commands  # noqa: F401
    except ModuleNotFoundError:
        assert main(["serve", "--help"]) == 1
        assert "detectkit serve" in capsys.readouterr().err
    else:
        with pytest.raises(SystemExit) as e:
            main(["serve", "--help"])
        assert e.value.code == 0


def test_trainer_defaults_added_unless_configured(tmp_path):
    """Every CLI trainer gets TRAINER_DEFAULTS (what is importable), except a kind the config already has."""
    from lightning.pytorch.plugins import TorchCheckpointIO

    from detectkit.checkpoint.lightning_io import AtomicCheckpointIO
    from detectkit.cli.lightning import TRAINER_DEFAULTS, DetectkitCLI

    assert [d.class_path.rsplit(".", 1)[1] for d in TRAINER_DEFAULTS] == [
        "AtomicCheckpointIO", "NanGuard", "RunReport", "StopOnSignal", "LastCheckpoint", "PlainProgressBar"]
    from compress_helpers import TinyDetector

    from detectkit.registry import list_models, register_model

    if "tiny_cli_detector" not in list_models():
        register_model(lambda num_classes=3, checkpoint=None: TinyDetector(num_classes), name="tiny_cli_detector")
    base = ["--config", str(ROOT / "experiments" / "quickstart.yaml"), "--model.model=tiny_cli_detector",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}", f"--data.cache_dir={tmp_path / 'data'}"]
    cli = DetectkitCLI(args=base, run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    cli = DetectkitCLI(args=[*base, "--trainer.plugins=lightning.pytorch.plugins.TorchCheckpointIO"], run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is TorchCheckpointIO  # the config's own is kept, not doubled
