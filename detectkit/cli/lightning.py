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
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from detectkit.errors import UserError, suggest

__all__ = ["DetectkitCLI", "main", "TRAINER_DEFAULTS", "ARCHITECTURE_HPARAMS", "short_help", "resolve_ckpt_path",
           "checkpoint_settings", "apply_settings"]

log = logging.getLogger(__name__)

#: DetectionModule arguments that a checkpoint's weights depend on (see DetectkitCLI._parse_ckpt_path)
ARCHITECTURE_HPARAMS = ("model", "num_classes", "class_names", "model_kwargs", "loss", "loss_kwargs", "text_encoder",
                        "prompt_tuning", "new_classes")


@dataclass(frozen=True)
class TrainerDefault:
    """A plugin or callback the CLI adds to every trainer unless the config already has one of
    ``kind`` (a class path); named by class path so the core never imports ``detectkit.callbacks``."""

    class_path: str
    kind: str
    plugin: bool = False
    only_without_tty: bool = False  # e.g. plain progress lines when stdout is a log file
    off_switch: str | None = None  # the Trainer flag that, set to False, leaves this default out


#: THE list of what every fit/validate/test/predict trainer gets by default
TRAINER_DEFAULTS: tuple[TrainerDefault, ...] = (
    TrainerDefault("detectkit.checkpoint.lightning_io.AtomicCheckpointIO", "lightning.fabric.plugins.io.CheckpointIO", plugin=True),
    TrainerDefault("detectkit.callbacks.NanGuard", "detectkit.callbacks.NanGuard"),
    TrainerDefault("detectkit.callbacks.RunReport", "detectkit.callbacks.RunReport"),
    TrainerDefault("detectkit.callbacks.StopOnSignal", "detectkit.callbacks.StopOnSignal"),
    # last.ckpt every epoch, the monitored ModelCheckpoint named best.ckpt (callbacks/checkpoints.py)
    TrainerDefault("detectkit.callbacks.LastCheckpoint", "detectkit.callbacks.LastCheckpoint",
                   off_switch="enable_checkpointing"),
    TrainerDefault("detectkit.callbacks.PlainProgressBar", "lightning.pytorch.callbacks.ProgressBar",
                   only_without_tty=True, off_switch="enable_progress_bar"),
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
        if not isinstance(args, dict):
            from detectkit.recipes import resolve_config_args

            args = resolve_config_args(list(args))  # `--config quickstart`: a shipped recipe by name
        self._argv = [a for a in args if isinstance(a, str)] if isinstance(args, (list, tuple)) else []
        try:
            self.config = parser.parse_object(args) if isinstance(args, dict) else parser.parse_args(args)
        except Exception as e:
            if type(e).__name__ != "ArgumentError":
                raise
            raise UserError(_explain_parse_error(str(e), parser, args)) from e

    def _parse_ckpt_path(self) -> None:
        """Take from ``--ckpt_path`` what the checkpoint recorded, not what the recipe says.

        LightningCLI re-applies ALL the checkpoint's ``hyper_parameters`` over the command line,
        which silently ignores e.g. ``--model.predict_postprocess.conf 0.5`` on validate/predict. Here the
        architecture always comes from the checkpoint; on validate/test/predict so do the image
        size, letterbox, classes and post-processing (:func:`checkpoint_settings`) unless the
        command line gives them, and a recipe value that differs is reported in one line.
        ``last``/``best`` (or a run folder) name a checkpoint of the newest run.
        """
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt_path:
            return
        cfg = self.config[sub]
        ckpt_path = resolve_ckpt_path(str(ckpt_path), _run_roots(cfg))
        cfg["ckpt_path"] = ckpt_path
        from detectkit.checkpoint import read_checkpoint

        ckpt = read_checkpoint(ckpt_path)
        hparams = ckpt.get("hyper_parameters", {})
        keep = {k: v for k, v in hparams.items() if k in ARCHITECTURE_HPARAMS}
        record = ckpt.get("detectkit")
        if "model_kwargs" in keep and isinstance(record, dict) and isinstance(record.get("model_kwargs"), dict):
            # the record's builder arguments carry the architecture as data (checked on read, never a
            # path to follow; no weights to fetch: the checkpoint's own load): the run's ``arch:
            # some.yaml`` may be gone, or point anywhere in a file from someone else
            keep["model_kwargs"] = dict(record["model_kwargs"])
        if keep:
            self.config = self.parser.parse_object({sub: {"model": keep}}, self.config)
            cfg = self.config[sub]
        if sub not in EVAL_COMMANDS:
            return
        given = _given_options(getattr(self, "_argv", []))
        changed = apply_settings(cfg, checkpoint_settings(ckpt), given)
        if changed:
            rank_zero_info(f"detectkit {sub}: from the checkpoint, not the recipe: " + ", ".join(changed)
                           + " (give the option on the command line to override)")
        _drop_unset_paths(cfg, sub)
        if sub in ("validate", "test") and not any(g.split(".")[:2] == ["trainer", "logger"] for g in given):
            _log_into_run(cfg, sub, Path(ckpt_path))

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
            if (default.only_without_tty and tty) or (default.off_switch and trainer_cfg.get(default.off_switch) is False):
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


# --------------------------------------------------------------------------- checkpoint settings
#: the commands that evaluate or apply a trained checkpoint (they take its recorded settings)
EVAL_COMMANDS = ("validate", "test", "predict")
#: post-processing groups of DetectionModule taken from the checkpoint's hyper-parameters
_POSTPROCESS_HPARAMS = ("val_postprocess", "predict_postprocess")
_UNSET = "???"  # a recipe's placeholder for a path the user must give


def resolve_ckpt_path(value: str, roots: Sequence[Path]) -> str:
    """``--ckpt_path`` as a file: ``last``/``best`` are the newest run's (under ``roots``:
    ``default_root_dir`` and the logger's ``save_dir``); a run folder means its ``last.ckpt``."""
    path = Path(value).expanduser()
    if value in ("last", "best") and not path.exists():
        found = [p for root in roots if root.is_dir() for p in root.rglob(f"checkpoints/{value}.ckpt")]
        if not found and value == "best":  # an older recipe's monitored file: named by last.ckpt
            found = [b for root in roots if root.is_dir() for p in root.rglob("checkpoints/last.ckpt")
                     if (b := _recorded_best(p)) is not None]
        if not found:
            where = ", ".join(str(r) for r in roots) or "."
            raise UserError(f"--ckpt_path {value}: no checkpoints/{value}.ckpt under {where} (the run folders of "
                            "this recipe's default_root_dir / logger save_dir); give the file's path")
        return str(max(found, key=lambda p: p.stat().st_mtime))
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                return str(candidate)
        raise UserError(f"--ckpt_path {value}: a folder without checkpoints/last.ckpt")
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt_path {value}: no such file (or 'last' / 'best' for the newest run's)")
    return str(path)


def _recorded_best(last: Path) -> Path | None:
    """The monitored best checkpoint that ``ModelCheckpoint`` recorded in ``last``'s callback state."""
    from detectkit.checkpoint import read_checkpoint

    try:
        states = read_checkpoint(last).get("callbacks") or {}
    except Exception:  # an unreadable last.ckpt just offers no candidate
        return None
    for key, state in states.items():
        best = state.get("best_model_path") if "ModelCheckpoint" in str(key) and isinstance(state, dict) else None
        if best and "'monitor': None" not in str(key) and Path(best).is_file():
            return Path(best)
    return None


def _run_roots(cfg: Any) -> list[Path]:
    trainer = cfg.get("trainer") or {}
    roots = [Path(trainer.get("default_root_dir") or ".")]
    logger = trainer.get("logger")
    init = logger.get("init_args") if hasattr(logger, "get") else None
    if init is not None and init.get("save_dir"):
        roots.append(Path(init.get("save_dir")))
    return list(dict.fromkeys(roots))


def checkpoint_settings(ckpt: Any) -> dict[str, Any]:
    """``{"data.image_size": 128, "model.val_postprocess": {"conf": 0.01, ...}, ...}``: what a checkpoint recorded about
    how its model sees images (validation size and letterbox), its classes and post-processing."""
    from detectkit.checkpoint import RECORD_KEY

    out: dict[str, Any] = {}
    record = ckpt.get(RECORD_KEY) if hasattr(ckpt, "get") else None
    if isinstance(record, dict):
        inference = record.get("inference") or {}
        size = inference.get("image_size")
        if size is not None:
            out["data.image_size"] = int(max(size)) if isinstance(size, (list, tuple)) else int(size)
        if inference.get("center") is not None:
            out["data.val_center"] = bool(inference["center"])
        if record.get("class_names"):
            out["data.classes"] = [str(n) for n in record["class_names"]]
    hparams = ckpt.get("hyper_parameters") or {}
    for key in _POSTPROCESS_HPARAMS:
        if isinstance(hparams.get(key), dict):
            out[f"model.{key}"] = dict(hparams[key])
    import detectkit.modules.detector  # noqa: F401  (registers DetectionModule's moved flat names)
    from detectkit.configs import moved_key

    for key, value in hparams.items():  # a checkpoint of before the grouping: flat val_conf, predict_iou ...
        new = moved_key("model", key) if value is not None else None
        if new and new.split(".")[1] in _POSTPROCESS_HPARAMS and not isinstance(hparams.get(new.split(".")[1]), dict):
            group, field = new.rsplit(".", 1)
            out.setdefault(group, {})[field] = value
    return out


def _given_options(argv: Sequence[str]) -> set[str]:
    """``{"data.image_size", ...}``: options named on the command line (``init_args`` elided)."""
    names = set()
    for a in argv:
        if a.startswith("--"):
            name = a[2:].split("=", 1)[0].replace(".init_args.", ".")
            names.add(name)
            names.add(name.split(".", 1)[0] + "." + name.rsplit(".", 1)[-1] if "." in name else name)
    return names


def _section(cfg: Any, name: str) -> Any:
    """The namespace holding a section's arguments (``init_args`` in subclass mode)."""
    sec = cfg.get(name)
    if sec is not None and hasattr(sec, "get") and sec.get("init_args") is not None:
        return sec.get("init_args")
    return sec


def _owner(ns: Any, key: str) -> Any | None:
    """The namespace that has ``key``: the section itself or one group below it (grouped configs)."""
    from jsonargparse import Namespace

    if not isinstance(ns, Namespace):
        return None
    if key in vars(ns):
        return ns
    return next((sub for sub in vars(ns).values() if isinstance(sub, Namespace) and key in vars(sub)), None)


def apply_settings(cfg: Any, settings: dict[str, Any], given: set[str]) -> list[str]:
    """Write ``settings`` into the parsed config except the options ``given`` on the command line
    (or that the section's class does not take); returns ``"name VALUE (recipe OLD)"`` for each
    value that differed."""
    changed = []
    for dotted, value in settings.items():
        if dotted in given:
            continue
        section, key = dotted.split(".", 1)
        owner = _owner(_section(cfg, section), key)
        if owner is None:
            continue
        old = owner.get(key)
        if isinstance(value, dict):  # a group (val_postprocess): field by field, the command line's kept
            changed += _apply_group(owner, key, dotted, value, given)
            continue
        if old != value and not (isinstance(old, (list, tuple)) and list(old) == value):
            if old is not None and key != "classes":
                changed.append(f"{dotted} {value} (recipe {old})")
            owner[key] = value
    return changed


def _apply_group(owner: Any, key: str, dotted: str, value: dict[str, Any], given: set[str]) -> list[str]:
    from jsonargparse import Namespace

    current = owner.get(key)
    fields = dict(vars(current)) if isinstance(current, Namespace) else dict(current or {})
    changed = []
    for name, v in value.items():
        if f"{dotted}.{name}" in given:
            continue
        v = list(v) if isinstance(v, tuple) else v
        if current is not None and name in fields and fields[name] != v:
            changed.append(f"{dotted}.{name} {v} (recipe {fields[name]})")
        fields[name] = v
    owner[key] = Namespace(**fields)
    return changed


def _drop_unset_paths(cfg: Any, sub: str) -> None:
    """An evaluation reads one split: a recipe's ``???`` placeholders for the others are not needed."""
    data = _owner(_section(cfg, "data"), "data_dir")
    if data is None:
        return
    needed = {"validate": "val", "test": "test", "predict": "val"}[sub]
    for key in ("data_dir", "train", "val", "test"):
        if vars(data).get(key) == _UNSET:
            data[key] = None
    if not (vars(data).get(needed) or data.get("data_dir")) and any(vars(data).get(k) for k in ("train", "val", "test")):
        raise UserError(f"detectkit {sub} reads the {needed} split: give --data.{needed} (or --data.data_dir)")


def _log_into_run(cfg: Any, sub: str, ckpt: Path) -> None:
    """Evaluating ``<run>/checkpoints/X.ckpt`` writes into ``<run>/<sub>/`` (metrics.csv, PR curve,
    confusion matrix, images): no new ``version_N`` folder of the recipe's logger."""
    if ckpt.parent.name != "checkpoints":
        return
    trainer = cfg.get("trainer")
    logger = trainer.get("logger") if trainer is not None else None
    kind = str(logger.get("class_path", "")) if hasattr(logger, "get") else ""
    if logger is False or (kind and not kind.endswith(("CSVLogger", "TensorBoardLogger"))):
        return  # no logger asked for, or a tracker (MLflow, W&B) that keeps its own runs
    from jsonargparse import Namespace

    trainer["logger"] = Namespace(class_path="lightning.pytorch.loggers.CSVLogger",
                                  init_args=Namespace(save_dir=str(ckpt.parent.parent), name=sub, version=""))
    # the folder is this command's own: its previous metrics.csv is replaced on purpose
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")


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

    out = [f"usage: detectkit {sub} --config RECIPE [--section.option VALUE ...]", "",
           "Run a LightningCLI recipe (a YAML file, or a shipped recipe by name: detectkit recipes lists them);",
           "any option below overrides the recipe.",
           "", "general:",
           "  --config RECIPE      a YAML file or a recipe name (repeatable; later ones override earlier ones)",
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
