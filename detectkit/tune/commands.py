"""``detectkit tune --config RECIPE``: hyperparameter search over a fit recipe."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence

from detectkit.errors import OptionParser, UserError

#: recipe overrides on tune's command line go to every trial's fit, as for ``detectkit fit``
RECIPE_PREFIXES = ("--model.", "--data.", "--trainer.", "--seed_everything")


def _epilog() -> str:
    from detectkit.tune.config import PARAMETERS

    lines = ["parameters (--space NAME=LOW:HIGH[:log] | NAME=A,B,C | NAME=VALUE | NAME=off; * = in the default space):"]
    width = max(len(n) for n in PARAMETERS)
    for name, p in PARAMETERS.items():
        default = f" [{p.default}]" if p.default is not None else (" [recipe size x0.75/1/1.25]" if name == "image_size" else "")
        star = "*" if p.default is not None or name == "image_size" else " "
        lines.append(f"  {star}{name:<{width}}  {p.key}: {p.help}{default}")
    lines += ["", "recipe overrides: any option of the --model, --data or --trainer sections (--data.image_size=64,",
              "--trainer.max_epochs 3: a trial's epochs) goes to every trial's fit, as for detectkit fit, and into",
              "best.yaml. Several processes, machines or SLURM array tasks given the same --storage and",
              "--study-name work on one study; --n-trials is the study's total."]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    from detectkit.tune.config import DEFAULT_STORAGE

    p = OptionParser(prog="detectkit tune", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_epilog(),
                     description="hyperparameter search over a fit recipe (Optuna TPE + MedianPruner on val mAP)")
    p.add_argument("--config", action="append", required=True,
                   help="the recipe (a YAML file or a shipped recipe's name); repeatable, later ones override")
    p.add_argument("--tune", dest="tune_config", metavar="FILE",
                   help="a YAML with a tune: section (space, n_trials, pruner, ...); flags below override it")
    p.add_argument("--space", action="append", default=[], metavar="NAME=SPEC",
                   help="search NAME over SPEC (LOW:HIGH, LOW:HIGH:log, A,B,C, a value, or off); repeatable")
    p.add_argument("--no-default-space", action="store_true", help="search only the --space / tune: space entries")
    p.add_argument("--storage", help=f"Optuna storage URL (default: {DEFAULT_STORAGE}; postgresql://user:pass@host/db "
                                     "for several machines)")
    p.add_argument("--study-name", help="the study (default: tune)")
    p.add_argument("--n-trials", type=int, help="the study's total number of trials, all workers together (default: 12)")
    p.add_argument("--timeout", type=float, help="seconds: this worker starts no trial after it")
    p.add_argument("--seed", type=int, help="sampler seed (each worker adds 1000 x --worker)")
    p.add_argument("--worker", type=int,
                   default=int(os.environ.get("SLURM_ARRAY_TASK_ID") or os.environ.get("DETECTKIT_TUNE_WORKER") or 0),
                   help="this worker's index: a distinct sampler seed per process (default: $SLURM_ARRAY_TASK_ID or 0)")
    p.add_argument("--train-batches", type=int, help="training batches per epoch in a trial (default: the recipe's)")
    p.add_argument("--val-batches", type=int, help="validation batches per epoch in a trial (default: all)")
    p.add_argument("--startup-trials", type=int, help="MedianPruner: complete trials before any is pruned (default: 3)")
    p.add_argument("--warmup-epochs", type=int, help="MedianPruner: epochs before a trial can be pruned (default: 0)")
    p.add_argument("--out", help="where best.yaml goes (default: runs/tune/STUDY)")
    p.add_argument("--no-report", action="store_true", help="only run trials: no table, no best.yaml")
    return p


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(tune's own arguments, recipe overrides as --key=value)``."""
    own: list[str] = []
    overrides: list[str] = []
    words = list(argv)
    i = 0
    while i < len(words):
        word = words[i]
        if word.startswith(RECIPE_PREFIXES):
            if "=" not in word:
                if i + 1 >= len(words):
                    raise UserError(f"{word} needs a value")
                word = f"{word}={words[i + 1]}"
                i += 1
            overrides.append(word)
        else:
            own.append(word)
        i += 1
    return own, overrides


def config_of(args: argparse.Namespace):
    """The :class:`TuneConfig`: the ``--tune`` file (or the defaults), then the flags."""
    from detectkit.tune.config import TuneConfig, parse_range

    cfg = TuneConfig.from_yaml(args.tune_config) if args.tune_config else TuneConfig()
    space = dict(cfg.space)
    for item in args.space:
        name, eq, spec = item.partition("=")
        if not eq:
            raise UserError(f"--space {item}: expected NAME=SPEC (e.g. lr=1e-4:1e-2:log, image_size=96,128, scale=off)")
        space[name.strip()] = parse_range(name.strip(), spec, "--space")
    flags = {"storage": args.storage, "study_name": args.study_name, "n_trials": args.n_trials, "timeout": args.timeout,
             "seed": args.seed, "train_batches": args.train_batches, "val_batches": args.val_batches,
             "output_dir": args.out}
    changes = {k: v for k, v in flags.items() if v is not None}
    pruner = dataclasses.replace(cfg.pruner, **{k: v for k, v in (("startup_trials", args.startup_trials),
                                                                  ("warmup_epochs", args.warmup_epochs)) if v is not None})
    cfg = dataclasses.replace(cfg, **changes, space=space, pruner=pruner,
                              default_space=cfg.default_space and not args.no_default_space)
    cfg.check("detectkit tune")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    own, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = _parser().parse_args(own)
    cfg = config_of(args)
    from detectkit.recipes import resolve

    configs = [str(resolve(c).resolve()) for c in args.config]  # a shipped recipe's name or a file
    from detectkit.cli import _working_folder_importable

    _working_folder_importable()  # a recipe's class_path: my_module.X next to it, as for detectkit fit
    from detectkit.tune.study import format_table, run_tune, trial_rows, write_best_recipe

    study = run_tune(cfg, configs, overrides, worker=args.worker, log=lambda line: print(line, flush=True))
    if args.no_report:
        return 0
    rows = trial_rows(study)
    print(format_table(rows))
    running = [r["trial"] for r in rows if r["state"] == "running"]
    if running:
        print(f"trials {running} are still running in other workers; the table and best.yaml will include them "
              f"when the last worker finishes")
    best = write_best_recipe(study, cfg, configs, overrides)
    if best is None:
        print("no complete trial yet: no best recipe written")
    else:
        print(f"best: trial {study.best_trial.number}, val mAP {study.best_value:.4f}; recipe: {best}\n"
              f"train it: detectkit fit --config {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
