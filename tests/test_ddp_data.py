"""Progressive resizing and curriculum under real 2-process DDP (gloo on CPU).

One spawn runs every check on both ranks and saves what each rank saw; the tests then compare.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detectkit.data.curriculum import CurriculumCallback, CurriculumSampler
from detectkit.data.resizing import ProgressiveResizing

WORLD = 2
N_IMAGES = 22
BATCH = 3


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class _Record:
    def __init__(self, i: int):
        self.height, self.width = 100, 100
        self.boxes = np.tile(np.array([[0, 0, 10 + i, 10 + i]], np.float32), ((i * 5) % 4, 1))

    def train_targets(self):
        return self.boxes, np.zeros(len(self.boxes), np.int64)


def _datamodule():
    return SimpleNamespace(
        datasets={"train": SimpleNamespace(records=[_Record(i) for i in range(N_IMAGES)])}, train_sampler=None
    )


def _trainer(dm, epoch, batches):
    return SimpleNamespace(
        datamodule=dm,
        world_size=dist.get_world_size(),
        global_rank=dist.get_rank(),
        current_epoch=epoch,
        num_training_batches=batches,
        reload_dataloaders_every_n_epochs=0,
    )


def _loss_of(i: int, epoch: int) -> float:
    return float((i * 7 + epoch * 3) % 11) / 3


def _drive(cb, dm, epoch, start_batch=0, stop_batch=None):
    """Lightning's order of calls for one epoch; returns the batches of dataset indices."""
    indices = list(cb.sampler)
    batches = [indices[i : i + BATCH] for i in range(0, len(indices), BATCH)]
    total = start_batch + len(batches)
    trainer = _trainer(dm, epoch, total)
    if start_batch == 0:
        cb.on_train_epoch_start(trainer, None)
    out = []
    for b, chunk in enumerate(batches[: None if stop_batch is None else stop_batch - start_batch]):
        batch = {"meta": [{"index": i} for i in chunk]}
        losses = torch.tensor([_loss_of(i, epoch) for i in chunk])
        cb.on_train_batch_end(
            trainer, None, {"loss": losses.sum(), "image_losses": losses}, batch, start_batch + b
        )
        out.append(chunk)
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    result = {}

    # 1. image size per step: resize real batches with the callback, record the shapes
    resize = ProgressiveResizing(start_size=64, end_size=160, start_epoch=0, end_epoch=2, jitter=0.4, seed=5)
    module = SimpleNamespace(log=lambda *a, **k: None)
    shapes = []
    for epoch in range(3):
        for step in range(6):
            batch = {
                "images": torch.rand(2, 3, 128, 128),
                "targets": torch.tensor([[0, 0, 10.0, 10.0, 50.0, 50.0]]),
                "meta": [{"scale": 1.0, "pad": (0, 0)}] * 2,
            }
            resize.on_train_batch_start(
                SimpleNamespace(current_epoch=epoch, datamodule=None), module, batch, step
            )
            shapes.append(tuple(batch["images"].shape[-2:]))
    result["shapes"] = gather(shapes)

    # 2. curriculum shards (world size and rank from the process group)
    scores = np.random.default_rng(1).random(N_IMAGES)
    shards = {}
    for length in ("pool", "dataset"):
        for epoch in range(4):
            sampler = CurriculumSampler(scores, start_fraction=0.3, end_epoch=3, epoch_length=length, seed=2)
            sampler.set_epoch(epoch)
            shards[(length, epoch)] = (gather(list(sampler)), sampler.global_indices().tolist(), len(sampler))
    result["shards"] = shards

    # 3. loss scores gathered across ranks: same scores and order on both ranks
    dm = _datamodule()
    cb = CurriculumCallback(score="loss", start_fraction=0.4, end_epoch=3, seed=4)
    cb.setup(_trainer(dm, 0, 0), None, "fit")
    history = []
    for epoch in range(4):
        history += _drive(cb, dm, epoch)
    result["loss_scores"] = gather(cb.sampler.scores.tolist())
    result["loss_order"] = gather(cb.sampler.global_indices().tolist())
    result["history"] = history

    # 4. resume mid-epoch 1 from rank 0's checkpoint state (what Lightning saves and restores)
    dm = _datamodule()
    cb = CurriculumCallback(score="loss", start_fraction=0.4, end_epoch=3, seed=4)
    cb.setup(_trainer(dm, 0, 0), None, "fit")
    resumed = _drive(cb, dm, 0) + _drive(cb, dm, 1, stop_batch=2)
    state = gather(cb.state_dict())[0]
    dm = _datamodule()
    cb = CurriculumCallback(score="objects")  # the checkpoint's settings win
    cb.setup(_trainer(dm, 0, 0), None, "fit")
    cb.load_state_dict(state)
    cb.sampler.set_epoch(1)  # Lightning's restart call
    resumed += _drive(cb, dm, 1, start_batch=2) + _drive(cb, dm, 2) + _drive(cb, dm, 3)
    result["resumed"] = resumed

    resize_state = gather(resize.state_dict())[0]
    fresh = ProgressiveResizing()
    fresh.load_state_dict(resize_state)
    result["resumed_sizes"] = [fresh.size_for(e, s) for e in range(3) for s in range(6)]

    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_data")
    # fork: the children inherit the imported modules (spawn re-imports torch and Lightning, tens
    # of seconds on a busy machine); nothing here has initialised a process group before.
    mp.start_processes(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True, start_method="fork")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_same_image_size_on_every_rank(ranks):
    per_rank = ranks[0]["shapes"]
    assert per_rank[0] == per_rank[1]
    sizes = [h for h, _ in per_rank[0]]
    assert len(set(sizes)) > 2  # the jitter really varies the size
    assert all(h == w and h % 32 == 0 for h, w in per_rank[0])


def test_curriculum_shards_partition_the_global_list(ranks):
    for (length, epoch), (shards, global_list, n) in ranks[0]["shards"].items():
        assert ranks[1]["shards"][(length, epoch)][1] == global_list  # same global order on both ranks
        assert len(shards[0]) == len(shards[1]) == n
        padded = global_list + global_list[: WORLD * n - len(global_list)]
        assert Counter(shards[0]) + Counter(shards[1]) == Counter(padded)
        if length == "pool" and len(global_list) % WORLD == 0:
            assert not set(shards[0]) & set(shards[1])
        if length == "dataset":
            assert len(global_list) == N_IMAGES
    # pool: 0.3 -> 7 images (padded to 8), then growing, all 22 from epoch 3
    assert [len(ranks[0]["shards"][("pool", e)][1]) for e in range(4)] == [7, 12, 17, 22]
    assert sorted(ranks[0]["shards"][("pool", 3)][1]) == list(range(N_IMAGES))


def test_loss_scores_identical_across_ranks(ranks):
    scores = ranks[0]["loss_scores"]
    assert scores[0] == scores[1]
    assert ranks[0]["loss_order"][0] == ranks[0]["loss_order"][1]
    # epoch 3 has the full pool: every image got its epoch-3 loss, half of them from the other rank
    seen = {i for chunk in ranks[0]["history"][-4:] + ranks[1]["history"][-4:] for i in chunk}
    assert seen == set(range(N_IMAGES))
    assert scores[0] == pytest.approx([_loss_of(i, 3) for i in range(N_IMAGES)])


def test_resume_continues_exactly(ranks):
    for r in range(WORLD):
        assert ranks[r]["resumed"] == ranks[r]["history"]
    assert ranks[0]["resumed_sizes"] == [h for h, _ in ranks[0]["shapes"][0]]
