"""``make quickstart``: generate a dataset, train YOLO-NAS-S from scratch, validate, print one JSON line.

Everything goes through the same CLI as ``detectkit fit --config experiments/quickstart.yaml``;
the final line is the validation metrics of the saved checkpoint (re-scored from the file) plus
where the checkpoint and logs are.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from detectkit.recipes import recipe_path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

#: the shipped recipe (package data in a wheel, experiments/ in a checkout)
DEFAULT_CONFIG = recipe_path("quickstart")


def run(config: str | Path = DEFAULT_CONFIG, output_dir: str | Path = "runs/quickstart", overrides: Sequence[str] = ()) -> dict:
    """Train and validate with ``config``; returns the summary that :func:`main` prints."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from detectkit.cli import DetectkitCLI

    start = time.time()
    output_dir = Path(output_dir)
    args = [
        "--config", str(config),
        "--trainer.default_root_dir", str(output_dir),
        "--data.cache_dir", str(output_dir / "data"),
        "--trainer.logger.init_args.save_dir", str(output_dir),  # the recipe logs with a CSVLogger
        *overrides,
    ]
    cli = DetectkitCLI(args=args, run=False)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    trainer.fit(model, datamodule=data)
    ckpt_cb = next((cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)), None)
    ckpt = None
    if ckpt_cb is not None:
        ckpt = ckpt_cb.last_model_path or ckpt_cb.best_model_path or None
    results = trainer.validate(model, datamodule=data, ckpt_path=ckpt, verbose=False)[0]
    metrics = {k.split("/", 1)[1]: round(float(v), 4) for k, v in results.items() if k.startswith("val/")}
    return {
        **metrics,
        "checkpoint": str(Path(ckpt).resolve()) if ckpt else None,
        "logs": str(Path(trainer.log_dir or output_dir).resolve()),
        "config": str(Path(config).resolve()),
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "seconds": round(time.time() - start, 1),
    }


def _reexec_with_passive_omp(argv: Sequence[str]) -> None:
    """Re-run this process with ``OMP_WAIT_POLICY=PASSIVE`` unless it is set.

    OpenMP's default spin-waiting makes torch's CPU threads burn 5-10x the CPU time per step
    when the cores are shared with other processes (measured: 15 s vs 1.5 s per step); libgomp
    reads the variable when torch is first imported, which ``python -m detectkit.cli.quickstart``
    has already done by the time this module runs.
    """
    if os.environ.get("OMP_WAIT_POLICY") or os.environ.get("DETECTKIT_NO_REEXEC"):
        return
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "DETECTKIT_NO_REEXEC": "1"}
    os.execve(sys.executable, [sys.executable, "-m", "detectkit.cli.quickstart", *argv], env)


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        _reexec_with_passive_omp(sys.argv[1:])
    parser = argparse.ArgumentParser(prog="python -m detectkit.cli.quickstart", description=__doc__)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="LightningCLI config (default: %(default)s)")
    parser.add_argument("--output-dir", default="runs/quickstart", help="run directory (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="extra CLI arguments, e.g. --trainer.max_epochs=2")
    args, unknown = parser.parse_known_args(argv)
    summary = run(args.config, args.output_dir, [*args.overrides, *unknown])
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
