"""Clean stops: SIGTERM / Ctrl-C during ``detectkit fit`` finish the current step, save
``last.ckpt``, print one line and exit 143 / 130 (before: a traceback, exit 0, or no stop at all).

This file is also the worker script: the fit must be a real process that receives the signal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


class Heartbeat(Callback):
    """Writes the finished step to ``marker`` (the test waits for it) and slows each step a little,
    so that "within one step" is measurable."""

    def __init__(self, marker: str, delay: float = 0.2) -> None:
        self.marker, self.delay = Path(marker), delay

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.delay)
        self.marker.write_text(str(trainer.global_step))

    def on_validation_start(self, trainer, pl_module) -> None:  # before the EMA swaps its average in
        live = sum(float(v.double().sum()) for v in pl_module.state_dict().values() if v.is_floating_point())
        self.marker.with_suffix(".live").write_text(repr(live))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        time.sleep(self.delay)
        self.marker.write_text(f"val {trainer.global_step}")


def worker(out: str, *extra: str) -> int:
    from compress_helpers import TinyDetector

    from detectkit.cli import main
    from detectkit.registry import list_models, register_model

    if "tiny_cli_detector" not in list_models():
        register_model(lambda num_classes=3, checkpoint=None: TinyDetector(num_classes), name="tiny_cli_detector")
    return main(["fit", "--config", str(ROOT / "experiments" / "quickstart.yaml"), "--model.model=tiny_cli_detector",
                 "--data.image_size=64", "--data.loader.batch_size=2", "--data.loader.num_workers=0",
                 "--data.synthetic.train_images=4", "--data.synthetic.val_images=2", "--data.synthetic.size=64",
                 f"--data.cache_dir={out}/data", f"--trainer.default_root_dir={out}",
                 f"--trainer.logger.init_args.save_dir={out}", "--trainer.max_epochs=10000",
                 "--trainer.check_val_every_n_epoch=10000", "--trainer.enable_model_summary=false",
                 "--trainer.callbacks+=test_stop_signal.Heartbeat", f"--trainer.callbacks.marker={out}/step", *extra])


def _started(text: str, in_validation: bool) -> bool:
    return text.startswith("val ") if in_validation else text.isdigit() and int(text) >= 3


def _fit_and_signal(tmp: Path, signum: int, *extra: str, group: bool = False,
                    in_validation: bool = False) -> tuple[subprocess.CompletedProcess, int]:
    """The run and the step the signal came in; the stop is bounded by a 60 s timeout (a step here
    takes ~0.3 s: stopping is the step, the save and the exit), TimeoutExpired past it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, __file__, "worker", str(tmp), *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=group)
    marker = tmp / "step"
    deadline = time.monotonic() + 240
    while not (marker.exists() and _started(marker.read_text(), in_validation)):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the fit did not start (rc {proc.returncode}):\n{out}\n{err}")
        time.sleep(0.1)
    step = int(marker.read_text().split()[-1])
    if group:  # a terminal's Ctrl-C or a job scheduler: the signal reaches the data workers too
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), step


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_the_fit_within_a_step_and_saves_last(tmp_path: Path, signum: int, code: int) -> None:
    from detectkit.checkpoint import read_checkpoint

    # to the whole process group, as a terminal's Ctrl-C or a scheduler's SIGTERM: the data worker gets it too
    done, step = _fit_and_signal(tmp_path, signum, "--data.loader.num_workers=1", group=True)
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    name = signal.Signals(signum).name
    lines = [line for line in done.stderr.splitlines() if name in line or "stopped" in line or "interrupt" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith(f"detectkit: {name}: fit stopped after step "), done.stderr
    last = sorted(tmp_path.rglob("last.ckpt"))
    assert len(last) == 1 and str(last[0]) in lines[0], (lines, last)
    saved = read_checkpoint(last[0])["global_step"]
    assert step <= saved <= step + 2, (step, saved)  # the step running when the signal came, at most one more


def test_a_finished_fit_leaves_the_signal_handlers_as_they_were(tmp_path: Path) -> None:
    import lightning.pytorch as pl
    from compress_helpers import TinyDetector
    from detectkit.callbacks import StopOnSignal
    from module_helpers import tiny_data, trainer

    from detectkit.modules.detector import DetectionModule

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    pl.seed_everything(0)
    trainer(tmp_path, [StopOnSignal()], max_steps=1, limit_val_batches=0).fit(
        DetectionModule(TinyDetector(num_classes=2), class_names=["a", "b"]), datamodule=tiny_data(tmp_path))
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.slow
def test_sigterm_inside_validation_saves_the_live_weights_beside_the_average(tmp_path: Path) -> None:
    """Validation runs on the EMA's average (swapped into the module): a stop there must not save the
    two swapped, or the resumed fit would train on and average the wrong weights."""
    import torch

    from detectkit.checkpoint import read_checkpoint

    done, step = _fit_and_signal(tmp_path, signal.SIGTERM, "--data.synthetic.val_images=8",
                                    "--trainer.check_val_every_n_epoch=1", in_validation=True)
    assert done.returncode == 143, done.stderr
    ckpt = read_checkpoint(sorted(tmp_path.rglob("last.ckpt"))[0])

    def total(state: dict) -> float:
        return sum(float(torch.as_tensor(v).double().sum()) for v in state.values()
                   if torch.is_tensor(v) and v.is_floating_point())

    live = float((tmp_path / "step.live").read_text())
    assert abs(total(ckpt["current_model_state"]) - live) <= 1e-6 * max(1.0, abs(live))
    assert abs(total(ckpt["state_dict"]) - live) > 1e-6 * max(1.0, abs(live))  # the average, not the live weights


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    sys.exit(worker(*sys.argv[2:]))
