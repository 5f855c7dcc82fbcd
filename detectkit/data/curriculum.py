"""Curriculum learning: train on the easiest images first, then widen the pool.

Three parts, each usable alone:

* difficulty scores, from box arrays (no image decoding) or from each image's loss;
* :class:`Pacing`, the fraction of the dataset in the pool at an epoch;
* :class:`CurriculumSampler`, which under DDP builds the *same* global index list on every rank
  from ``(scores, seed, epoch)`` and takes an equal shard of it, like ``DistributedSampler``.

It subclasses ``DistributedSampler`` on purpose: Lightning's ``use_distributed_sampler`` only
wraps a sampler that is not one (``_requires_distributed_sampler``), so ours is used as is,
with its own ``num_replicas``/``rank``, instead of being re-sharded by
``DistributedSamplerWrapper``. Epochs keep a constant length by default (the pool is tiled to
the dataset size), so ``estimated_stepping_batches`` and step-based LR schedules stay right.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DistributedSampler

from detectkit.data.resizing import derive_seed

__all__ = [
    "BOX_SCORES",
    "CurriculumCallback",
    "CurriculumSampler",
    "Pacing",
    "box_scores",
    "epoch_indices",
    "loss_scores",
    "mean_area_scores",
    "object_count_scores",
    "pool_size",
    "shard_indices",
    "small_object_scores",
]

COCO_SMALL_AREA = 32.0 * 32.0
_PACINGS = ("linear", "root", "step")


# ---------------------------------------------------------------- difficulty scores (higher = harder)


def _areas(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def object_count_scores(boxes: Sequence[np.ndarray]) -> np.ndarray:
    """More objects, more to find: the number of boxes per image."""
    return np.array([len(np.asarray(b).reshape(-1, 4)) for b in boxes], dtype=np.float64)


def small_object_scores(boxes: Sequence[np.ndarray], small_area: float = COCO_SMALL_AREA) -> np.ndarray:
    """Share of boxes smaller than ``small_area`` px² (COCO's "small"); 0 for an empty image."""
    out = np.zeros(len(boxes), dtype=np.float64)
    for i, b in enumerate(boxes):
        a = _areas(b)
        if len(a):
            out[i] = float((a < small_area).mean())
    return out


def mean_area_scores(boxes: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]]) -> np.ndarray:
    """``1 - mean(box area / image area)``: big objects are easy. 0 for an empty image."""
    if len(boxes) != len(sizes):
        raise ValueError(f"{len(boxes)} box arrays but {len(sizes)} image sizes")
    out = np.zeros(len(boxes), dtype=np.float64)
    for i, (b, (h, w)) in enumerate(zip(boxes, sizes)):
        a = _areas(b)
        if len(a):
            out[i] = 1.0 - float(np.clip(a / (float(h) * float(w)), 0, 1).mean())
    return out


BOX_SCORES = ("objects", "small", "area")


def box_scores(
    kind: str,
    boxes: Sequence[np.ndarray],
    sizes: Sequence[tuple[int, int]] | None = None,
    small_area: float = COCO_SMALL_AREA,
) -> np.ndarray:
    """Dispatch to one of :data:`BOX_SCORES` by name (for configs)."""
    if kind == "objects":
        return object_count_scores(boxes)
    if kind == "small":
        return small_object_scores(boxes, small_area)
    if kind == "area":
        if sizes is None:
            raise ValueError("score 'area' needs the image sizes")
        return mean_area_scores(boxes, sizes)
    raise ValueError(f"unknown box score {kind!r}; expected one of {BOX_SCORES}")


def loss_scores(losses: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Scores from per-image losses (NaN = never seen); unseen images rank after every seen one.

    A seen image scores its loss; an unseen one ``max_seen + 1 + rank(prior)/n``, so the order
    among unseen images is the prior's (e.g. a box score) and none of them jumps ahead of an
    image whose loss is known.
    """
    losses, prior = np.asarray(losses, dtype=np.float64), np.asarray(prior, dtype=np.float64)
    if losses.shape != prior.shape:
        raise ValueError(f"losses {losses.shape} and prior {prior.shape} differ in shape")
    n = len(prior)
    seen = np.isfinite(losses)
    out = np.empty(n, dtype=np.float64)
    out[seen] = losses[seen]
    top = float(out[seen].max()) if seen.any() else 0.0
    rank = np.empty(n, dtype=np.float64)
    rank[curriculum_order(prior)] = np.arange(n)
    out[~seen] = top + 1.0 + rank[~seen] / max(n, 1)
    return out


# ---------------------------------------------------------------- pacing


@dataclass(frozen=True)
class Pacing:
    """Fraction of the dataset in the pool at ``epoch``: ``start_fraction`` at epoch 0, 1 from ``end_epoch``.

    ``linear``: ``s + (1 - s) t``; ``root``: ``sqrt(s² + (1 - s²) t)`` (Platanios et al. 2019,
    fast early growth); ``step``: ``s + (1 - s) floor(t * steps) / steps``; with
    ``t = epoch / end_epoch``.
    """

    kind: str = "linear"
    start_fraction: float = 0.25
    end_epoch: int = 10
    steps: int = 4

    def __post_init__(self) -> None:
        if self.kind not in _PACINGS:
            raise ValueError(f"pacing must be one of {_PACINGS}, got {self.kind!r}")
        if not 0.0 < self.start_fraction <= 1.0:
            raise ValueError(f"start_fraction must be in (0, 1], got {self.start_fraction}")
        if self.end_epoch < 0 or self.steps < 1:
            raise ValueError("end_epoch must be >= 0 and steps >= 1")

    def __call__(self, epoch: int) -> float:
        if epoch >= self.end_epoch:
            return 1.0
        s, t = self.start_fraction, max(0, epoch) / self.end_epoch
        if self.kind == "linear":
            f = s + (1 - s) * t
        elif self.kind == "root":
            f = math.sqrt(s * s + (1 - s * s) * t)
        else:
            f = s + (1 - s) * math.floor(t * self.steps) / self.steps
        return min(1.0, max(s, f))


def pool_size(n: int, fraction: float) -> int:
    """How many images a fraction of ``n`` means (at least one; float noise does not add one)."""
    return min(n, max(1, math.ceil(round(fraction * n, 9))))


# ---------------------------------------------------------------- the global index list and its shards


def curriculum_order(scores: np.ndarray) -> np.ndarray:
    """Indices easiest first: by score, ties by index, so every rank sorts identically."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.lexsort((np.arange(len(scores)), scores))


def epoch_indices(
    scores: np.ndarray,
    epoch: int,
    seed: int,
    pacing: Pacing,
    length: int | None = None,
    shuffle: bool = True,
) -> np.ndarray:
    """The global list of dataset indices for ``epoch``: pure in its arguments.

    The pool is the easiest ``pacing(epoch)`` fraction. With ``length`` (default: the dataset
    size) the pool is repeated, each repeat shuffled anew, until it fills ``length`` slots;
    ``length=0`` means exactly the pool.
    """
    n = len(scores)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    pool = curriculum_order(scores)[: pool_size(n, pacing(epoch))]
    k = len(pool)
    length = n if length is None else (k if length == 0 else int(length))
    g = torch.Generator().manual_seed(derive_seed(seed, epoch))
    parts, total = [], 0
    while total < length:
        part = pool[torch.randperm(k, generator=g).numpy()] if shuffle else pool
        parts.append(part)
        total += k
    return np.concatenate(parts)[:length].astype(np.int64)


def shard_indices(indices: np.ndarray, num_replicas: int, rank: int, drop_last: bool = False) -> np.ndarray:
    """This rank's equal share, as ``DistributedSampler``: pad by wrap-around, or drop the tail."""
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank} outside [0, {num_replicas})")
    indices = np.asarray(indices, dtype=np.int64)
    n = len(indices)
    if drop_last:
        total = (n // num_replicas) * num_replicas
        indices = indices[:total]
    else:
        total = math.ceil(n / num_replicas) * num_replicas
        if total > n:
            indices = np.resize(indices, total)  # np.resize repeats the array: wrap-around padding
    return indices[rank:total:num_replicas]


class CurriculumSampler(DistributedSampler):
    """Easiest-first pool that grows with the epochs, sharded identically to ``DistributedSampler``.

    ``epoch_length``: ``"dataset"`` (default) keeps every epoch as long as the dataset by
    repeating the pool; ``"pool"`` makes an epoch exactly the pool (its length changes, so
    Lightning needs ``reload_dataloaders_every_n_epochs=1``); an int fixes the global length.
    ``num_replicas``/``rank`` default to the initialised process group, else 1/0.

    Mid-epoch resume: ``state_dict`` carries ``skip``, the number of this rank's samples already
    consumed in ``epoch``; the next iteration of that epoch starts after them while ``__len__``
    stays the full shard, matching Lightning's restored batch counter.
    """

    def __init__(
        self,
        scores: Sequence[float] | np.ndarray | torch.Tensor,
        pacing: str | Pacing = "linear",
        start_fraction: float = 0.25,
        end_epoch: int = 10,
        steps: int = 4,
        epoch_length: str | int = "dataset",
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        # DistributedSampler.__init__ needs a dataset and a process group; we need neither.
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        if not (epoch_length in ("dataset", "pool") or (isinstance(epoch_length, int) and epoch_length > 0)):
            raise ValueError(
                f"epoch_length must be 'dataset', 'pool' or a positive int, got {epoch_length!r}"
            )
        self.pacing = (
            pacing
            if isinstance(pacing, Pacing)
            else Pacing(kind=pacing, start_fraction=start_fraction, end_epoch=end_epoch, steps=steps)
        )
        self.epoch_length = epoch_length
        self.shuffle = shuffle
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.drop_last = drop_last
        self.dataset = None
        self.epoch = 0
        self.skip = 0
        self.set_scores(scores)

    # -- DistributedSampler's attributes, recomputed for the current epoch
    @property
    def num_samples(self) -> int:
        length = self.global_length()
        if self.drop_last:
            return length // self.num_replicas
        return math.ceil(length / self.num_replicas)

    @property
    def total_size(self) -> int:
        return self.num_samples * self.num_replicas

    def global_length(self, epoch: int | None = None) -> int:
        n = len(self.scores)
        if self.epoch_length == "dataset":
            return n
        if self.epoch_length == "pool":
            return pool_size(n, self.pacing(self.epoch if epoch is None else epoch)) if n else 0
        return int(self.epoch_length)

    def set_scores(self, scores: Sequence[float] | np.ndarray | torch.Tensor) -> None:
        """New difficulties (same on every rank); they shape the pool from the next iteration on."""
        if isinstance(scores, torch.Tensor):
            scores = scores.detach().cpu().double().numpy()
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if not np.isfinite(scores).all():
            raise ValueError("curriculum scores must be finite")
        self.scores = scores

    def set_epoch(self, epoch: int) -> None:
        # Lightning calls this at every epoch start, also right after a mid-epoch restore: only a
        # new epoch forgets the position.
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self.skip = 0

    def global_indices(self, epoch: int | None = None) -> np.ndarray:
        epoch = self.epoch if epoch is None else epoch
        length = {"dataset": None, "pool": 0}.get(self.epoch_length, self.epoch_length)
        return epoch_indices(self.scores, epoch, self.seed, self.pacing, length, self.shuffle)

    def rank_indices(self, epoch: int | None = None) -> np.ndarray:
        return shard_indices(self.global_indices(epoch), self.num_replicas, self.rank, self.drop_last)

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices()[self.skip :].tolist())

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "skip": self.skip,
            "seed": self.seed,
            "scores": torch.from_numpy(self.scores.copy()),
            "pacing": asdict(self.pacing),
            "epoch_length": self.epoch_length,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "num_replicas": self.num_replicas,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the curriculum; ``num_replicas``/``rank`` stay this process's own.

        A position saved under another world size cannot be continued (the shards differ), so
        the epoch then restarts from its beginning.
        """
        self.seed = int(state["seed"])
        self.pacing = Pacing(**state["pacing"])
        self.epoch_length = state["epoch_length"]
        self.shuffle = bool(state["shuffle"])
        self.drop_last = bool(state["drop_last"])
        self.set_scores(state["scores"])
        self.epoch = int(state["epoch"])
        self.skip = int(state["skip"])
        saved_world = int(state.get("num_replicas", self.num_replicas))
        if saved_world != self.num_replicas and self.skip:
            warnings.warn(
                f"curriculum position saved with {saved_world} processes, resuming with {self.num_replicas}: "
                f"epoch {self.epoch} restarts from its first sample",
                stacklevel=2,
            )
            self.skip = 0


# ---------------------------------------------------------------- the callback


def _all_gather_pairs(index: torch.Tensor, value: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(index, value)`` pairs from every rank, in rank order: the same arrays on every rank."""
    pairs = torch.stack([index.to(torch.float64), value.detach().to(torch.float64)], dim=1)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        count = torch.tensor([len(pairs)], dtype=torch.int64, device=pairs.device)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count)
        counts_list = [int(c.item()) for c in counts]
        padded = pairs.new_full((max(counts_list), 2), -1.0)
        padded[: len(pairs)] = pairs
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded)
        pairs = torch.cat([g[:c] for g, c in zip(gathered, counts_list)])
    pairs = pairs.cpu().numpy()
    return pairs[:, 0].astype(np.int64), pairs[:, 1]


def _train_records(datamodule: Any) -> Sequence[Any]:
    """The training records, read from the annotations only (no image is decoded)."""
    datasets = getattr(datamodule, "datasets", None)
    owners = [datasets.get("train")] if isinstance(datasets, dict) else []
    owners += [getattr(datamodule, "train_dataset", None), datamodule]
    for owner in owners:
        records = getattr(owner, "records", None)
        if records is not None:
            return records
    raise TypeError("CurriculumCallback needs the datamodule's training records (DetectionDataModule)")


def _install_sampler(datamodule: Any, sampler: CurriculumSampler) -> None:
    if callable(getattr(datamodule, "set_train_sampler", None)):
        datamodule.set_train_sampler(sampler)
    elif hasattr(datamodule, "train_sampler"):
        datamodule.train_sampler = sampler
    else:
        raise TypeError("CurriculumCallback needs a DataModule that accepts a `train_sampler`")


def _find_wrapping(sampler: Any, target: CurriculumSampler) -> bool:
    """Whether ``target`` sits inside a Lightning ``DistributedSamplerWrapper`` (double sharding)."""
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    seen = 0
    while sampler is not None and seen < 8:
        if isinstance(sampler, DistributedSamplerWrapper):
            return True
        if sampler is target:
            return False
        sampler = getattr(sampler, "inner", None) or getattr(
            getattr(sampler, "dataset", None), "_sampler", None
        )
        seen += 1
    return False


class CurriculumCallback(Callback):
    """Feeds a :class:`CurriculumSampler` to the DataModule and keeps it on schedule.

    At ``setup`` it scores the training records (``score``: ``objects``, ``small``, ``area``,
    or ``loss``, whose first epoch uses ``prior``), builds the sampler for this rank and hands it
    to the DataModule (``train_sampler``). Lightning then leaves it unwrapped (it is a
    ``DistributedSampler``; ``on_train_start`` fails loudly if something wrapped it anyway).
    With ``score="loss"`` each step's ``outputs["image_losses"]`` are all-gathered with their dataset indices (``meta[i]["index"]``), so every rank holds the same
    losses; after the epoch's last batch they become the next epoch's scores.

    The state (sampler epoch, position within the epoch, scores, loss buffers) is saved in
    checkpoints; a resumed run, even from the middle of an epoch, samples what the uninterrupted
    run would have.
    """

    def __init__(
        self,
        score: str = "objects",
        prior: str = "objects",
        pacing: str = "linear",
        start_fraction: float = 0.25,
        end_epoch: int = 10,
        steps: int = 4,
        epoch_length: str | int = "dataset",
        seed: int = 0,
        small_area: float = COCO_SMALL_AREA,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        if score not in (*BOX_SCORES, "loss"):
            raise ValueError(f"score must be one of {(*BOX_SCORES, 'loss')}, got {score!r}")
        if prior not in BOX_SCORES:
            raise ValueError(f"prior must be one of {BOX_SCORES}, got {prior!r}")
        self.score = score
        self.prior_kind = prior
        self.small_area = small_area
        self.sampler_kwargs = dict(
            pacing=Pacing(kind=pacing, start_fraction=start_fraction, end_epoch=end_epoch, steps=steps),
            epoch_length=epoch_length,
            seed=seed,
            shuffle=shuffle,
            drop_last=drop_last,
        )
        self.sampler: CurriculumSampler | None = None
        self.prior: np.ndarray | None = None
        self.last_loss: np.ndarray | None = None  # per image, NaN until seen
        self.loss_sum: np.ndarray | None = None  # this epoch
        self.loss_count: np.ndarray | None = None
        self.samples_seen = 0  # this rank, this epoch
        self._pending: dict[str, Any] | None = None

    # -- setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.sampler is not None:
            return
        datamodule = trainer.datamodule
        if datamodule is None:
            raise TypeError("CurriculumCallback needs a DataModule that accepts a `train_sampler`")
        if self.sampler_kwargs["epoch_length"] == "pool" and trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError(
                "epoch_length='pool' changes the epoch length: set Trainer(reload_dataloaders_every_n_epochs=1)"
            )
        records = _train_records(datamodule)
        boxes = [r.train_targets()[0] for r in records]
        sizes = [(r.height, r.width) for r in records]
        kind = self.prior_kind if self.score == "loss" else self.score
        self.prior = box_scores(kind, boxes, sizes, self.small_area)
        n = len(self.prior)
        self.last_loss = np.full(n, np.nan)
        self.loss_sum, self.loss_count = np.zeros(n), np.zeros(n, dtype=np.int64)
        self.sampler = CurriculumSampler(
            self.prior, num_replicas=trainer.world_size, rank=trainer.global_rank, **self.sampler_kwargs
        )
        _install_sampler(datamodule, self.sampler)
        if self._pending is not None:
            self._restore(self._pending)
            self._pending = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loader = trainer.train_dataloader
        if self.sampler is not None and _find_wrapping(getattr(loader, "sampler", None), self.sampler):
            raise RuntimeError(
                "Lightning wrapped the CurriculumSampler in a DistributedSamplerWrapper, which would shard it twice: "
                "the DataModule must hand it to the DataLoader as a DistributedSampler (DetectionDataModule does)"
            )

    # -- epoch bookkeeping
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.sampler is not None and self.sampler.epoch != trainer.current_epoch:
            self.sampler.set_epoch(trainer.current_epoch)
            self._reset_epoch()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.sampler is None:
            return
        meta = batch["meta"]
        self.samples_seen += len(meta)
        if self.score == "loss":
            losses = outputs.get("image_losses") if isinstance(outputs, dict) else None
            if losses is None:
                raise KeyError("score='loss' needs training_step to return outputs['image_losses'] [B]")
            index = torch.tensor([int(m["index"]) for m in meta], dtype=torch.int64, device=losses.device)
            idx, val = _all_gather_pairs(index, losses.reshape(-1))
            ok = np.isfinite(val)
            np.add.at(self.loss_sum, idx[ok], val[ok])
            np.add.at(self.loss_count, idx[ok], 1)
        if batch_idx + 1 >= trainer.num_training_batches:
            # Before validation and its checkpoint, so a checkpoint taken there already holds the
            # next epoch's curriculum.
            self._finish_epoch(trainer.current_epoch)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.sampler is not None and self.sampler.epoch == trainer.current_epoch:
            self._finish_epoch(trainer.current_epoch)  # the epoch ended early (max_steps, should_stop)

    def _finish_epoch(self, epoch: int) -> None:
        assert self.sampler is not None
        if self.score == "loss":
            seen = self.loss_count > 0
            self.last_loss[seen] = self.loss_sum[seen] / self.loss_count[seen]
            self.sampler.set_scores(loss_scores(self.last_loss, self.prior))
        self.sampler.set_epoch(epoch + 1)
        self._reset_epoch()

    def _reset_epoch(self) -> None:
        self.samples_seen = 0
        if self.loss_sum is not None:
            self.loss_sum[:] = 0.0
            self.loss_count[:] = 0

    # -- checkpointing
    def state_dict(self) -> dict[str, Any]:
        if self.sampler is None:
            return dict(self._pending or {})
        sampler_state = self.sampler.state_dict()
        sampler_state["skip"] = self.samples_seen
        return {
            "sampler": sampler_state,
            "score": self.score,
            "prior": torch.from_numpy(self.prior.copy()),
            "last_loss": torch.from_numpy(self.last_loss.copy()),
            "loss_sum": torch.from_numpy(self.loss_sum.copy()),
            "loss_count": torch.from_numpy(self.loss_count.copy()),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.sampler is None:
            self._pending = state_dict  # restored at setup
        else:
            self._restore(state_dict)

    def _restore(self, state: dict[str, Any]) -> None:
        assert self.sampler is not None
        if len(state["prior"]) != len(self.prior):
            raise ValueError(
                f"checkpoint curriculum covers {len(state['prior'])} images, this dataset has {len(self.prior)}"
            )
        self.score = state["score"]
        self.prior = state["prior"].double().numpy().copy()
        self.last_loss = state["last_loss"].double().numpy().copy()
        self.loss_sum = state["loss_sum"].double().numpy().copy()
        self.loss_count = state["loss_count"].long().numpy().copy()
        self.sampler.load_state_dict(state["sampler"])
        self.samples_seen = self.sampler.skip
