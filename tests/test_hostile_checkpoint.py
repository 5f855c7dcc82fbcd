"""Hostile checkpoints (issue 25): a record that declares 1e9 classes, a 100000 px input or a million
class names, a custom architecture that points at a file, a zip bomb. Each is refused with one line
naming the field, the value and the limit, before anything is allocated, by ``detectkit.load``,
``predict``, ``export`` and ``serve`` alike; the next good checkpoint still loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from timeout_helpers import time_limit

from detectkit import create_model
from detectkit.checkpoint import CheckpointError, save_weights
from detectkit.cli import main as cli

ADDRESS_SPACE = 6 * 2**30  # torch's import reserves ~2-3 GB of address space; 1e9 classes need 7 GB more


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create_model("yolo_nas_s", num_classes=3).eval()
    model.class_names = ["cat", "dog", "bird"]
    return save_weights(model, tmp_path_factory.mktemp("hostile") / "good.ckpt")


def _hostile(good: Path, out: Path, **changes) -> Path:
    """``good`` with its record changed (no content hash: an attacker would simply re-seal it)."""
    ckpt = torch.load(good, weights_only=True)
    record = ckpt["detectkit"]
    for key, value in changes.items():
        if key == "image_size":
            record["inference"]["image_size"] = value
        else:
            record[key] = value
    record["content_sha256"] = ""
    torch.save(ckpt, out)
    return out


CASES = {
    "num_classes": ({"num_classes": 10**9}, "checkpoint record num_classes 1000000000 exceeds the limit 100000"),
    "image_size": ({"image_size": [100000, 100000]},
                   "checkpoint record inference.image_size 100000 exceeds the limit 8192"),
    "class_names": ({"class_names": [f"c{i}" for i in range(1_000_000)]},
                    "checkpoint record class_names count 1000000 exceeds the limit 100000"),
}


@pytest.fixture(scope="module")
def hostile(good, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    return {name: _hostile(good, folder / f"{name}.ckpt", **changes) for name, (changes, _) in CASES.items()}


def _in_subprocess(code: str, tmp_path: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """``code`` under an address-space limit: an allocation the record asked for fails loudly."""
    wrapper = (f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({ADDRESS_SPACE}, {ADDRESS_SPACE}))\n"
               + code)
    return subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_load_refuses_oversized_records_in_bounded_time_and_memory(hostile, good, tmp_path):
    code = (
        "import json, signal, detectkit\n"
        "out = {}\n"
        f"for name, path in {json.dumps({k: str(v) for k, v in hostile.items()})}.items():\n"
        "    signal.alarm(30)  # SIGALRM ends the process: ~5 s for the million names (weights_only unpickler)\n"
        "    try:\n"
        "        detectkit.load(path); out[name] = 'loaded'\n"
        "    except Exception as e:\n"
        "        out[name] = f'{type(e).__name__}: {e}'\n"
        "    signal.alarm(0)\n"
        f"model = detectkit.load({str(good)!r})\n"
        "out['good'] = model.class_names\n"
        "print(json.dumps(out))\n"
    )
    run = _in_subprocess(code, tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for name, (_, message) in CASES.items():
        text = out[name]
        assert text.startswith("LimitError: ") and message in text and "\n" not in text, text
        assert f"{hostile[name]}" in text and "DETECTKIT_LIMITS=" in text
    assert out["good"] == ["cat", "dog", "bird"]  # the next good checkpoint still loads


@pytest.mark.parametrize("command", ["predict", "export", "serve"])
def test_every_entry_point_refuses_with_one_line(command, hostile, good, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr("detectkit.serve.metrics.configure_json_logging", lambda level="info": None)
    extra = {"predict": ["--source", str(tmp_path), "--device", "cpu"], "export": ["--output", str(tmp_path / "m.onnx")],
             "serve": []}[command]
    for name, (_, message) in CASES.items():
        with time_limit(15, f"{command} {name}"):
            code = cli([command, "--checkpoint", str(hostile[name]), *extra])
        err = capsys.readouterr().err.strip()
        assert code != 0 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "m.onnx").exists()


def test_a_raised_limit_is_obeyed(hostile, monkeypatch):
    """The user can raise a limit: the same file then loads with the size it records."""
    import detectkit

    monkeypatch.setenv("DETECTKIT_LIMITS", "max_image_size=100000,max_pixels=10000000000")
    assert tuple(detectkit.load(hostile["image_size"]).inference.image_size) == (100000, 100000)


def test_a_record_never_names_a_file_to_read(good, tmp_path):
    import detectkit

    arch = tmp_path / "arch.yaml"
    arch.write_text("stem_channels: 8\n")
    ckpt = torch.load(good, weights_only=True)
    ckpt["detectkit"].update(model="yolo_nas_custom", model_kwargs={"arch": str(arch)}, content_sha256="")
    for key, value in (("arch", str(arch)), ("arch", "../arch.yaml"), ("checkpoint", "weights.pth")):
        ckpt["detectkit"]["model_kwargs"] = {key: value}
        torch.save(ckpt, tmp_path / "custom.ckpt")
        with pytest.raises(CheckpointError, match=f"model_kwargs.{key}") as err:
            detectkit.load(tmp_path / "custom.ckpt")
        assert "\n" not in str(err.value)
    assert detectkit.load(good).class_names == ["cat", "dog", "bird"]


def test_zip_bomb_is_refused_from_the_zip_directory(tmp_path, good):
    """A torch archive whose tensor storage inflates to 128 MB from 128 KB on disk, with the limit at
    100 MB (the good checkpoint is 52 MB): refused from the directory's sizes, before torch inflates anything."""
    plain = tmp_path / "plain.ckpt"
    torch.save({"w": torch.zeros(2**25)}, plain)
    bomb = tmp_path / "bomb.ckpt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert bomb.stat().st_size < 2**20
    code = ("import detectkit\n"
            "from detectkit.checkpoint import read_checkpoint\n"
            f"try:\n    read_checkpoint({str(bomb)!r})\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
            f"print(len(detectkit.load({str(good)!r}).class_names))\n")
    run = _in_subprocess(code, tmp_path, env={"DETECTKIT_LIMITS": "max_checkpoint_bytes=100000000"})
    assert run.returncode == 0, run.stderr[-2000:]
    first, second = run.stdout.strip().splitlines()[-2:]
    assert first.startswith("LimitError ") and "checkpoint uncompressed size (bytes) 134" in first
    assert "exceeds the limit 100000000" in first and second == "3"


def test_limits_are_named_on_a_typo():
    from detectkit.errors import UserError
    from detectkit.limits import parse

    with pytest.raises(UserError, match="Did you mean 'max_classes'"):
        parse("max_clases=5")
    assert parse("max_classes=5, max_json_depth=7").max_json_depth == 7


def test_the_limits_option_reaches_the_command(good, tmp_path, capsys, monkeypatch):
    """``detectkit --limits ...`` (anywhere on the line) is what the command checks against."""
    monkeypatch.setenv("DETECTKIT_LIMITS", "")
    assert cli(["predict", "--checkpoint", str(good), "--source", str(tmp_path), "--limits", "max_classes=2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith("checkpoint record num_classes 3 exceeds the limit 2 (raise with "
                        "DETECTKIT_LIMITS=max_classes=...)"), err
    assert cli(["--limits", "max_clases=2", "predict"]) == 2
    assert "unknown limit 'max_clases'. Did you mean 'max_classes'?" in capsys.readouterr().err


def test_validate_builds_from_the_record_not_the_runs_arch_path(tmp_path):
    """``detectkit validate --ckpt_path`` of a custom architecture: the architecture comes from the
    record (data), never from the path the run was started with (gone here; in a stranger's
    checkpoint it could name any file)."""
    from detectkit.models.yolo_nas.configs import StageCfg as S
    from detectkit.models.yolo_nas.configs import YoloNASConfig

    arch = tmp_path / "arch.yaml"
    YoloNASConfig(stem_channels=8, stages=(S(16, 1, 8, block="conv"), S(24, 1, 8), S(32, 1, 16), S(48, 1, 16)),
                  spp_channels=32, neck=(S(24, 1, 8), S(16, 1, 8), S(24, 1, 8), S(32, 1, 16)),
                  head_channels=(16, 24, 32)).to_yaml(arch)
    root = Path(__file__).resolve().parents[1]
    common = ["--config", str(root / "experiments" / "quickstart.yaml"), "--data.image_size=64",
              "--data.loader.batch_size=2", "--data.loader.num_workers=0", "--data.synthetic.train_images=2",
              "--data.synthetic.val_images=2", "--data.synthetic.size=64", f"--data.cache_dir={tmp_path / 'data'}",
              f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
              "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=1"]
    assert cli(["fit", *common, "--model.model=yolo_nas_custom", f"--model.model_kwargs={{arch: {arch}}}",
                "--trainer.max_steps=1"]) == 0
    arch.unlink()
    (ckpt,) = sorted(tmp_path.rglob("last.ckpt"))
    assert cli(["validate", *common, f"--ckpt_path={ckpt}"]) == 0
