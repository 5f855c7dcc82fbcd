"""A zoo of code-running pickles through every entry point that reads a user's file (issue 25 item 6).

Each payload, unpickled by plain :mod:`pickle`, creates a marker file (``test_every_payload_is_live``
proves it, so a payload that silently stopped working cannot make the guard tests pass). Written as a
bare pickle, as the top object of a torch file (zip and legacy format), inside a Lightning checkpoint
and inside the detectkit record, no entry point may create the marker, and each refuses the file with
one line naming it. A reader widened to trust ``builtins``, ``importlib``, ``functools``, ``numpy`` or
torch's own functions fails here.
"""

from __future__ import annotations

import cProfile
import functools
import importlib
import operator
import os
import pickle
import shlex
import subprocess
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy
import numpy.testing._private.utils as numpy_testing_utils
import pytest
import torch
from PIL import Image
from test_checkpoint_load import tiny_ckpt_detector  # noqa: F401 (registers the tiny model)

import detectkit
from detectkit.checkpoint import CheckpointError, Inert, RefusedPickleError, read_checkpoint, save_weights
from detectkit.errors import UserError


class _Call:
    """Pickles as ``func(*args)``; nested, it builds call chains such as
    ``getattr(__import__("os"), "system")("touch x")`` out of allowed-looking pieces."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __call__(self, *args: Any) -> Any:  # pickle wants the reduce function to be callable
        raise AssertionError("a payload is only ever unpickled")

    def __reduce__(self) -> tuple:
        return (self.func, self.args)


def _python(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def _shell(marker: Path) -> str:
    return f"touch {shlex.quote(str(marker))}"


def _torch_load_payload(marker: Path) -> Any:
    """``torch.load(inner, weights_only=False)``: torch itself asked to run another file's pickled code."""
    inner = marker.with_name(marker.name + ".inner.pt")
    torch.save(_Call(os.system, _shell(marker)), inner)
    return _Call(functools.partial(torch.load, weights_only=False), str(inner))


#: name -> (payload that creates ``marker`` when unpickled, whether its globals become inert stand-ins)
ZOO: dict[str, tuple[Callable[[Path], Any], bool]] = {
    "os.system": (lambda m: _Call(os.system, _shell(m)), False),
    "builtins.exec": (lambda m: _Call(exec, _python(m)), False),
    "builtins.eval": (lambda m: _Call(eval, _python(m)), False),
    "getattr(__import__('os'), 'system')": (
        lambda m: _Call(_Call(getattr, _Call(__import__, "os"), "system"), _shell(m)), False),
    "getattr(import_module('builtins'), 'exec')": (
        lambda m: _Call(_Call(getattr, _Call(importlib.import_module, "builtins"), "exec"), _python(m)), False),
    "subprocess.Popen": (lambda m: _Call(subprocess.Popen, ["touch", str(m)]), False),
    "subprocess.run": (lambda m: _Call(subprocess.run, ["touch", str(m)]), False),
    "methodcaller('system')(import_module('os'))": (
        lambda m: _Call(operator.methodcaller("system", _shell(m)), _Call(importlib.import_module, "os")), False),
    "functools.partial(os.system)": (lambda m: _Call(functools.partial(os.system, _shell(m))), False),
    "timeit.timeit(setup=code)": (lambda m: _Call(timeit.timeit, "pass", _python(m), time.perf_counter, 1), False),
    "cProfile.run": (lambda m: _Call(cProfile.run, _python(m)), False),
    "pickle.loads(nested)": (lambda m: _Call(pickle.loads, pickle.dumps(_Call(os.system, _shell(m)))), False),
    "torch.load(weights_only=False)": (_torch_load_payload, False),
    "torch._rebuild_from_type_v2(os.system)": (
        lambda m: _Call(torch._tensor._rebuild_from_type_v2, os.system, torch.Tensor, (_shell(m),), None), False),
    # globals of the stand-in packages (model classes of foreign .pt files): resolved, but inert
    "numpy runstring": (lambda m: _Call(numpy_testing_utils.runstring, _python(m), {}), True),
    "numpy.save": (lambda m: _Call(numpy.save, str(m), numpy.zeros(1)), True),
    "pathlib.Path.touch": (lambda m: _Call(Path.touch, Path(m)), True),
}


def _lightning(payload: Any) -> dict:
    return {"state_dict": {"model.w": torch.zeros(2)}, "pytorch-lightning_version": "2.6.0", "epoch": 0,
            "global_step": 0, "hyper_parameters": {"model": "tiny_ckpt_detector", "num_classes": 3, "evil": payload}}


def _in_record(good: dict, payload: Any) -> dict:
    record = dict(good["detectkit"], class_names=["cat", payload, "bird"])
    return {**good, "detectkit": record}


def _torch_file(path: Path, obj: Any, legacy: bool = False) -> None:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)


#: name -> writer(path, payload, good detectkit checkpoint dict)
CONTAINERS: dict[str, Callable[[Path, Any, dict], None]] = {
    "bare_pickle": lambda p, evil, good: p.write_bytes(pickle.dumps(evil, protocol=4)),
    "bare_torch_zip": lambda p, evil, good: _torch_file(p, evil),
    "bare_torch_legacy": lambda p, evil, good: _torch_file(p, evil, legacy=True),
    "ultralytics_zip": lambda p, evil, good: _torch_file(p, {"model": evil, "ema": evil, "date": "2025-01-01"}),
    "lightning_zip": lambda p, evil, good: _torch_file(p, _lightning(evil)),
    "lightning_legacy": lambda p, evil, good: _torch_file(p, _lightning(evil), legacy=True),
    "record_zip": lambda p, evil, good: _torch_file(p, _in_record(good, evil)),
    "record_legacy": lambda p, evil, good: _torch_file(p, _in_record(good, evil), legacy=True),
}


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> dict:
    """A real detectkit file's contents (record + weights) to hide payloads in."""
    model = detectkit.create_model("tiny_ckpt_detector", num_classes=3)
    model.class_names = ["cat", "dog", "bird"]
    path = save_weights(model, tmp_path_factory.mktemp("good") / "good.ckpt")
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "one.jpg"
    Image.new("RGB", (32, 32), (90, 120, 30)).save(path)
    return path


def _files(folder: Path, payload: str, good: dict) -> list[tuple[str, Path, Path]]:
    """(container, file, marker its payload would create) for one payload in every container."""
    make, _ = ZOO[payload]
    out = []
    for container, write in CONTAINERS.items():
        marker = folder / f"marker_{container}.npy"  # numpy.save appends .npy to any other name
        path = folder / f"evil_{container}.ckpt"
        write(path, make(marker), good)
        out.append((container, path, marker))
    return out


def _wait_for(marker: Path, seconds: float = 10.0) -> bool:
    """``subprocess.Popen`` returns before its child has touched the file."""
    deadline = time.monotonic() + seconds
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return marker.exists()


@pytest.mark.parametrize("payload", list(ZOO))
def test_every_payload_is_live(payload, tmp_path, monkeypatch, capsys):
    """Plain ``pickle.loads`` runs each payload: the guard tests below refuse real attacks."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "marker.npy"
    try:
        pickle.loads(pickle.dumps(ZOO[payload][0](marker)))
    except Exception:  # noqa: BLE001 (some gadgets fail after their side effect, e.g. int.as_subclass)
        pass
    assert _wait_for(marker), f"{payload}: the payload no longer runs code; the zoo would test nothing"


def _cli(argv: list[str], capsys) -> None:
    """``detectkit ...`` in-process: a refused file is exit code != 0 and one line on stderr."""
    from detectkit.cli import main

    code = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("detectkit")]
    if code == 0:
        return
    if len(lines) != 1:  # progress bars of the data set may precede it; the error is one line
        raise AssertionError(f"exit {code} without one error line: {lines}")
    raise CheckpointError(lines[0])


def _lightning_cli(argv: list[str], capsys) -> None:
    try:
        _cli(argv, capsys)
    except SystemExit as e:  # LightningCLI's parser exits
        raise CheckpointError(str(e.code)) from None


ROOT = Path(__file__).resolve().parents[1]


def _serve_load(path: Path) -> Any:
    from detectkit.serve.api import load_detector

    return load_detector(path)


def _yolo_world_weights(path: Path) -> Any:
    from detectkit.models.yolo_world.weights import read_ultralytics_pt

    return read_ultralytics_pt(path)


def _embeddings_file(path: Path) -> Any:
    from detectkit.models.yolo_world.text import EmbeddingsFileEncoder

    return EmbeddingsFileEncoder(path)


#: name -> call(path, tmp_path, image, capsys); raises on refusal
ENTRY_POINTS: dict[str, Callable[..., Any]] = {
    "read_checkpoint": lambda p, tmp, img, cap: read_checkpoint(p),
    "detectkit.load": lambda p, tmp, img, cap: detectkit.load(p),
    # a real family: the test's tiny builder ignores a checkpoint that is not a detectkit file
    "create_model(checkpoint=)": lambda p, tmp, img, cap: detectkit.create_model("yolo_nas_s", checkpoint=str(p)),
    "serve load_detector": lambda p, tmp, img, cap: _serve_load(p),
    "yolo_world read_ultralytics_pt": lambda p, tmp, img, cap: _yolo_world_weights(p),
    "yolo_world EmbeddingsFileEncoder": lambda p, tmp, img, cap: _embeddings_file(p),
    "detectkit predict --checkpoint": lambda p, tmp, img, cap: _cli(
        ["predict", "--source", str(img), "--checkpoint", str(p), "--device", "cpu",
         "--save-dir", str(tmp / "pred")], cap),
    "detectkit export --checkpoint": lambda p, tmp, img, cap: _cli(
        ["export", "--checkpoint", str(p), "--output", str(tmp / "x.onnx")], cap),
}


def _refusal(payload: str, container: str, path: Path, call: Callable[[], Any]) -> str | None:
    """What went wrong, or None: the file must be refused (or, for read_checkpoint, read as inert data)
    with one line naming it; a payload whose globals are refused must be refused as pickled code."""
    inert = ZOO[payload][1]
    try:
        result = call()
    except (CheckpointError, ValueError, UserError) as e:  # inert contents: the reader's own ValueError
        message = str(e)
        if "\n" in message or str(path) not in message:
            return f"not one line naming the file: {message!r}"
        if not inert and container != "bare_pickle" and not (
                isinstance(e, RefusedPickleError) or "refusing to load global" in message):
            return f"not refused as pickled code: {message!r}"
        return None
    except Exception as e:  # noqa: BLE001 (anything else is a crash the user would see)
        return f"{type(e).__name__}: {str(e)[:300]}"
    if inert and _holds_inert(result):
        return None  # read_checkpoint hands back inert stand-ins; it ran nothing
    return f"accepted the file: {type(result).__name__}"


def _holds_inert(obj: Any) -> bool:
    if isinstance(obj, Inert):
        return True
    if isinstance(obj, dict):
        return any(_holds_inert(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_holds_inert(v) for v in obj)
    return False


def _ran(payload: str, files: list[tuple[str, Path, Path]]) -> list[str]:
    """Containers whose payload created its marker (a Popen child gets a moment to do so)."""
    if payload == "subprocess.Popen":
        time.sleep(0.3)
    return [f"{container}: PICKLED CODE RAN" for container, _, marker in files if marker.exists()]


@pytest.mark.parametrize("payload", list(ZOO))
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_no_entry_point_runs_pickled_code(entry, payload, good_checkpoint, image, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a relative write of any gadget would land here
    failures = []
    files = _files(tmp_path, payload, good_checkpoint)
    for container, path, _ in files:
        problem = _refusal(payload, container, path,
                           lambda path=path: ENTRY_POINTS[entry](path, tmp_path, image, capsys))
        if problem:
            failures.append(f"{container}: {problem}")
    failures += _ran(payload, files)
    assert not failures, f"{entry} x {payload}:\n" + "\n".join(failures)


LIGHTNING_CLI_PAYLOADS = ("builtins.exec", "torch.load(weights_only=False)", "functools.partial(os.system)")


@pytest.mark.parametrize("command", ["validate"])
def test_lightning_cli_ckpt_path(command, good_checkpoint, tmp_path, monkeypatch, capsys):
    """``detectkit validate --ckpt_path``: Lightning's own reader is routed through ours; every payload
    in the Lightning and record containers is refused before anything is built from it."""
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(ROOT / "experiments" / "quickstart.yaml"), "--model.model=tiny_ckpt_detector",
            "--data.image_size=64", "--data.loader.num_workers=0",
            "--data.synthetic.train_images=4", "--data.synthetic.val_images=4", f"--data.cache_dir={tmp_path / 'data'}",
            f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false"]
    failures = []
    for payload in LIGHTNING_CLI_PAYLOADS:  # ~2 s a run: the reader is shared, so a sample of each kind
        folder = tmp_path / payload.replace("/", "_")
        folder.mkdir()
        for container, path, marker in _files(folder, payload, good_checkpoint):
            if container not in ("lightning_zip", "record_legacy"):
                continue
            problem = _refusal(payload, container, path,
                               lambda path=path: _lightning_cli([command, *args, f"--ckpt_path={path}"], capsys))
            if problem:
                failures.append(f"{payload} / {container}: {problem}")
            failures += _ran(payload, [(container, path, marker)])
    assert not failures, "\n".join(failures)
