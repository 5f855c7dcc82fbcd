"""``detectkit fit|validate|test|predict --config X.yaml``: a LightningCLI over ``DetectionModule``
and the data modules, with detectkit's trainer defaults, a short ``fit --help`` and one-line
errors with "did you mean" for mistyped options.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import re
import sys
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from detectkit.errors import UserError, suggest

__all__ = ["DetectkitCLI", "main", "TRAINER_DEFAULTS", "ARCHITECTURE_HPARAMS", "short_help"]

log = logging.getLogger(__name__)

#: DetectionModule arguments that a checkpoint's weights depend on (see DetectkitCLI._parse_ckpt_path)
ARCHITECTURE_HPARAMS = ("model", "num_classes", "class_names", "model_kwargs", "loss", "loss_kwargs", "text_encoder",
                        "prompt_tuning")


@dataclass(frozen=True)
class TrainerDefault:
    """A plugin or callback the CLI adds to every trainer unless the config already has one of
    ``kind`` (a class path); named by class path so the core never imports ``detectkit.callbacks``."""

    class_path: str
    kind: str
    plugin: bool = False
    only_without_tty: bool = False  # e.g. plain progress lines when stdout is a log file


#: THE list of what every fit/validate/test/predict trainer gets by default
TRAINER_DEFAULTS: tuple[TrainerDefault, ...] = (
    TrainerDefault("detectkit.checkpoint_io.AtomicCheckpointIO", "lightning.fabric.plugins.io.CheckpointIO", plugin=True),
    TrainerDefault("detectkit.callbacks.NanGuard", "detectkit.callbacks.NanGuard"),
    TrainerDefault("detectkit.callbacks.RunReport", "detectkit.callbacks.RunReport"),
    TrainerDefault("detectkit.callbacks.PlainProgressBar", "lightning.pytorch.callbacks.ProgressBar",
                   only_without_tty=True),
)


def _import_path(path: str) -> Any | None:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        log.debug("trainer default %s is not available (%s): skipped", path, e)
        return None


class DetectkitCLI(LightningCLI):
    """LightningCLI with the data -> model links, detectkit's trainer defaults and a prediction writer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from detectkit.data import DetectionDataModule
        from detectkit.modules.detector import DetectionModule

        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # Subclass mode lets a recipe name its DataModule (``data: {class_path: ...GroundingDataModule}``,
        # RoboflowDataModule); a plain ``data:`` mapping still means DetectionDataModule (default below).
        kwargs.setdefault("subclass_mode_data", True)
        # errors raise (main() prints them as one line with a suggestion) instead of a usage block
        kwargs.setdefault("parser_kwargs", {"exit_on_error": False})
        super().__init__(DetectionModule, DetectionDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        if self.subclass_mode_data:
            parser.set_defaults({"data": {"class_path": "detectkit.data.DetectionDataModule"}})
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse without LightningCLI's warning about ``args`` (detectkit always passes them) and
        turn parse errors into one line with a "did you mean" for a mistyped option."""
        try:
            self.config = parser.parse_object(args) if isinstance(args, dict) else parser.parse_args(args)
        except Exception as e:
            if type(e).__name__ != "ArgumentError":
                raise
            raise UserError(_explain_parse_error(str(e), parser, args)) from e

    def _parse_ckpt_path(self) -> None:
        """Take only the architecture from ``--ckpt_path``'s hyperparameters.

        LightningCLI re-applies ALL the checkpoint's ``hyper_parameters`` over the command line,
        which silently ignores e.g. ``--model.predict_postprocess.conf 0.5`` or ``--model.val_postprocess.iou 0.6`` on
        validate/predict. What defines the weights' shapes must come from the checkpoint; the
        thresholds and optimisation settings are the user's to choose.
        """
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt_path:
            return
        if not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such file")
        from detectkit.checkpoint import read_checkpoint

        hparams = read_checkpoint(ckpt_path).get("hyper_parameters", {})
        keep = {k: v for k, v in hparams.items() if k in ARCHITECTURE_HPARAMS}
        if keep:
            self.config = self.parser.parse_object({sub: {"model": keep}}, self.config)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Add :data:`TRAINER_DEFAULTS` the config does not already provide."""
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        callbacks = trainer_cfg.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        plugins = trainer_cfg.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list) else [plugins]
        extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        tty = sys.stdout.isatty()
        for default in TRAINER_DEFAULTS:
            if default.only_without_tty and (tty or trainer_cfg.get("enable_progress_bar") is False):
                continue
            kind = _import_path(default.kind)
            present = plugins if default.plugin else callbacks + extra
            if kind is not None and any(isinstance(obj, kind) for obj in present):
                continue
            cls = _import_path(default.class_path)
            if cls is None:
                continue
            (plugins if default.plugin else callbacks).append(cls())
        trainer_cfg["callbacks"], trainer_cfg["plugins"] = callbacks, plugins or None
        return super().instantiate_trainer(**kwargs)

    def _warn_random_weights(self) -> None:
        sub = self.subcommand
        cfg = self.config.get(sub, {}) if sub else {}
        if cfg.get("ckpt_path") or (cfg.get("model") or {}).get("checkpoint"):
            return
        rank_zero_warn(f"detectkit {sub}: no --ckpt_path and no --model.checkpoint: scoring randomly initialised "
                       "weights (pass the checkpoint to evaluate)")

    def before_validate(self) -> None:
        self._warn_random_weights()

    def before_test(self) -> None:
        self._warn_random_weights()

    def before_predict(self) -> None:
        """Results go to the run dir unless the config already has a prediction writer."""
        if not any(isinstance(cb, BasePredictionWriter) for cb in self.trainer.callbacks):
            from detectkit.predict.writer_callback import DetectionWriter

            self.trainer.callbacks.append(DetectionWriter())


# --------------------------------------------------------------------------- errors
def _known_options(parser: Any, sub: str | None) -> list[str]:
    """Every ``--option`` of the subcommand, plus the data/model init arguments (subclass mode
    resolves those lazily, so they are not parser actions until a class is chosen)."""
    target = parser
    action = getattr(parser, "_subcommands_action", None)
    if sub and action is not None and sub in getattr(action, "choices", {}):
        target = action.choices[sub]
    names = {s for a in getattr(target, "_actions", []) for s in a.option_strings if s.startswith("--")}
    from detectkit.data import DetectionDataModule
    from detectkit.modules.detector import DetectionModule

    for prefix, cls in (("data", DetectionDataModule), ("model", DetectionModule)):
        hints = typing.get_type_hints(cls.__init__)
        for p in inspect.signature(cls.__init__).parameters:
            if p in ("self", "legacy"):
                continue
            names.add(f"--{prefix}.{p}")
            group = next((t for t in typing.get_args(hints.get(p)) or (hints.get(p),) if dataclasses.is_dataclass(t)), None)
            names |= {f"--{prefix}.{p}.{f.name}" for f in dataclasses.fields(group)} if group else set()
    return sorted(names)


def _moved(name: str) -> str | None:
    """``--data.loader.batch_size`` -> "--data.loader.batch_size moved to --data.loader.batch_size ..." (grouped configs)."""
    from detectkit.configs import moved_key

    section, _, key = name.lstrip("-").partition(".")
    new = moved_key(section, key.removeprefix("init_args."))
    if new is None:
        return None
    *blocks, leaf = new.split(".")
    return f"{name} moved to --{new} (in a recipe: {leaf} under {': '.join(blocks)}:)"


def _explain_parse_error(message: str, parser: Any, args: Any) -> str:
    argv = list(args) if isinstance(args, (list, tuple)) else []
    sub = argv[0] if argv and not argv[0].startswith("-") else None
    text = " ".join(message.split())
    section = re.search(r'Parser key "([\w.]+)"', text)
    option = re.search(r"Option '([\w.]+)' is not accepted", text)
    group = re.search(r"Group '([\w.]+)' does not accept option '([\w.]+)'", text)  # a recipe's key
    for name in ([f"--{group.group(1)}.{group.group(2)}"] if group else []) + \
            ([f"--{section.group(1)}.{option.group(1)}"] if section and option else []) + \
            [b.split("=")[0] for b in re.findall(r"(--[A-Za-z0-9_.\-]+)", text)]:
        if _moved(name):  # an old flat key of the grouped configs
            return _moved(name)
    if section and option:  # a subclass-mode section (data:) rejecting an init argument
        name = f"--{section.group(1)}.{option.group(1)}"
        tip = suggest(name, _known_options(parser, sub))
        return f"{name} is not an option of the {section.group(1)} class.{tip or ' See detectkit ' + (sub or 'fit') + ' --help.'}"
    bad = re.findall(r"(--[A-Za-z0-9_.\-]+)", text)
    if bad:
        known = _known_options(parser, sub)
        tip = suggest(bad[0].split("=")[0], known)
        if tip:
            return f"{text}.{tip}"
    if len(text) > 400:  # a nested jsonargparse explanation: the first line says what is wrong
        text = text[:400] + " ..."
    return f"{text} (detectkit {sub or ''} --help lists the options)".replace("  ", " ")


# --------------------------------------------------------------------------- short help
_SHORT_TRAINER = ("max_epochs", "max_steps", "accelerator", "devices", "num_nodes", "precision", "default_root_dir",
                  "check_val_every_n_epoch", "accumulate_grad_batches", "limit_train_batches", "limit_val_batches")


def _arg_docs(cls: type) -> dict[str, str]:
    """``name: text`` lines of a Google-style ``Args:`` docstring (continuation lines joined)."""
    doc = inspect.getdoc(cls) or ""
    docs: dict[str, str] = {}
    current: list[str] = []
    in_args = False
    for line in doc.splitlines():
        if line.strip() == "Args:":
            in_args = True
            continue
        if not in_args:
            continue
        m = re.match(r"^    ([A-Za-z_][\w, ]*):\s*(.*)$", line)
        if m:
            current = [n.strip() for n in m.group(1).split(",")]
            for n in current:
                docs[n] = m.group(2)
        elif line.startswith("      ") and current:
            for n in current:
                docs[n] += " " + line.strip()
        elif line.strip() and not line.startswith(" "):
            in_args = False
    return docs


def _group_type(cls: type, name: str) -> type | None:
    """The dataclass a grouped argument takes (``loader: LoaderConfig | None``), else ``None``."""
    hint = typing.get_type_hints(cls.__init__).get(name)
    return next((t for t in typing.get_args(hint) or (hint,) if dataclasses.is_dataclass(t)), None)


def _short(text: str) -> str:
    return (text[:90] + "...") if len(text) > 93 else text


def _group_fields(group: type, default: Any) -> list[str]:
    """The fields of a grouped argument, with the argument's default values when it has some."""
    docs = _arg_docs(group)
    base = default if dataclasses.is_dataclass(default) else None
    lines = []
    for f in dataclasses.fields(group):
        value = getattr(base, f.name) if base is not None else (
            f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc]
        text = _short(docs.get(f.name, ""))
        lines.append(f"      .{f.name} (default {value!r})" + (f": {text}" if text else ""))
    return lines


def _options(cls: type, prefix: str, only: Sequence[str] | None = None) -> list[str]:
    """One entry per argument; a grouped argument lists its fields (``--data.loader.batch_size``)."""
    docs = _arg_docs(cls)
    lines = []
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or (only and name not in only):
            continue
        group = _group_type(cls, name) if cls is not Trainer else None
        if group is not None:
            text = _short(docs.get(name, ""))
            lines.append(f"  --{prefix}.{name}.FIELD" + (f"\n      {text}" if text else ""))
            lines += _group_fields(group, p.default)
            continue
        default = "" if p.default is inspect.Parameter.empty else f" (default {p.default!r})"
        text = docs.get(name, "")
        text = (text[:90] + "...") if len(text) > 93 else text
        lines.append(f"  --{prefix}.{name}{default}" + (f"\n      {text}" if text else ""))
    return lines


def short_help(sub: str) -> str:
    """A readable summary of ``detectkit <sub>``: the options people set, not all 1,300 lines."""
    from detectkit.data import DetectionDataModule
    from detectkit.modules.detector import DetectionModule

    out = [f"usage: detectkit {sub} --config RECIPE.yaml [--section.option VALUE ...]", "",
           "Run a LightningCLI recipe (experiments/*.yaml); any option below overrides the recipe.",
           "", "general:",
           "  --config FILE        a recipe (repeatable; later files override earlier ones)",
           "  --print_config       print the resolved config and exit",
           "  --help-full          every option (jsonargparse's full help)",
           "  --debug              show tracebacks on errors"]
    if sub != "fit":
        out.append("  --ckpt_path FILE     the checkpoint to evaluate / predict with")
    else:
        out.append("  --ckpt_path FILE     resume this checkpoint (weights, optimizer, epoch)")
    out += ["", "model (DetectionModule):", *_options(DetectionModule, "model"),
            "", "data (DetectionDataModule; another class: --data.class_path X --data.init_args.Y):",
            *_options(DetectionDataModule, "data"),
            "", "trainer (the most used; --help-full lists all):", *_options(Trainer, "trainer", _SHORT_TRAINER)]
    return "\n".join(out)


def main(argv: Sequence[str]) -> int:
    """Run one LightningCLI subcommand; ``argv`` starts with the subcommand."""
    argv = list(argv)
    sub = argv[0] if argv else None
    if sub and any(a in ("-h", "--help") for a in argv[1:]):
        print(short_help(sub))
        return 0
    argv = ["--help" if a == "--help-full" else a for a in argv]
    DetectkitCLI(args=argv)
    _close_process_group()
    return 0


def _close_process_group() -> None:
    """Tear the process group down before the interpreter exits. Left to static destructors, gloo's
    threads can abort a finished rank at exit ("terminate called without an active exception",
    SIGABRT), which torchrun reports as a failed node although training completed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
