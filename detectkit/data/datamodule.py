"""DetectionDataModule: any supported dataset (or the embedded synthetic one) -> batches.

``num_classes`` / ``class_names`` are known right after ``__init__`` (annotation files only,
no images), so LightningCLI can link ``data.num_classes -> model.num_classes``. The train
loader's sampler is wrapped so that Lightning's per-epoch ``set_epoch`` also reaches the
dataset (shared memory, works with persistent workers): that drives per-epoch augmentation
seeds and ``close_mosaic``. Another component may supply the train sampler
(``train_sampler``: a Sampler or ``callable(dataset) -> Sampler``; run the Trainer with
``use_distributed_sampler=False`` then) and a ``batch_transform`` applied on device after the
uint8 -> float /255 conversion.
"""

from __future__ import annotations

import itertools
import logging
import random
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from detectkit.configs import as_group, group_dict, register_moves, regroup
from detectkit.data.collate import collate
from detectkit.data.dataset import DetectionDataset
from detectkit.data.formats.detect import DatasetSource, canonical_split, open_dataset
from detectkit.data.formats.roboflow import fetch_roboflow
from detectkit.data.records import DatasetError, DetectionSplit, log_problems
from detectkit.data.synthetic import SyntheticConfig, synthetic_class_names, synthetic_dataset
from detectkit.data.transforms import AugmentConfig
from detectkit.utils.malloc import keep_freed_memory

__all__ = ["DetectionDataModule", "LoaderConfig", "RoboflowDataModule", "EpochRelaySampler", "SeededRandomSampler"]

log = logging.getLogger("detectkit.data")


@dataclass
class LoaderConfig:
    """How batches are loaded.

    Args:
        batch_size: training images per step (per process under DDP).
        val_batch_size: validation/test batch (default ``batch_size``).
        num_workers: loader processes (0: load in the training process); on a 2-core laptop 1-2.
        pin_memory: page-locked batches for faster host-to-GPU copies (GPU only).
        drop_last: drop the last incomplete train batch (default: when the split holds more than
            one batch).
        cache: ``"ram"`` decodes the train images once, shrunk to ``image_size`` on the longest
            side, and keeps them in memory (opt-in like ultralytics' ``cache``; see
            :class:`DetectionDataset`). ``None``: decode every time.
    """

    batch_size: int = 16
    val_batch_size: int | None = None
    num_workers: int = 2
    pin_memory: bool = False
    drop_last: bool | None = None
    cache: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1 or (self.val_batch_size is not None and self.val_batch_size < 1):
            raise ValueError(f"loader.batch_size and loader.val_batch_size must be >= 1, got {self.batch_size}, "
                             f"{self.val_batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"loader.num_workers must be >= 0, got {self.num_workers}")
        if self.cache not in (None, "ram"):
            raise ValueError(f"loader.cache must be 'ram' or null, got {self.cache!r}")

    @property
    def eval_batch_size(self) -> int:
        return self.val_batch_size or self.batch_size


#: where the flat arguments of before the grouping went (old recipes and Python calls)
MOVED_ARGS = register_moves("data", {
    # extra / extra_mode came after the grouping: never flat arguments
    **{f.name: f"augment.{f.name}" for f in fields(AugmentConfig) if f.name not in ("extra", "extra_mode")},
    **{f.name: f"loader.{f.name}" for f in fields(LoaderConfig)},
})


class SeededRandomSampler(Sampler[int]):
    """A shuffle that is a pure function of (seed, epoch)."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(np.random.default_rng([self.seed, self.epoch, 7]).permutation(self.n).tolist())

    def __len__(self) -> int:
        return self.n


class EpochRelaySampler(Sampler[int]):
    """Wraps a sampler; ``set_epoch`` (called by Lightning before each epoch's iterator is
    created) goes to the inner sampler AND to ``on_epoch``."""

    def __init__(self, inner: Sampler, on_epoch: Callable[[int], None], skip: int = 0, skip_epoch: int = -1):
        self.inner, self.on_epoch = inner, on_epoch
        #: samples of ``skip_epoch``'s iteration to pass over (mid-epoch resume); ``len`` stays
        #: full, matching the batch counter Lightning restores
        self.skip, self.skip_epoch = int(skip), int(skip_epoch)

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.skip_epoch:
            self.skip = 0  # Lightning went on to another epoch than the interrupted one
        if callable(getattr(self.inner, "set_epoch", None)):
            self.inner.set_epoch(epoch)
        self.on_epoch(int(epoch))

    def __iter__(self) -> Iterator[int]:
        it = iter(self.inner)
        if self.skip:
            it, self.skip = itertools.islice(it, self.skip, None), 0
        return it

    def __len__(self) -> int:
        return len(self.inner)


class DistributedEpochRelaySampler(EpochRelaySampler, DistributedSampler):
    """The relay around a sampler that shards itself (``CurriculumSampler``): being a
    ``DistributedSampler``, Lightning's ``use_distributed_sampler`` leaves it unwrapped."""


def _worker_init(worker_id: int) -> None:
    # library-level randomness (anything outside our per-sample generators) differs per worker
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    # workers are the parallelism: threads inside each one only oversubscribe the CPUs.
    # (OpenCV is single-threaded already, set in detectkit.data before any fork: calling
    # cv2.setNumThreads here, in a forked child, is what can deadlock.)
    torch.set_num_threads(1)
    keep_freed_memory()  # image-sized buffers stay mapped between samples (detectkit.utils.malloc)
    # Ctrl-C and a scheduler's SIGTERM reach the whole process group: a worker that died of it would
    # fail the main process's next fetch ("DataLoader worker is killed by signal") before it could
    # finish its step and save. The main process decides when to stop and shuts its workers down
    # (they also exit on their own when it is gone: torch's worker watchdog).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class DetectionDataModule(L.LightningDataModule):
    """Train/val/test loaders for any supported dataset format.

    Args:
        data_dir: a dataset root holding splits (Roboflow export, data.yaml, COCO, VOC).
        train, val, test: per-split paths (any format); override ``data_dir``'s splits.
        image_size: square input side (multiple of 32).
        augment: train augmentation (:class:`AugmentConfig`, recipe block ``data.augment``;
            defaults follow super-gradients' YOLO-NAS COCO recipe), including ``close_mosaic``:
            mosaic and mixup off for the last N epochs (needs the Trainer's ``max_epochs``).
        loader: batch sizes, workers and image caching (:class:`LoaderConfig`, ``data.loader``).
        val_center: centre the validation letterbox (False pads bottom/right only).
        skip_bad_images: skip (count, log) missing/corrupt images instead of failing setup.
        classes: class list of a VOC or CreateML set, whose files carry none (default: the set's
            ``labelmap.txt``/``classes.txt``, else the names found, reported in the setup log).
        synthetic: options of the generated dataset used when no path is given.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        image_size: int = 640,
        augment: AugmentConfig | None = None,
        loader: LoaderConfig | None = None,
        val_center: bool = True,
        skip_bad_images: bool = False,
        seed: int = 0,
        synthetic: SyntheticConfig | None = None,
        cache_dir: str | None = None,
        classes: list[str] | None = None,
        **legacy: Any,
    ):
        super().__init__()
        if image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32, got {image_size}")
        groups = regroup(type(self).__name__, legacy, MOVED_ARGS, {
            "augment": as_group(augment, AugmentConfig, "data.augment"),
            "loader": as_group(loader, LoaderConfig, "data.loader"),
        })
        self.augment: AugmentConfig = groups["augment"]
        self.loader: LoaderConfig = groups["loader"]
        # hyper-parameters as plain data (checkpoints stay readable by the safe loader)
        augment, loader = group_dict(self.augment), group_dict(self.loader)
        self.save_hyperparameters(ignore=["synthetic"])
        self.image_size = image_size
        #: the run length ``close_mosaic`` counts back from when no Trainer drives this module
        self.max_epochs: int | None = None
        self.val_center = val_center
        self.skip_bad_images = skip_bad_images
        self.seed = seed
        self.cache_dir = cache_dir
        self.synthetic = synthetic
        self.is_synthetic = not (data_dir or train or val or test)
        if self.is_synthetic:
            self.synthetic = synthetic or SyntheticConfig()
        self.data_dir = data_dir
        self.paths = {"train": train, "val": val, "test": test}
        self.classes = list(classes) if classes is not None else None
        self._sources: dict[str, DatasetSource] = {}
        self._reported: set[str] = set()
        # set by other components (curriculum sampler, progressive resizing)
        self.train_sampler: Sampler | Callable[[DetectionDataset], Sampler] | None = None
        self.batch_transform: Callable[[dict], dict] | None = None
        self.datasets: dict[str, DetectionDataset] = {}
        self._epoch = 0
        self._state: dict[str, Any] = {}
        self._class_names: list[str] | None = None
        self._resume_position: tuple[int, int] | None = None  # (epoch, global samples consumed)

    # ---- where the data is -----------------------------------------------------------------
    def _root(self) -> str | None:
        if self.is_synthetic:
            return None
        return self.data_dir

    def _open(self, path: str) -> DatasetSource:
        if path not in self._sources:
            self._sources[path] = open_dataset(path, self.classes)
        return self._sources[path]

    def _source_for(self, role: str) -> tuple[DatasetSource, str | None] | None:
        path = self.paths.get(role)
        if path:
            src = self._open(path)
            return src, (None if len(src.splits) == 1 else role)
        root = self._root()
        if root is None:
            return None
        src = self._open(root)
        if any(canonical_split(s) == role for s in src.splits):
            return src, role
        if role == "train" and len(src.splits) == 1:
            return src, None
        return None

    @property
    def class_names(self) -> list[str]:
        """From annotation files only (no images decoded, nothing generated)."""
        if self._class_names is None:
            if self.is_synthetic:
                self._class_names = synthetic_class_names(self.synthetic.num_classes)
            else:
                for role in ("train", "val", "test"):
                    found = self._source_for(role)
                    if found is not None:
                        self._class_names = found[0].class_names
                        break
                else:
                    raise DatasetError(f"no dataset found in {self.data_dir or self.paths}")
        return list(self._class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def prepare_data(self) -> None:
        if self.is_synthetic:
            self.data_dir_resolved = synthetic_dataset(self.synthetic, self.cache_dir)

    def _load_split(self, role: str) -> DetectionSplit | None:
        if self.is_synthetic:
            root = synthetic_dataset(self.synthetic, self.cache_dir)  # cached: cheap if prepared
            src = open_dataset(root)
            return src.load(role) if any(canonical_split(s) == role for s in src.splits) else None
        found = self._source_for(role)
        if found is None:
            return None
        if str(found[0].root) not in self._reported:  # dataset-level problems, once per dataset
            self._reported.add(str(found[0].root))
            log_problems(found[0].problems, str(found[0].root))
        split = found[0].load(found[1])
        if split.fatal_problems():
            raise DatasetError("; ".join(str(p) for p in split.fatal_problems()[:5]))
        if split.class_names != self.class_names:
            raise DatasetError(f"{split.source}: classes {split.class_names} differ from {self.class_names}")
        return split

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("val",)}
        roles = wanted.get(stage, ("train", "val", "test")) if stage else ("train", "val", "test")
        for role in roles:
            if role in self.datasets:
                continue
            split = self._load_split(role)
            if split is None:
                if (
                    role == "train"
                    or (role == "val" and stage == "validate")
                    or (role == "test" and stage == "test")
                ):
                    raise DatasetError(f"no '{role}' split found in {self.data_dir or self.paths.get(role)}")
                continue
            ds = DetectionDataset(
                split,
                self.image_size,
                train=role == "train",
                augment=self.augment,
                seed=self.seed,
                center=self.val_center,
                skip_bad_images=self.skip_bad_images,
                cache=self.loader.cache if role == "train" else None,
            )
            self.datasets[role] = ds
            log.info("%s: %s", role, ds)
        if "train" in self.datasets:
            self._apply_epoch_state(self._epoch)
            for key, value in self._state.items():
                if key == "magnitude":
                    self.datasets["train"].set_magnitude(value)

    # ---- epoch-dependent state ------------------------------------------------------------
    def _total_epochs(self) -> int | None:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and getattr(trainer, "max_epochs", None) not in (None, -1):
            return int(trainer.max_epochs)
        return self.max_epochs

    def mix_enabled_at(self, epoch: int) -> bool:
        """Mosaic/mixup are on unless within the last ``augment.close_mosaic`` epochs."""
        close = self.augment.close_mosaic
        if close <= 0:
            return True
        total = self._total_epochs()
        if total is None:
            log.warning("augment.close_mosaic=%d needs the Trainer's max_epochs; mosaic stays on", close)
            return True
        return epoch < total - close

    def _apply_epoch_state(self, epoch: int) -> None:
        ds = self.datasets.get("train")
        if ds is None:
            return
        ds.set_epoch(epoch)
        on = self.mix_enabled_at(epoch)
        if on != ds.mix_enabled:
            log.info("epoch %d: mosaic/mixup %s", epoch, "on" if on else "off (close_mosaic)")
        ds.set_mix_enabled(on)

    def set_epoch(self, epoch: int) -> None:
        """Called through the train sampler by Lightning before each epoch (or by hand)."""
        self._epoch = int(epoch)
        self._apply_epoch_state(self._epoch)

    def set_magnitude(self, magnitude: float) -> None:
        """Augmentation strength 0..1; reaches persistent workers (shared memory)."""
        self._state["magnitude"] = float(magnitude)
        if "train" in self.datasets:
            self.datasets["train"].set_magnitude(magnitude)

    @property
    def magnitude(self) -> float:
        return float(self._state.get("magnitude", 1.0))

    @magnitude.setter
    def magnitude(self, value: float) -> None:
        self.set_magnitude(value)

    def set_train_sampler(self, sampler: Sampler | Callable[[DetectionDataset], Sampler] | None) -> None:
        """Use ``sampler`` for training (e.g. a curriculum); takes effect at the next ``train_dataloader()``."""
        self.train_sampler = sampler

    @property
    def train_dataset(self) -> DetectionDataset | None:
        return self.datasets.get("train")

    @property
    def train_records(self) -> list | None:
        ds = self.datasets.get("train")
        return ds.records if ds is not None else None

    def state_dict(self) -> dict[str, Any]:
        ds = self.datasets.get("train")
        return {
            "epoch": self._epoch,
            "magnitude": ds.magnitude if ds is not None else self._state.get("magnitude", 1.0),
            "class_names": self.class_names,
            "samples_seen": self._samples_seen(),
        }

    def _samples_seen(self) -> int:
        """Training samples (all ranks) consumed so far in the current epoch, from Lightning's
        batch counter; what a mid-epoch checkpoint needs to continue the default order."""
        trainer = getattr(self, "trainer", None)
        try:
            if trainer is None or trainer.state.fn != "fit":
                return 0
            done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        except AttributeError:
            return 0
        return done * self.loader.batch_size * self._world()[0]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("class_names") not in (None, self.class_names):
            raise DatasetError(
                f"checkpoint was trained on classes {state_dict['class_names']}, this dataset has {self.class_names}"
            )
        self._epoch = int(state_dict.get("epoch", 0))
        self._resume_position = (self._epoch, int(state_dict.get("samples_seen", 0)))
        if "magnitude" in state_dict:
            self._state["magnitude"] = float(state_dict["magnitude"])
        if "train" in self.datasets:
            self._apply_epoch_state(self._epoch)
            self.datasets["train"].set_magnitude(self._state.get("magnitude", 1.0))

    # ---- loaders ---------------------------------------------------------------------------
    def _loader(
        self, ds: DetectionDataset, batch_size: int, sampler: Sampler | None, drop_last: bool
    ) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.loader.num_workers,
            collate_fn=collate,
            pin_memory=self.loader.pin_memory,
            drop_last=drop_last,
            persistent_workers=self.loader.num_workers > 0,
            worker_init_fn=_worker_init if self.loader.num_workers > 0 else None,
        )

    def _dataset(self, role: str) -> DetectionDataset:
        if role not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[role])
        if role not in self.datasets:
            raise DatasetError(f"no '{role}' split available")
        return self.datasets[role]

    def train_dataloader(self) -> DataLoader:
        ds = self._dataset("train")
        inner = self.train_sampler
        if inner is None:
            inner = SeededRandomSampler(len(ds), self.seed)
        elif not isinstance(inner, Sampler) and callable(inner):
            inner = inner(ds)
        inner = self._shard(inner)
        batch = self.loader.batch_size
        drop_last = self.loader.drop_last if self.loader.drop_last is not None else len(inner) > batch
        relay = DistributedEpochRelaySampler if isinstance(inner, DistributedSampler) else EpochRelaySampler
        skip = 0
        if self.train_sampler is None and self._resume_position and self._resume_position[0] == self._epoch:
            # mid-epoch resume of the default order (a supplied sampler keeps its own position)
            skip = self._resume_position[1] // self._world()[0]
        return self._loader(ds, batch, relay(inner, self.set_epoch, skip, self._epoch), drop_last)

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (int(trainer.world_size), int(trainer.global_rank)) if trainer is not None else (1, 0)

    def _shard(self, sampler: Sampler) -> Sampler:
        """Under DDP, rank r takes positions r, r+W, ... of the one global order, so global batch k
        holds the same images as batch k of a single process with W times the batch size
        (Lightning's own wrapper would shuffle the order once more). Samplers that shard
        themselves (``DistributedSampler``) are left as they are."""
        world, rank = self._world()
        if world <= 1 or isinstance(sampler, DistributedSampler):
            return sampler
        from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

        return DistributedSamplerWrapper(sampler, num_replicas=world, rank=rank, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("val"), self.loader.eval_batch_size, None, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test"), self.loader.eval_batch_size, None, False)

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """uint8 -> float [0, 1] on the device, then the optional ``batch_transform`` (resize)."""
        if isinstance(batch, dict) and isinstance(batch.get("images"), torch.Tensor):
            if batch["images"].dtype == torch.uint8:
                batch["images"] = batch["images"].float().div_(255.0)
            if self.batch_transform is not None and self.trainer is not None and self.trainer.training:
                batch = self.batch_transform(batch)
        return batch

    @property
    def resolved_data_dir(self) -> Path | None:
        if self.is_synthetic:
            return synthetic_dataset(self.synthetic, self.cache_dir)
        return Path(self.data_dir) if self.data_dir else None


class RoboflowDataModule(DetectionDataModule):
    """A Roboflow project version: downloaded once (``roboflow`` package, needs the network and
    an API key), cached under ``cache_dir``, or read from ``local_path`` when offline.

    The other arguments are :class:`DetectionDataModule`'s.
    """

    def __init__(
        self,
        workspace: str,
        project: str,
        version: int,
        api_key: str | None = None,
        format: str = "coco",
        cache_dir: str | None = None,
        local_path: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.roboflow = {
            "workspace": workspace,
            "project": project,
            "version": version,
            "api_key": api_key,
            "format": format,
            "cache_dir": cache_dir,
            "local_path": local_path,
        }
        self.is_synthetic = False
        self.synthetic = None
        self._fetched: Path | None = None

    def _root(self) -> str | None:
        if self._fetched is None:
            self._fetched = fetch_roboflow(**self.roboflow)
            self.data_dir = str(self._fetched)
        return str(self._fetched)

    def prepare_data(self) -> None:
        self._root()
