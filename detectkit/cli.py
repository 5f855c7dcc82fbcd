"""The ``detectkit`` command.

``detectkit fit|validate|test|predict --config X.yaml`` is a LightningCLI over
``DetectionModule`` and ``DetectionDataModule``; other first words are dispatched to their own
parsers: ``detectkit.data.commands`` and ``detectkit.export.commands``, each exposing
``main(argv) -> exit code`` (add a word to :data:`EXTRA_COMMANDS` for a new tool).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

__all__ = ["DetectkitCLI", "main", "EXTRA_COMMANDS"]

#: DetectionModule arguments that a checkpoint's weights depend on (see DetectkitCLI._parse_ckpt_path)
ARCHITECTURE_HPARAMS = ("model", "num_classes", "class_names", "model_kwargs", "loss", "loss_kwargs", "text_encoder", "prompt_tuning")

#: first word -> module whose ``main(argv)`` runs it
EXTRA_COMMANDS: dict[str, str] = {"data": "detectkit.data.commands", "export": "detectkit.export.commands"}


class DetectkitCLI(LightningCLI):
    """LightningCLI with the data -> model links and a prediction writer for ``predict``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from detectkit.data import DetectionDataModule
        from detectkit.modules.detector import DetectionModule

        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # Subclass mode lets a recipe name its DataModule (``data: {class_path: ...GroundingDataModule}``,
        # RoboflowDataModule); a plain ``data:`` mapping still means DetectionDataModule (default below).
        kwargs.setdefault("subclass_mode_data", True)
        super().__init__(DetectionModule, DetectionDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        if self.subclass_mode_data:
            parser.set_defaults({"data": {"class_path": "detectkit.data.DetectionDataModule"}})
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """Take only the architecture from ``--ckpt_path``'s hyperparameters.

        LightningCLI re-applies ALL the checkpoint's ``hyper_parameters`` over the command line,
        which silently ignores e.g. ``--model.predict_conf 0.5`` or ``--model.val_iou 0.6`` on
        validate/predict. What defines the weights' shapes must come from the checkpoint; the
        thresholds and optimisation settings are the user's to choose.
        """
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        hparams = importlib.import_module("detectkit.checkpoint").read_checkpoint(ckpt_path).get("hyper_parameters", {})
        keep = {k: v for k, v in hparams.items() if k in ARCHITECTURE_HPARAMS}
        if keep:
            self.config = self.parser.parse_object({sub: {"model": keep}}, self.config)

    def before_predict(self) -> None:
        """Results go to the run dir unless the config already has a prediction writer."""
        if not any(isinstance(cb, BasePredictionWriter) for cb in self.trainer.callbacks):
            from detectkit.writers import DetectionWriter

            self.trainer.callbacks.append(DetectionWriter())


def _run_extra(word: str, argv: Sequence[str]) -> int:
    try:
        mod = importlib.import_module(EXTRA_COMMANDS[word])
    except ModuleNotFoundError as e:
        raise SystemExit(f"`detectkit {word}` is not available in this installation ({e})") from e
    return int(mod.main(list(argv)) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``detectkit``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTRA_COMMANDS:
        return _run_extra(argv[0], argv[1:])
    DetectkitCLI(args=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
