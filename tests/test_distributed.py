"""Real multi-process DDP on CPU (gloo): equivalence with one process, distributed mAP, two
simulated nodes on 127.0.0.1, and resuming a checkpoint on another world size.

The DDP side is started by ``torchrun`` as two *nodes* of one process each (``--nnodes 2
--node_rank {0,1} --master_addr 127.0.0.1``), the way a multi-node job starts; Lightning picks
the ranks up from torchrun's environment. This file is also the worker script
(``python -m torch.distributed.run ... tests/test_distributed.py worker ...``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

GLOBAL_BATCH = 4
TRAIN_IMAGES = 8
VAL_IMAGES = 5  # odd on purpose: a padding DistributedSampler would repeat an image
EPOCHS = 2


# ------------------------------------------------------------------------------ the workload
def plain_detector(num_classes: int = 3):
    """A tiny three-level detector without BatchNorm, so DDP and one process compute the same
    function of the same global batch (BN statistics would be per-rank)."""
    from detectkit.models.base import Detector
    from detectkit.models.outputs import HeadOutput
    from detectkit.ops.boxes import make_anchors

    class PlainDetector(Detector):
        default_loss = "ppyoloe"

        def __init__(self) -> None:
            super().__init__(num_classes, bins=8)
            act = nn.SiLU
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), act(), nn.Conv2d(8, 8, 3, 2, 1), act(),
                                      nn.Conv2d(8, 16, 3, 2, 1), act())
            self.down1 = nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1), act())
            self.down2 = nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1), act())
            self.cls_pred = nn.ModuleList(nn.Conv2d(16, num_classes, 1) for _ in range(3))
            self.reg_pred = nn.ModuleList(nn.Conv2d(16, 32, 1) for _ in range(3))
            for conv in self.cls_pred:
                nn.init.constant_(conv.bias, -1.5)

        def head_forward(self, x: torch.Tensor) -> HeadOutput:
            p3 = self.stem(x)
            p4 = self.down1(p3)
            p5 = self.down2(p4)
            feats = (p3, p4, p5)
            cls = torch.cat([h(f).flatten(2) for h, f in zip(self.cls_pred, feats)], 2).transpose(1, 2)
            reg = torch.cat([h(f).flatten(2) for h, f in zip(self.reg_pred, feats)], 2).transpose(1, 2)
            points, strides = make_anchors([f.shape[2:] for f in feats], self.strides, device=x.device, dtype=x.dtype)
            return HeadOutput(cls, reg, points, strides, self.dfl.bins, feats)

    return PlainDetector()


def _datamodule(cache: str, batch_size: int):
    from detectkit.data import DetectionDataModule
    from detectkit.data.synthetic import SyntheticConfig

    return DetectionDataModule(
        image_size=64, batch_size=batch_size, num_workers=0, cache_dir=cache,
        mixup_prob=0.0, hsv_prob=0.0, flip_prob=0.0, translate=0.0, scale=(1.0, 1.0),
        synthetic=SyntheticConfig(train_images=TRAIN_IMAGES, val_images=VAL_IMAGES, size=64, num_classes=3),
    )


class _SeenImages:
    """Records the validation image ids each rank evaluated (checks sampler padding)."""

    def __new__(cls):
        from lightning.pytorch.callbacks import Callback

        class SeenImages(Callback):
            def __init__(self) -> None:
                self.ids: list[int] = []
                self.train: list[list[int]] = []

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                self.train.append(sorted(int(m["image_id"]) for m in batch["meta"]))

            def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
                self.ids.extend(int(m["image_id"]) for m in batch["meta"])

        return SeenImages()


def run(out: Path, cache: str, *, num_nodes: int = 1, devices: int = 1, resume: str | None = None,
        epochs: int = EPOCHS, sync_batchnorm: bool = False) -> dict[str, Any]:
    """Train (or resume), validate; rank 0 writes ``result.json`` and ``weights.pt`` under ``out``."""
    import lightning.pytorch as pl
    import torch.distributed as dist
    from lightning.pytorch.callbacks import ModelCheckpoint

    from detectkit.modules.detector import DetectionModule

    pl.seed_everything(0, workers=True)
    world = num_nodes * devices
    module = DetectionModule(plain_detector(), lr=2e-3, warmup_steps=1, weight_decay=0.0)
    dm = _datamodule(cache, GLOBAL_BATCH // world)
    seen = _SeenImages()
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, num_nodes=num_nodes,
        strategy="ddp" if world > 1 else "auto", max_epochs=epochs, logger=False,
        callbacks=[ModelCheckpoint(dirpath=str(out / "ckpt"), save_last=True), seen],
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        check_val_every_n_epoch=epochs, deterministic=True, sync_batchnorm=sync_batchnorm,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=resume)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    ids, train = seen.ids, seen.train
    if dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (ids, train))
        ids = [i for part in gathered for i in part[0]]
        train = [sorted(sum((part[1][s] for part in gathered), [])) for s in range(len(train))]
    result = {"world_size": trainer.world_size, "global_step": trainer.global_step, "metrics": metrics,
              "val_ids": ids, "train_batches": train, "last": str(out / "ckpt" / "last.ckpt")}
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in module.model.state_dict().items()}, out / "weights.pt")
        (out / "result.json").write_text(json.dumps(result))
    return result


# ------------------------------------------------------------------------------ launching
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(out: Path, cache: str, extra: list[str] = (), timeout: float = 400) -> dict[str, Any]:
    """Two ``torchrun`` agents, one per simulated node, rendezvous on 127.0.0.1."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = []
    logs = []
    for node_rank in range(2):
        log = open(out.parent / f"{out.name}_node{node_rank}.log", "wb")
        logs.append(log)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
               __file__, "worker", "--out", str(out), "--cache", cache, "--num-nodes", "2", *extra]
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait(timeout=10)
        for log in logs:
            log.close()
    for i, p in enumerate(procs):
        text = (out.parent / f"{out.name}_node{i}.log").read_text(errors="replace")
        assert p.returncode == 0, f"node {i} failed ({p.returncode}):\n{text[-4000:]}"
    return json.loads((out / "result.json").read_text())


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ------------------------------------------------------------------------------ the tests
def test_ddp_two_nodes_matches_single_process_and_resumes_on_one(tmp_path: Path) -> None:
    cache = str(tmp_path / "data")
    single = run(tmp_path / "single", cache)
    ddp = launch_two_nodes(tmp_path / "ddp", cache)

    # same global batches in the same order, no BN -> same weights
    assert ddp["train_batches"] == single["train_batches"], (ddp["train_batches"], single["train_batches"])
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["global_step"] == single["global_step"] == EPOCHS * TRAIN_IMAGES // GLOBAL_BATCH
    w1 = torch.load(tmp_path / "single" / "weights.pt")
    w2 = torch.load(tmp_path / "ddp" / "weights.pt")
    moved = _max_diff(w1, {k: torch.zeros_like(v) for k, v in w1.items()})
    assert _max_diff(w1, w2) < 1e-4, (_max_diff(w1, w2), moved)

    # distributed validation: Lightning's DistributedSampler pads 5 images to 6 (one image seen on
    # both ranks); the synced mAP keeps each image once, so it equals the one-process mAP
    assert set(ddp["val_ids"]) == set(single["val_ids"]) and len(single["val_ids"]) == VAL_IMAGES
    assert len(ddp["val_ids"]) == VAL_IMAGES + 1
    for k, v in single["metrics"].items():
        assert abs(ddp["metrics"][k] - v) < 1e-6, (k, v, ddp["metrics"][k])
    assert any(k.startswith("val/AP/") for k in single["metrics"])

    # a 2-process checkpoint resumes in 1 process (another world size) and keeps counting steps
    resumed = run(tmp_path / "resumed", cache, resume=ddp["last"], epochs=EPOCHS + 1)
    per_epoch = TRAIN_IMAGES // GLOBAL_BATCH
    # (a last.ckpt written at validation end is restored as "epoch 1 not finished": Lightning
    # may run a batch of that epoch again before epoch 2, hence >=)
    assert resumed["global_step"] >= (EPOCHS + 1) * per_epoch
    last_epoch = resumed["train_batches"][-per_epoch:]
    assert sorted(i for b in last_epoch for i in b) == list(range(TRAIN_IMAGES))  # a whole new epoch ran
    w3 = torch.load(tmp_path / "resumed" / "weights.pt")
    assert _max_diff(w2, w3) > 0  # it trained on from the DDP weights


def test_torchrun_script_two_nodes_resumes_a_one_process_checkpoint(tmp_path: Path) -> None:
    """``experiments/launch/torchrun.sh`` as two nodes on 127.0.0.1 running the real CLI, resuming
    a checkpoint written by one process (TinyDetector: BatchNorm, plain DDP)."""
    from tracking_helpers import tiny_config

    from detectkit.cli import main

    cfg = tiny_config(tmp_path, logger=False, callbacks=[])
    assert main(["fit", "--config", str(cfg)]) == 0
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2  # 8 images / batch 4

    script = Path(__file__).resolve().parents[1] / "experiments" / "launch" / "torchrun.sh"
    port = str(_free_port())
    env = {**os.environ, "PYTHON": sys.executable, "NNODES": "2", "NPROC": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": port, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(script.parents[2])])}
    procs, logs = [], []
    for node in range(2):
        logs.append(tmp_path / f"node{node}.log")
        procs.append(subprocess.Popen(
            ["bash", str(script), "--config", str(cfg), "--ckpt_path", str(last), "--trainer.max_epochs", "2"],
            env={**env, "NODE_RANK": str(node)}, stdout=open(logs[-1], "wb"), stderr=subprocess.STDOUT,
            start_new_session=True))
    try:
        for p in procs:
            p.wait(timeout=400)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait(timeout=10)
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log.read_text(errors="replace")[-4000:]
    assert "MEMBER: 2/2" in logs[0].read_text(errors="replace") + logs[1].read_text(errors="replace")
    # epoch 2 on 2 ranks x batch 4 = one step of global batch 8 after the restored 2 steps
    assert torch.load(last, weights_only=False)["global_step"] == 3


# ------------------------------------------------------------------------------ worker entry
def _worker(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--resume")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--sync-batchnorm", action="store_true")
    a = p.parse_args(argv)
    run(Path(a.out), a.cache, num_nodes=a.num_nodes, devices=a.devices, resume=a.resume, epochs=a.epochs,
        sync_batchnorm=a.sync_batchnorm)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    torch.set_num_threads(1)
    _worker(sys.argv[2:])
