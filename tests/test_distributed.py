"""Real multi-process DDP on CPU (gloo) through the real CLI and launch script.

``experiments/launch/torchrun.sh`` starts two *nodes* of one process each on 127.0.0.1
(``--nnodes 2 --node_rank {0,1} --master_addr 127.0.0.1``), the way a multi-node job starts;
Lightning reads the ranks from torchrun's environment. One run checks: DDP trains the same
weights as one process with the same global batch (BN-free model, same data order),
distributed validation gives the one-process mAP although Lightning's sampler pads the
validation set, and the 2-process checkpoint resumes in 1 process (another world size).
``PlainDetector`` and ``RecordRun`` live here so the CLI can build them from YAML.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
import yaml
from lightning.pytorch.callbacks import Callback

from detectkit.models.base import Detector
from detectkit.models.outputs import HeadOutput
from detectkit.ops.boxes import make_anchors

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 4
TRAIN_IMAGES = 8
VAL_IMAGES = 5  # odd on purpose: Lightning's DistributedSampler repeats one image on 2 ranks
EPOCHS = 2


class PlainDetector(Detector):
    """A tiny three-level detector without BatchNorm, so DDP and one process compute the same
    function of the same global batch (BN statistics would be per rank)."""

    default_loss = "ppyoloe"

    def __init__(self, num_classes: int = 3) -> None:
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


class RecordRun(Callback):
    """Writes what the run saw (global batches, validation image ids, metrics) and its weights."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.train: list[list[int]] = []
        self.val_ids: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train.append([int(m["image_id"]) for m in batch["meta"]])

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.val_ids.extend(int(m["image_id"]) for m in batch["meta"])

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        train, ids = self.train, self.val_ids
        if trainer.world_size > 1:
            parts = [None] * trainer.world_size
            torch.distributed.all_gather_object(parts, (train, ids))
            train = [sorted(sum((p[0][s] for p in parts), [])) for s in range(len(train))]
            ids = [i for p in parts for i in p[1]]
        else:
            train = [sorted(b) for b in train]
        if trainer.is_global_zero:
            self.out.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.detach().cpu() for k, v in pl_module.model.state_dict().items()}, self.out / "weights.pt")
            (self.out / "result.json").write_text(json.dumps({
                "world_size": trainer.world_size, "global_step": trainer.global_step, "train_batches": train,
                "val_ids": ids,
                "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
            }))


def write_config(tmp: Path, name: str) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": EPOCHS, "logger": False,
            "default_root_dir": str(tmp / name), "enable_progress_bar": False, "enable_model_summary": False,
            "num_sanity_val_steps": 0, "check_val_every_n_epoch": EPOCHS, "deterministic": True,
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp / name / "ckpt"), "save_last": True, "save_top_k": 0}},
                {"class_path": "test_distributed.RecordRun", "init_args": {"out": str(tmp / name)}},
            ],
        },
        "model": {"model": {"class_path": "test_distributed.PlainDetector"},
                  "optim": {"lr": 2e-3, "warmup_steps": 1, "weight_decay": 0.0}},
        "data": {
            "image_size": 64, "loader": {"batch_size": GLOBAL_BATCH, "num_workers": 0}, "cache_dir": str(tmp / "data"),
            "augment": {"mixup_prob": 0.0, "hsv_prob": 0.0, "flip_prob": 0.0, "translate": 0.0, "scale": [1.0, 1.0]},
            "synthetic": {"train_images": TRAIN_IMAGES, "val_images": VAL_IMAGES, "size": 64, "num_classes": 3},
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_two_nodes(tmp: Path, args: list[str], timeout: float = 400) -> None:
    """``experiments/launch/torchrun.sh`` twice: node ranks 0 and 1, rendezvous on 127.0.0.1."""
    script = ROOT / "experiments" / "launch" / "torchrun.sh"
    env = {**os.environ, "PYTHON": sys.executable, "NNODES": "2", "NPROC": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(ROOT)])}
    procs, logs = [], []
    for node in range(2):
        logs.append(tmp / f"node{node}.log")
        with open(logs[-1], "wb") as log:
            procs.append(subprocess.Popen(["bash", str(script), *args], env={**env, "NODE_RANK": str(node)},
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait(timeout=10)
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log.read_text(errors="replace")[-4000:]
    assert "MEMBER: 2/2" in "".join(log.read_text(errors="replace") for log in logs)


def _load(tmp: Path, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    return json.loads((tmp / name / "result.json").read_text()), torch.load(tmp / name / "weights.pt")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.slow
def test_two_nodes_match_one_process_and_resume_on_one(tmp_path: Path) -> None:
    from detectkit.cli import main

    assert main(["fit", "--config", str(write_config(tmp_path, "single"))]) == 0
    # same global batch: 2 ranks x 2
    torchrun_two_nodes(tmp_path, ["--config", str(write_config(tmp_path, "ddp")), "--data.loader.batch_size", "2"])
    single, w1 = _load(tmp_path, "single")
    ddp, w2 = _load(tmp_path, "ddp")

    assert (single["world_size"], ddp["world_size"]) == (1, 2)
    assert single["global_step"] == ddp["global_step"] == EPOCHS * TRAIN_IMAGES // GLOBAL_BATCH
    # the same global batches in the same order, no BN -> the same weights
    assert ddp["train_batches"] == single["train_batches"], (ddp["train_batches"], single["train_batches"])
    assert _max_diff(w1, w2) < 1e-4, _max_diff(w1, w2)

    # validation: 5 images padded to 6 (one image on both ranks); the synced mAP keeps each image
    # once, so it equals the one-process mAP
    assert sorted(single["val_ids"]) == list(range(VAL_IMAGES))
    assert len(ddp["val_ids"]) == VAL_IMAGES + 1 and set(ddp["val_ids"]) == set(single["val_ids"])
    assert single["metrics"]["val/mar_100"] > 0  # a non-trivial score to compare
    assert any(k.startswith("val/AP/") for k in single["metrics"])
    for k, v in single["metrics"].items():
        assert abs(ddp["metrics"][k] - v) < 1e-6, (k, v, ddp["metrics"][k])

    # the 2-process last.ckpt resumes in 1 process (another world size) and trains a new epoch
    last = tmp_path / "ddp" / "ckpt" / "last.ckpt"
    assert main(["fit", "--config", str(write_config(tmp_path, "resumed")), "--ckpt_path", str(last),
                 "--trainer.max_epochs", str(EPOCHS + 1), "--trainer.check_val_every_n_epoch", "1"]) == 0
    resumed, w3 = _load(tmp_path, "resumed")
    per_epoch = TRAIN_IMAGES // GLOBAL_BATCH
    assert resumed["global_step"] == (EPOCHS + 1) * per_epoch
    assert sorted(i for b in resumed["train_batches"] for i in b) == list(range(TRAIN_IMAGES))
    assert _max_diff(w2, w3) > 0
