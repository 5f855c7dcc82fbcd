"""SIGKILL mid-epoch, resume from ``last.ckpt``, end with the weights of an uninterrupted run;
and a kill during a checkpoint write never leaves a truncated ``last.ckpt``.

This file is also the worker script (the killed runs must be real processes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detectkit.data import LoaderConfig
from detectkit.modules import OptimConfig

HERE = Path(__file__).resolve().parent
TRAIN_IMAGES, BATCH, EPOCHS = 8, 2, 2
STEPS_PER_EPOCH = TRAIN_IMAGES // BATCH
KILL_AT = 3  # global step 3 of 8: mid-epoch 0 (the last checkpoint holds step 2)


def train(out: Path, cache: str, kill_at: int | None = None, resume: str | None = None) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from test_distributed import PlainDetector

    from detectkit.checkpoint.lightning_io import AtomicCheckpointIO
    from detectkit.data import DetectionDataModule
    from detectkit.data.synthetic import SyntheticConfig
    from detectkit.modules.detector import DetectionModule

    class KillAt(Callback):
        """SIGKILLs this process after the optimizer step ``kill_at`` (before that step's
        checkpoint: Lightning runs ModelCheckpoint after the other callbacks)."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if kill_at is not None and trainer.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    class Order(Callback):
        def __init__(self) -> None:
            self.batches: list[list[int]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.batches.append([int(m["image_id"]) for m in batch["meta"]])

    pl.seed_everything(0, workers=True)
    module = DetectionModule(PlainDetector(), optim=OptimConfig(lr=2e-3, warmup_steps=2, weight_decay=1e-4))
    dm = DetectionDataModule(  # augmentation on: its per-(seed, epoch, index) randomness must resume too
        image_size=64, loader=LoaderConfig(batch_size=BATCH, num_workers=0), cache_dir=cache,
        synthetic=SyntheticConfig(train_images=TRAIN_IMAGES, val_images=2, size=64, num_classes=3))
    order = Order()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=EPOCHS, logger=False, deterministic=True,
        callbacks=[KillAt(), order, ModelCheckpoint(dirpath=str(out / "ckpt"), save_last=True, save_top_k=0,
                                                    every_n_train_steps=1)],
        plugins=[AtomicCheckpointIO()], enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=1,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=resume)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in module.model.state_dict().items()}, out / "weights.pt")
    (out / "result.json").write_text(json.dumps({"global_step": trainer.global_step, "batches": order.batches}))


def _run_worker(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, __file__, "worker", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    cache = str(tmp_path / "data")
    ref = _run_worker("train", str(tmp_path / "ref"), cache)
    assert ref.returncode == 0, ref.stderr[-3000:]

    killed = _run_worker("train", str(tmp_path / "run"), cache, "--kill-at", str(KILL_AT))
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])
    last = tmp_path / "run" / "ckpt" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == KILL_AT - 1 and ckpt["epoch"] == 0  # a mid-epoch checkpoint
    assert not list((tmp_path / "run" / "ckpt").glob("*.tmp"))

    resumed = _run_worker("train", str(tmp_path / "run2"), cache, "--resume", str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    r_ref = json.loads((tmp_path / "ref" / "result.json").read_text())
    r_res = json.loads((tmp_path / "run2" / "result.json").read_text())
    assert r_res["global_step"] == r_ref["global_step"] == EPOCHS * STEPS_PER_EPOCH
    # the resumed run sees exactly the batches the uninterrupted run saw after step KILL_AT - 1
    assert r_res["batches"] == r_ref["batches"][KILL_AT - 1:], (r_res["batches"], r_ref["batches"])
    w_ref = torch.load(tmp_path / "ref" / "weights.pt")
    w_res = torch.load(tmp_path / "run2" / "weights.pt")
    diff = max(float((w_ref[k] - w_res[k]).abs().max()) for k in w_ref)
    assert diff < 1e-6, diff


def _save_big(path: str, fill: float) -> None:
    from detectkit.checkpoint.lightning_io import AtomicCheckpointIO

    AtomicCheckpointIO().save_checkpoint({"fill": fill, "w": torch.full((32 * 2**20,), fill)}, path)  # 128 MB


def test_kill_during_checkpoint_write_keeps_last_ckpt_whole(tmp_path: Path) -> None:
    last = tmp_path / "last.ckpt"
    _save_big(str(last), 1.0)
    size = last.stat().st_size
    for _attempt in range(5):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
        proc = subprocess.Popen([sys.executable, __file__, "worker", "save", str(last), "2.0"], env=env)
        try:
            deadline = time.monotonic() + 120
            # the writer's partial file: detectkit.utils.files.partial_path (last.ckpt.<pid>.tmp)
            tmp = tmp_path / f"last.ckpt.{proc.pid}.tmp"
            while not (tmp.exists() and tmp.stat().st_size > 0) and proc.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.002)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
        if proc.returncode == -signal.SIGKILL and tmp.exists() and tmp.stat().st_size < size:
            break  # killed in the middle of the write
        tmp.unlink(missing_ok=True)
        _save_big(str(last), 1.0)
    else:
        raise AssertionError("never managed to kill the writer mid-write")
    # the partial file is only ever the .tmp; last.ckpt is the previous complete checkpoint
    assert last.stat().st_size == size
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["fill"] == 1.0 and bool((ckpt["w"] == 1.0).all())


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "worker":
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    torch.set_num_threads(1)
    if sys.argv[2] == "save":
        _save_big(sys.argv[3], float(sys.argv[4]))
    else:
        import argparse

        p = argparse.ArgumentParser()
        p.add_argument("mode")
        p.add_argument("out")
        p.add_argument("cache")
        p.add_argument("--kill-at", type=int)
        p.add_argument("--resume")
        a = p.parse_args(sys.argv[2:])
        train(Path(a.out), a.cache, kill_at=a.kill_at, resume=a.resume)
