"""Curriculum: scores, pacing and shards on hand-checked values; sampler and callback state."""

from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from detectkit.data.curriculum import (
    CurriculumCallback,
    CurriculumSampler,
    Pacing,
    box_scores,
    curriculum_order,
    epoch_indices,
    loss_scores,
    mean_area_scores,
    object_count_scores,
    pool_size,
    shard_indices,
    small_object_scores,
)

BOXES = [
    np.array([[0, 0, 10, 10]], np.float32),  # one small box, area 100
    np.zeros((0, 4), np.float32),  # empty
    np.array([[0, 0, 40, 40], [0, 0, 20, 20]], np.float32),  # areas 1600 and 400
]
SIZES = [(100, 100)] * 3


def test_box_scores_by_hand():
    assert object_count_scores(BOXES).tolist() == [1, 0, 2]
    assert small_object_scores(BOXES).tolist() == [1.0, 0.0, 0.5]
    # 1 - mean(area / 10000): 1 - 0.01, empty 0, 1 - (0.16 + 0.04) / 2
    assert mean_area_scores(BOXES, SIZES).tolist() == pytest.approx([0.99, 0.0, 0.9])
    assert box_scores("small", BOXES, small_area=500).tolist() == [1.0, 0.0, 0.5]
    with pytest.raises(ValueError):
        box_scores("area", BOXES)
    with pytest.raises(ValueError):
        box_scores("nope", BOXES)


def test_loss_scores_put_unseen_after_seen_in_prior_order():
    losses = np.array([np.nan, 2.0, np.nan, 0.5])
    prior = np.array([5.0, 0.0, 1.0, 9.0])
    out = loss_scores(losses, prior)
    # seen: 2.0, 0.5; unseen: 2 + 1 + rank/4 with prior ranks (index 2 -> 1, index 0 -> 2)
    assert out.tolist() == [3.5, 2.0, 3.25, 0.5]
    assert curriculum_order(out).tolist() == [3, 1, 2, 0]


def test_pacing_by_hand():
    lin = Pacing("linear", start_fraction=0.25, end_epoch=10)
    assert [lin(e) for e in (0, 2, 5, 10, 12)] == pytest.approx([0.25, 0.4, 0.625, 1.0, 1.0])
    root = Pacing("root", start_fraction=0.5, end_epoch=3)
    # sqrt(0.25 + 0.75 t): t = 1/3 -> sqrt(0.5)
    assert [root(e) for e in (0, 1, 3)] == pytest.approx([0.5, math.sqrt(0.5), 1.0])
    step = Pacing("step", start_fraction=0.2, end_epoch=10, steps=4)
    assert [step(e) for e in (0, 2, 3, 5, 8, 9, 10)] == pytest.approx([0.2, 0.2, 0.4, 0.6, 0.8, 0.8, 1.0])
    with pytest.raises(ValueError):
        Pacing("cubic")
    with pytest.raises(ValueError):
        Pacing(start_fraction=0.0)


def test_pool_size():
    assert pool_size(10, 0.25) == 3
    assert pool_size(10, 0.3) == 3  # 0.3 * 10 = 3.0000000000000004 must not become 4
    assert pool_size(10, 1e-4) == 1
    assert pool_size(10, 1.0) == 10


def test_order_is_stable_by_score_then_index():
    assert curriculum_order(np.array([3.0, 1.0, 1.0, 0.0])).tolist() == [3, 1, 2, 0]


def test_shards_match_distributed_sampler():
    for n, world in [(7, 3), (8, 2), (2, 3), (10, 4)]:
        for rank in range(world):
            ours = shard_indices(np.arange(n), world, rank).tolist()
            theirs = list(DistributedSampler(range(n), world, rank, shuffle=False))
            assert ours == theirs, (n, world, rank)
            ours = shard_indices(np.arange(n), world, rank, drop_last=True).tolist()
            theirs = list(DistributedSampler(range(n), world, rank, shuffle=False, drop_last=True))
            assert ours == theirs, (n, world, rank)
    assert [shard_indices(np.arange(7), 3, r).tolist() for r in range(3)] == [[0, 3, 6], [1, 4, 0], [2, 5, 1]]


def test_epoch_indices_pool_tiling_and_determinism():
    scores = np.arange(20, dtype=float)[::-1]  # index 19 easiest
    pace = Pacing("linear", start_fraction=0.25, end_epoch=4)
    idx = epoch_indices(scores, 0, seed=1, pacing=pace)
    assert len(idx) == 20
    assert set(idx.tolist()) == {15, 16, 17, 18, 19}  # the easiest 5
    assert set(Counter(idx.tolist()).values()) == {4}  # tiled evenly
    assert idx.tolist() == epoch_indices(scores, 0, seed=1, pacing=pace).tolist()
    assert idx.tolist() != epoch_indices(scores, 0, seed=2, pacing=pace).tolist()
    pool_only = epoch_indices(scores, 1, seed=1, pacing=pace, length=0)  # 0.4375 * 20 -> 9
    assert sorted(pool_only.tolist()) == list(range(11, 20))
    assert sorted(epoch_indices(scores, 4, 1, pace, length=0).tolist()) == list(range(20))
    unshuffled = epoch_indices(scores, 0, 1, pace, length=7, shuffle=False)
    assert unshuffled.tolist() == [19, 18, 17, 16, 15, 19, 18]


def test_sampler_is_left_alone_by_lightning():
    """Lightning wraps train samplers unless they already are DistributedSamplers: ours is."""
    from lightning.pytorch.trainer.connectors.data_connector import _DataConnector
    from torch.utils.data import DataLoader

    sampler = CurriculumSampler(np.zeros(8), num_replicas=2, rank=1)
    loader = DataLoader(list(range(8)), sampler=sampler, batch_size=2)
    connector = SimpleNamespace(
        trainer=SimpleNamespace(
            _accelerator_connector=SimpleNamespace(use_distributed_sampler=True, is_distributed=True)
        )
    )
    assert _DataConnector._requires_distributed_sampler(connector, loader) is False
    plain = DataLoader(list(range(8)), sampler=torch.utils.data.RandomSampler(range(8)))
    assert _DataConnector._requires_distributed_sampler(connector, plain) is True


def test_sampler_len_iter_and_epochs():
    scores = np.arange(10, dtype=float)
    s = CurriculumSampler(scores, start_fraction=0.3, end_epoch=2, num_replicas=2, rank=0, seed=5)
    assert len(s) == 5 == len(list(s))
    assert set(s) <= {0, 1, 2}
    s.set_epoch(2)
    assert len(s) == 5 and len(set(s)) == 5  # full pool: this rank's half, no repeats
    pool = CurriculumSampler(
        scores, start_fraction=0.3, end_epoch=2, epoch_length="pool", num_replicas=2, rank=1
    )
    assert len(pool) == 2 and len(list(pool)) == 2  # 3 images padded to 4, 2 per rank
    pool.set_epoch(1)  # 0.65 -> 7 images -> 8 slots
    assert len(pool) == 4 == len(list(pool))


def test_sampler_mid_epoch_state_resumes_exactly():
    kwargs = dict(pacing="root", start_fraction=0.5, end_epoch=3, num_replicas=2, rank=1, seed=9)
    scores = np.random.default_rng(0).random(13)
    full = CurriculumSampler(scores, **kwargs)
    full.set_epoch(1)
    expected = list(full)

    first = CurriculumSampler(scores, **kwargs)
    first.set_epoch(1)
    first.skip = 3  # what the callback records after 3 consumed samples
    state = first.state_dict()
    resumed = CurriculumSampler(np.zeros(13), num_replicas=2, rank=1)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # Lightning calls this again on restart: it must keep the position
    assert len(resumed) == len(expected)
    assert list(resumed) == expected[3:]
    resumed.set_epoch(2)
    full.set_epoch(2)
    assert list(resumed) == list(full)
    other_world = CurriculumSampler(np.zeros(13), num_replicas=3, rank=0)
    with pytest.warns(UserWarning, match="restarts"):
        other_world.load_state_dict(state)
    assert other_world.skip == 0 and other_world.epoch == 1


class _Record:
    def __init__(self, n_boxes: int):
        self.height, self.width = 100, 100
        self.boxes = np.tile(np.array([[0, 0, 10, 10]], np.float32), (n_boxes, 1))

    def train_targets(self):
        return self.boxes, np.zeros(len(self.boxes), np.int64)


class _DataModule:
    def __init__(self, n: int):
        self.datasets = {"train": SimpleNamespace(records=[_Record(i % 5) for i in range(n)])}
        self.train_sampler = None


def _trainer(dm, epoch=0, batches=3):
    return SimpleNamespace(
        datamodule=dm,
        world_size=1,
        global_rank=0,
        current_epoch=epoch,
        num_training_batches=batches,
        reload_dataloaders_every_n_epochs=0,
    )


def _run_epoch(cb, trainer, batch_size, loss_of, start_batch=0, stop_batch=None):
    """Drive the callback like Lightning's loop over this epoch's sampler indices."""
    indices = list(cb.sampler)
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    seen = []
    if start_batch == 0:
        cb.on_train_epoch_start(trainer, None)
    for b, chunk in enumerate(batches[: None if stop_batch is None else stop_batch - start_batch]):
        batch = {"meta": [{"index": i} for i in chunk]}
        outputs = {"loss": torch.tensor(0.0), "image_losses": torch.tensor([loss_of(i) for i in chunk])}
        cb.on_train_batch_end(trainer, None, outputs, batch, start_batch + b)
        seen.append(chunk)
    return seen


def test_callback_box_score_installs_sampler():
    dm = _DataModule(10)
    cb = CurriculumCallback(score="objects", start_fraction=0.4, end_epoch=2)
    cb.setup(_trainer(dm), None, "fit")
    assert dm.train_sampler is cb.sampler
    # objects = i % 5: the 4 easiest are indices 0, 5 (0 boxes), 1, 6 (1 box)
    assert set(cb.sampler) == {0, 1, 5, 6}


def test_callback_loss_scores_reorder_next_epoch():
    dm = _DataModule(12)
    cb = CurriculumCallback(score="loss", prior="objects", start_fraction=0.5, end_epoch=10, seed=3)
    trainer = _trainer(dm, batches=3)
    cb.setup(trainer, None, "fit")
    seen = {i for chunk in _run_epoch(cb, trainer, 4, loss_of=lambda i: float(i)) for i in chunk}
    assert seen == {0, 5, 10, 1, 6, 11}  # prior i % 5 boxes: 0 boxes {0, 5, 10}, 1 box {1, 6, 11}
    # losses = index: the next pool keeps the 6 seen images ordered by loss, then unseen by prior
    assert cb.sampler.epoch == 1 and cb.samples_seen == 0
    assert curriculum_order(cb.sampler.scores)[:6].tolist() == [0, 1, 5, 6, 10, 11]
    assert curriculum_order(cb.sampler.scores)[6:9].tolist() == [2, 7, 3]  # 2 boxes, then 3


def test_callback_resume_mid_epoch_matches_uninterrupted():
    def run(interrupt: bool):
        dm = _DataModule(12)
        make = lambda: CurriculumCallback(score="loss", start_fraction=0.5, end_epoch=3, seed=7)  # noqa: E731
        cb = make()
        cb.setup(_trainer(dm), None, "fit")
        loss_of = lambda i: float((i * 7) % 5)  # noqa: E731
        history = []
        history += _run_epoch(cb, _trainer(dm, 0), 4, loss_of)
        if interrupt:
            history += _run_epoch(cb, _trainer(dm, 1), 4, loss_of, stop_batch=1)
            state = cb.state_dict()
            dm = _DataModule(12)
            cb = CurriculumCallback(score="objects")  # the checkpoint's settings must win
            cb.setup(_trainer(dm), None, "fit")
            cb.load_state_dict(state)
            cb.sampler.set_epoch(1)  # Lightning's restart call
            history += _run_epoch(cb, _trainer(dm, 1), 4, loss_of, start_batch=1)
        else:
            history += _run_epoch(cb, _trainer(dm, 1), 4, loss_of)
        history += _run_epoch(cb, _trainer(dm, 2), 4, loss_of)
        return history, cb.sampler.scores

    uninterrupted, scores_a = run(False)
    resumed, scores_b = run(True)
    assert resumed == uninterrupted
    np.testing.assert_array_equal(scores_a, scores_b)


def test_callback_requires_reload_for_pool_length():
    cb = CurriculumCallback(epoch_length="pool")
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs"):
        cb.setup(_trainer(_DataModule(4)), None, "fit")


def test_experiment_recipe_builds_the_callback():
    import importlib
    from pathlib import Path

    import yaml

    path = Path(__file__).parents[1] / "experiments" / "yolo_nas_s_curriculum.yaml"
    (entry,) = yaml.safe_load(path.read_text())["trainer"]["callbacks"]
    module, name = entry["class_path"].rsplit(".", 1)
    cb = getattr(importlib.import_module(module), name)(**entry["init_args"])
    assert isinstance(cb, CurriculumCallback) and cb.score == "loss"
    assert cb.sampler_kwargs["pacing"] == Pacing("root", start_fraction=0.3, end_epoch=10)
