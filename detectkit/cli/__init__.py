"""The ``detectkit`` command: a light dispatcher, so ``detectkit --help`` answers at once.

This module imports only the standard library: each command's module (and with it torch and
Lightning) is imported when that command runs. ``fit``/``validate``/``test`` (and ``predict
--config``) are a LightningCLI (:mod:`detectkit.cli.lightning`); ``predict --source`` is
:mod:`detectkit.cli.predict`; other words go to their package's ``main(argv) -> exit code``.

User errors (a missing file, a bad option or config, an unknown model, a corrupt checkpoint, bad
data) print ONE line on stderr and exit non-zero; ``--debug`` (or ``DETECTKIT_DEBUG=1``) shows
the traceback instead.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from detectkit.errors import UserError, suggest
from detectkit.extras import missing_extra_message
from detectkit.recipes import resolve_config_args

__all__ = ["main", "COMMANDS", "EXTRA_COMMANDS", "DetectkitCLI", "UserError", "suggest"]

#: first word -> (one line of help, module whose ``main(argv)`` runs it)
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("train a model from a recipe (LightningCLI: --config quickstart, or --config my.yaml)", "detectkit.cli.lightning"),
    "validate": ("score a checkpoint on the validation split (--config, --ckpt_path)", "detectkit.cli.lightning"),
    "test": ("score a checkpoint on the test split (--config, --ckpt_path)", "detectkit.cli.lightning"),
    "predict": ("detect objects: --source <file|dir|glob|video|url|webcam|stream> --checkpoint X", "detectkit.cli.predict"),
    "track": ("predict with track IDs (ByteTrack): --source video.mp4|0|rtsp://... --checkpoint X", "detectkit.cli.track"),
    "export": ("export a checkpoint to ONNX (NMS, uint8, INT8), TensorRT, OpenVINO or TorchScript, checked", "detectkit.cli.export"),
    "benchmark": ("time and score every deployment format of a checkpoint: benchmark --checkpoint X [--data VAL]", "detectkit.cli.benchmark"),
    "data": ("inspect, convert or generate datasets", "detectkit.data.commands"),
    "serve": ("serve a checkpoint over HTTP (LitServe, dynamic batching)", "detectkit.serve.commands"),
    "recipes": ("list the shipped recipes (detectkit recipes NAME prints one)", "detectkit.recipes"),
    "weights": ("list published pretrained weights, or fetch one: weights list | weights download NAME", "detectkit.cli.weights"),
    "nas": ("search an architecture: nas search --config X.yaml, nas show STUDY, nas export STUDY --trial N", "detectkit.nas.commands"),
    "tune": ("search hyperparameters (lr, warm-up, augmentation, image size) of a recipe: tune --config quickstart", "detectkit.tune.commands"),
}
#: the commands that are not LightningCLI subcommands (kept for callers of the old module)
EXTRA_COMMANDS: dict[str, str] = {k: v[1] for k, v in COMMANDS.items() if v[1] != "detectkit.cli.lightning"}


def __getattr__(name: str) -> Any:
    if name == "DetectkitCLI":  # lazy: importing it imports Lightning
        from detectkit.cli.lightning import DetectkitCLI

        return DetectkitCLI
    raise AttributeError(f"module 'detectkit.cli' has no attribute {name!r}")


def _version() -> str:
    from detectkit import __version__

    return __version__


def _help() -> str:
    width = max(len(k) for k in COMMANDS)
    lines = [f"detectkit {_version()}: YOLO-NAS and YOLO-World on PyTorch Lightning", "",
             "usage: detectkit <command> [options]     (detectkit <command> --help for its options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (text, _) in COMMANDS.items()]
    lines += ["", "options:", "  -h, --help     this list", "  --version      print the version",
              "  --debug        show tracebacks (also DETECTKIT_DEBUG=1)",
              "  --limits K=V,.. raise resource limits, e.g. max_classes=200000 (also DETECTKIT_LIMITS)"]
    return "\n".join(lines)


def _debug_enabled(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("DETECTKIT_DEBUG", "").lower() in ("1", "true", "yes")


def _take_limits(argv: list[str]) -> list[str]:
    """Remove ``--limits K=V,...`` (anywhere on the line) and put it into ``DETECTKIT_LIMITS``, which
    every entry point and worker process reads (see :mod:`detectkit.limits`)."""
    from detectkit import limits

    rest: list[str] = []
    words = iter(argv)
    for word in words:
        if word == "--limits" or word.startswith("--limits="):
            text = word.split("=", 1)[1] if "=" in word else next(words, "")
            limits.parse(text, "--limits")  # a typo is named now, not deep inside a command
            os.environ[limits.ENV] = ",".join(filter(None, [os.environ.get(limits.ENV, ""), text]))
        else:
            rest.append(word)
    return rest


def _is_user_error(e: BaseException) -> bool:
    """Errors that come from what the user gave (files, options, configs, data), not from a bug."""
    if isinstance(e, (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                      KeyError, ValueError)):
        return True
    names = {c.__name__ for c in type(e).__mro__}
    # jsonargparse's ArgumentError, detectkit's ImageReadError / dataset errors, a full disk
    return bool(names & {"ArgumentError", "ImageReadError", "DatasetError", "CheckpointError"}) or (
        isinstance(e, OSError) and getattr(e, "errno", None) is not None)


#: a config class's own named error (``data.augment.extra[0]: unknown ...``) inside jsonargparse's
#: explanation of why no member of a ``X | None`` union accepted the value
_NAMED_IN_UNION = re.compile(r"- ((?:model|data|trainer)\.[\w.\[\]]+(?: \([^)]*\))?: .*?)(?= - (?:Expected a|Does not validate)|$)")


def _message(e: BaseException) -> str:
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    text = " ".join(str(text).split()) or type(e).__name__
    named = _NAMED_IN_UNION.search(text) if text.startswith("Does not validate") else None
    if named:
        return named.group(1)
    return text if _is_user_error(e) else f"{type(e).__name__}: {text}"


def _working_folder_importable() -> None:
    """A recipe's ``class_path: my_callbacks.MyCallback`` (or ``name: my_augment.Sepia``) names a
    file next to it. ``python train.py`` and ``python -m`` put the working folder on ``sys.path``;
    the ``detectkit`` console script does not, so we add it, last: a file there never shadows an
    installed package."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def _run(word: str, argv: list[str]) -> int:
    module_name = COMMANDS[word][1]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):  # the command's own module is absent
            raise UserError(f"`detectkit {word}` is not available in this installation ({module_name} is missing)") from e
        raise  # a missing extra: main() names it
    if module_name == "detectkit.cli.lightning":
        return int(module.main([word, *argv]) or 0)
    return int(module.main(list(argv)) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``detectkit``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_enabled(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
        argv = _take_limits(argv)
    except UserError as e:
        print(f"detectkit: error: {e}", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_help())
        return 0 if argv else 2
    if argv[0] in ("--version", "-V", "version"):
        print(f"detectkit {_version()}")
        return 0
    word = argv[0]
    if word not in COMMANDS:
        hint = suggest(word, list(COMMANDS)) if not word.startswith("-") else ""
        print(f"detectkit: unknown command {word!r}.{hint} Commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if word == "predict" and any(a == "--config" or a.startswith(("--config=", "--ckpt_path")) for a in argv[1:]):
        word_module = "detectkit.cli.lightning"  # `detectkit predict --config X --ckpt_path Y` (LightningCLI)
    else:
        word_module = None
    try:
        if word_module is not None or COMMANDS[word][1] == "detectkit.cli.lightning":
            argv = resolve_config_args(argv)  # an unknown recipe name fails here, before Lightning loads
            _working_folder_importable()
        if word_module is not None:
            return int(importlib.import_module(word_module).main(argv) or 0)
        return _run(word, argv[1:])
    except SystemExit as e:
        if isinstance(e.code, str):  # SystemExit("message") from a command: a user error
            if debug:
                raise
            print(f"detectkit {word}: error: {e.code}", file=sys.stderr)
            return 1
        raise  # --help / --print_config exit codes pass through unchanged
    except KeyboardInterrupt:
        print(f"detectkit {word}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        extra = missing_extra_message(e, f"detectkit {word}")
        if extra is not None:  # e.g. `detectkit serve` in a base install
            print(f"detectkit {word}: error: {extra}", file=sys.stderr)
            return 1
        hint = "" if _is_user_error(e) else " (an internal error: rerun with --debug for the traceback)"
        print(f"detectkit {word}: error: {_message(e)}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
