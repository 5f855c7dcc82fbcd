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

from detectkit.data import AugmentConfig, LoaderConfig
from detectkit.data.curriculum import CurriculumCallback, CurriculumSampler
from detectkit.data.resizing import ProgressiveResizing
from detectkit.modules import OptimConfig

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


# ---------------------------------------------------------------- end to end: Lightning DDP, 2 ranks

FIT_EPOCHS = 3


def _tiny_module():
    from detectkit.models.yolo_nas import YoloNAS, YoloNASConfig
    from detectkit.models.yolo_nas.configs import StageCfg as S
    from detectkit.modules.detector import DetectionModule

    cfg = YoloNASConfig(
        stem_channels=8,
        stages=(S(16, 1, 8), S(32, 1, 8), S(64, 1, 16), S(64, 1, 16)),
        spp_channels=64,
        neck=(S(32, 1, 8), S(16, 1, 8), S(32, 1, 8), S(64, 1, 16)),
        head_channels=(16, 32, 64),
    )
    return DetectionModule(YoloNAS(cfg, num_classes=3), num_classes=3, optim=OptimConfig(warmup_steps=2))


def _datamodule_for_fit(root: str):
    from detectkit.data.datamodule import DetectionDataModule

    return DetectionDataModule(
        data_dir=root, image_size=64, loader=LoaderConfig(batch_size=2, num_workers=0),
        augment=AugmentConfig(mosaic_prob=0.0, mixup_prob=0.0), seed=3
    )


def _fit_worker(rank: int, port: int, root: str, out_dir: str, ckpt: str | None) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    torch.set_num_threads(1)
    # What torchrun sets: Lightning sees LOCAL_RANK, so it joins these processes instead of launching.
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank)
    )
    os.environ["NODE_RANK"] = "0"
    L.seed_everything(0, workers=True, verbose=False)
    records = []

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            records.append(
                (
                    trainer.current_epoch,
                    batch_idx,
                    tuple(batch["images"].shape[-2:]),
                    [m["index"] for m in batch["meta"]],
                    float(batch["targets"][:, 2:].max()) if len(batch["targets"]) else 0.0,
                )
            )

    sampler_types = []

    class Inspect(Callback):
        def on_train_start(self, trainer, pl_module):
            sampler_types.append(type(trainer.train_dataloader.sampler).__name__)

    callbacks = [
        ProgressiveResizing(start_size=32, end_size=96, start_epoch=0, end_epoch=2, jitter=0.35, seed=1),
        CurriculumCallback(score="loss", start_fraction=0.5, end_epoch=2, seed=2),
        Record(),
        Inspect(),
    ]
    if ckpt is None:
        # a checkpoint in the middle of epoch 1 (4 batches per epoch per rank: step 6 = batch 1 of epoch 1)
        callbacks.append(
            ModelCheckpoint(dirpath=out_dir, filename="mid-{step}", every_n_train_steps=6, save_top_k=-1)
        )
    trainer = L.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=FIT_EPOCHS,
        limit_val_batches=0,
        default_root_dir=out_dir,  # Lightning's default end-of-epoch checkpoint lands here, not in the cwd
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(_tiny_module(), datamodule=_datamodule_for_fit(root), ckpt_path=ckpt)
    curriculum = callbacks[1]
    result = {
        "records": records,
        "sampler_types": sampler_types,
        "world_size": trainer.world_size,
        "scores": curriculum.sampler.scores.tolist(),
        "epoch": curriculum.sampler.epoch,
    }
    torch.save(result, os.path.join(out_dir, f"fit{'_resumed' if ckpt else ''}_rank{rank}.pt"))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    from detectkit.data.synthetic import SyntheticConfig, synthetic_dataset

    out = tmp_path_factory.mktemp("ddp_fit")
    root = synthetic_dataset(SyntheticConfig(train_images=16, val_images=2, size=64, seed=4), out / "cache")
    train = str(root)
    args = (free_port(), train, str(out), None)
    mp.start_processes(_fit_worker, args=args, nprocs=WORLD, join=True, start_method="fork")
    ckpt = out / "mid-step=6.ckpt"
    assert ckpt.is_file(), sorted(p.name for p in out.iterdir())
    args = (free_port(), train, str(out), str(ckpt))
    mp.start_processes(_fit_worker, args=args, nprocs=WORLD, join=True, start_method="fork")
    load = lambda name: [torch.load(out / f"{name}_rank{r}.pt", weights_only=False) for r in range(WORLD)]  # noqa: E731
    return load("fit"), load("fit_resumed")


def _by_epoch(records):
    out = {}
    for epoch, _, _, indices, _ in records:
        out.setdefault(epoch, []).extend(indices)
    return out


@pytest.mark.slow
def test_fit_ddp_sampler_is_not_rewrapped(fitted):
    full, _ = fitted
    for rank in full:
        assert rank["world_size"] == 2
        assert rank["sampler_types"] == ["DistributedEpochRelaySampler"]


@pytest.mark.slow
def test_fit_ddp_same_size_every_step(fitted):
    full, _ = fitted
    a, b = full[0]["records"], full[1]["records"]
    assert [(e, i) for e, i, *_ in a] == [(e, i) for e, i, *_ in b]
    assert len(a) == FIT_EPOCHS * 4  # 16 images, 2 ranks, batch 2
    assert [r[2] for r in a] == [r[2] for r in b]
    resize = ProgressiveResizing(start_size=32, end_size=96, start_epoch=0, end_epoch=2, jitter=0.35, seed=1)
    assert [r[2] for r in a] == [(resize.size_for(e, i),) * 2 for e, i, *_ in a]
    assert len({r[2] for r in a}) > 2
    # boxes were scaled with the images: none lies outside the resized input
    assert all(r[4] <= r[2][1] + 1e-3 for rank in full for r in rank["records"])


@pytest.mark.slow
def test_fit_ddp_curriculum_shards(fitted):
    full, _ = fitted
    seen = [_by_epoch(rank["records"]) for rank in full]
    for epoch, pool in [(0, 8), (1, 12), (2, 16)]:  # start 0.5, full pool at epoch 2
        both = seen[0][epoch] + seen[1][epoch]
        assert len(seen[0][epoch]) == len(seen[1][epoch]) == 8
        assert len(set(both)) == pool
        counts = Counter(both).values()
        assert max(counts) - min(counts) <= 1  # the pool tiled evenly over the epoch
    assert not set(seen[0][2]) & set(seen[1][2]) and set(seen[0][2]) | set(seen[1][2]) == set(range(16))
    assert full[0]["scores"] == full[1]["scores"]  # gathered per-image losses: one curriculum


@pytest.mark.slow
def test_fit_ddp_resume_mid_epoch_continues_exactly(fitted):
    full, resumed = fitted
    for r in range(WORLD):
        tail = [rec for rec in full[r]["records"] if (rec[0], rec[1]) >= (1, 2)]
        assert resumed[r]["records"] == tail
        assert resumed[r]["scores"] == full[r]["scores"]
