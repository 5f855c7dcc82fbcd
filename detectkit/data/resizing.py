"""Progressive resizing (EfficientNetV2-style) and per-batch multi-scale training.

Under DDP every rank must feed the same image size at the same step, or the ranks' step times
(and, for some necks, their gradients' shapes) diverge. So the size is a *pure function* of
``(seed, epoch, step)``: the epoch schedule gives a base size and the multi-scale jitter is drawn
from a generator seeded by a hash of those three integers. No global RNG, no communication.

The resize itself runs on the already-transferred float batch (``on_train_batch_start``), so the
DataLoader keeps producing one fixed letterbox size and only the batch tensor and its boxes change.
``meta["scale"]``/``meta["pad"]`` are updated so ``input = original * scale + pad`` still holds.
"""

from __future__ import annotations

import hashlib
import math
import random
import struct
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = [
    "ProgressiveResizing",
    "SizeSchedule",
    "derive_seed",
    "epoch_image_size",
    "jitter_sizes",
    "resize_batch",
    "schedule_progress",
    "step_image_size",
]

_MODES = ("linear", "step", "constant")


def derive_seed(*values: int) -> int:
    """A 63-bit seed from integers, identical in every process (unlike ``hash()`` of str/bytes)."""
    packed = struct.pack(f"<{len(values)}q", *(int(v) for v in values))
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little") >> 1


def _round_to(value: float, stride: int) -> int:
    # Half up, not Python's banker's rounding: 400 -> 416 with stride 32, as one would expect.
    return max(stride, math.floor(value / stride + 0.5) * stride)


@dataclass(frozen=True)
class SizeSchedule:
    """Which base size each epoch trains at, plus the multi-scale jitter around it.

    ``mode``:
      * ``"linear"``: ``start_size`` up to ``start_epoch``, then a linear ramp reaching
        ``end_size`` at ``end_epoch`` (rounded to ``stride``), ``end_size`` afterwards.
      * ``"step"``: ``milestones`` ``{epoch: size}``; the size of the last milestone reached
        (``start_size`` before the first one).
      * ``"constant"``: always ``end_size``.

    ``jitter`` ``r``: each step picks uniformly among the multiples of ``stride`` in
    ``[size*(1-r), size*(1+r)]`` (YOLO multi-scale training uses ``r = 0.5``).
    """

    start_size: int = 320
    end_size: int = 640
    start_epoch: int = 0
    end_epoch: int = 0
    mode: str = "linear"
    milestones: Mapping[int, int] = field(default_factory=dict)
    jitter: float = 0.0
    stride: int = 32
    min_size: int = 32

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {self.mode!r}")
        if self.mode == "linear" and self.end_epoch < self.start_epoch:
            raise ValueError(f"end_epoch ({self.end_epoch}) must be >= start_epoch ({self.start_epoch})")
        if self.mode == "step" and not self.milestones:
            raise ValueError("mode='step' needs milestones, e.g. {0: 320, 10: 480, 20: 640}")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")
        sizes = [self.start_size, self.end_size, self.min_size, *self.milestones.values()]
        for size in sizes:
            if size <= 0 or size % self.stride:
                raise ValueError(f"sizes must be positive multiples of stride={self.stride}, got {size}")
        # Milestones from YAML arrive with string keys; normalise so lookups are numeric.
        object.__setattr__(self, "milestones", {int(k): int(v) for k, v in self.milestones.items()})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def schedule_progress(epoch: int, schedule: SizeSchedule) -> float:
    """Where ``epoch`` sits on the schedule, 0 at ``start_size`` and 1 at ``end_size``."""
    size = epoch_image_size(epoch, schedule)
    lo, hi = schedule.start_size, schedule.end_size
    if hi == lo:
        return 1.0
    return min(1.0, max(0.0, (size - lo) / (hi - lo)))


def epoch_image_size(epoch: int, schedule: SizeSchedule) -> int:
    """The base (un-jittered) size for ``epoch``, a multiple of ``schedule.stride``."""
    if schedule.mode == "constant":
        return schedule.end_size
    if schedule.mode == "step":
        size = schedule.start_size
        for milestone in sorted(schedule.milestones):
            if epoch >= milestone:
                size = schedule.milestones[milestone]
        return size
    a, b = schedule.start_epoch, schedule.end_epoch
    if epoch <= a:
        return schedule.start_size
    if epoch >= b:
        return schedule.end_size
    t = (epoch - a) / (b - a)
    return _round_to(schedule.start_size + t * (schedule.end_size - schedule.start_size), schedule.stride)


def jitter_sizes(size: int, jitter: float, stride: int = 32, min_size: int = 32) -> list[int]:
    """The candidate sizes for multi-scale: multiples of ``stride`` in ``[size(1-r), size(1+r)]``."""
    if jitter == 0:
        return [size]
    lo = max(min_size, math.ceil(size * (1 - jitter) / stride) * stride)
    hi = math.floor(size * (1 + jitter) / stride) * stride
    return list(range(lo, hi + 1, stride)) if hi >= lo else [size]


def step_image_size(seed: int, epoch: int, step: int, schedule: SizeSchedule) -> int:
    """The image size for a training step; the same in every process that shares ``seed``."""
    base = epoch_image_size(epoch, schedule)
    candidates = jitter_sizes(base, schedule.jitter, schedule.stride, schedule.min_size)
    if len(candidates) == 1:
        return candidates[0]
    return random.Random(derive_seed(seed, epoch, step)).choice(candidates)


def resize_batch(
    images: torch.Tensor,
    targets: torch.Tensor,
    meta: Sequence[Mapping[str, Any]] | None,
    size: int,
    stride: int = 32,
    pad_value: float = 114 / 255,
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]] | None]:
    """Rescale a float batch so its longer side is ``size``, keeping the letterbox mapping exact.

    One uniform factor ``s = size / max(H, W)`` scales the images, the xyxy ``targets[:, 2:6]``
    and ``meta`` (``scale *= s``, ``pad *= s``). When the shorter side does not land on a
    multiple of ``stride``, it is padded at the bottom/right, which leaves ``pad`` (left, top)
    valid. Returns new objects; the inputs are not modified.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError("resize_batch expects float images (after the /255 conversion)")
    if size <= 0 or size % stride:
        raise ValueError(f"size must be a positive multiple of {stride}, got {size}")
    h, w = images.shape[-2:]
    s = size / max(h, w)
    if s == 1.0:
        return images, targets, None if meta is None else [dict(m) for m in meta]
    new_h, new_w = max(1, round(h * s)), max(1, round(w * s))
    out = F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=s < 1)
    pad_h, pad_w = (-new_h) % stride, (-new_w) % stride
    if pad_h or pad_w:
        out = F.pad(out, (0, pad_w, 0, pad_h), value=pad_value)

    new_targets = targets.clone()
    if new_targets.numel():
        new_targets[:, 2:6] = new_targets[:, 2:6] * s

    new_meta = None
    if meta is not None:
        new_meta = []
        for m in meta:
            m = dict(m)
            if "scale" in m:
                m["scale"] = float(m["scale"]) * s
            if "pad" in m:
                m["pad"] = tuple(float(p) * s for p in m["pad"])
            if "input_size" in m:
                m["input_size"] = (new_h + pad_h, new_w + pad_w)
            new_meta.append(m)
    return out, new_targets, new_meta


class ProgressiveResizing(Callback):
    """Trains at a size that grows with the epochs, with optional per-step multi-scale jitter.

    Resizes ``batch["images"]``/``batch["targets"]``/``batch["meta"]`` in place at
    ``on_train_batch_start`` (after ``on_after_batch_transfer``), with the size from
    :func:`step_image_size` for ``(seed, current_epoch, batch_idx)``, so every DDP rank agrees.

    ``magnitude=(low, high)``: EfficientNetV2's pairing of weak augmentation with small images.
    At each epoch start the callback calls the DataModule's ``set_magnitude`` with the value
    interpolated on the schedule's progress (the dataset keeps it in shared memory, so
    persistent workers see it).

    ``resize_in_loader``: also set the epoch's base size on the training dataset
    (``set_image_size``), so workers decode and augment at the small size instead of the full
    one; the on-device resize then only applies the per-step jitter (or nothing). Batches that
    were prefetched at another size are still resized exactly, so this is only a speed-up.
    """

    def __init__(
        self,
        start_size: int = 320,
        end_size: int = 640,
        start_epoch: int = 0,
        end_epoch: int = 0,
        mode: str = "linear",
        milestones: dict[int, int] | None = None,
        jitter: float = 0.0,
        stride: int = 32,
        min_size: int = 32,
        seed: int = 0,
        magnitude: tuple[float, float] | None = None,
        resize_in_loader: bool = True,
        log_size: bool = True,
    ) -> None:
        self.schedule = SizeSchedule(
            start_size=start_size,
            end_size=end_size,
            start_epoch=start_epoch,
            end_epoch=end_epoch,
            mode=mode,
            milestones=dict(milestones or {}),
            jitter=jitter,
            stride=stride,
            min_size=min_size,
        )
        self.seed = int(seed)
        self.magnitude = None if magnitude is None else (float(magnitude[0]), float(magnitude[1]))
        self.resize_in_loader = resize_in_loader
        self.log_size = log_size
        self.last_epoch = -1
        self.last_step = -1
        self.last_size = 0
        self.next_epoch = 0  # the epoch a run resumed from this state trains first
        self._restored_epoch: int | None = None

    def size_for(self, epoch: int, step: int) -> int:
        return step_image_size(self.seed, epoch, step, self.schedule)

    def magnitude_for(self, epoch: int) -> float | None:
        if self.magnitude is None:
            return None
        low, high = self.magnitude
        return low + (high - low) * schedule_progress(epoch, self.schedule)

    def _apply_epoch(self, trainer: Trainer, epoch: int) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None:
            return
        value = self.magnitude_for(epoch)
        if value is not None:
            if callable(getattr(datamodule, "set_magnitude", None)):
                datamodule.set_magnitude(value)
            else:
                datamodule.magnitude = value
        datasets = getattr(datamodule, "datasets", None)
        train = datasets.get("train") if isinstance(datasets, dict) else None
        if self.resize_in_loader and callable(getattr(train, "set_image_size", None)):
            train.set_image_size(epoch_image_size(epoch, self.schedule))

    # The loader's first iterator (and its workers' prefetch) is created in FitLoop.setup_data,
    # before on_train_start/on_train_epoch_start and, on resume, after the checkpoint is restored
    # but with no hook in between. So on_fit_start already applies the epoch the run will train
    # next: 0, or the one recorded in the restored state. on_train_start re-applies it from the
    # restored loop counter, for loaders that read lazily.
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = self._restored_epoch if self._restored_epoch is not None else trainer.current_epoch
        self._apply_epoch(trainer, epoch)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restored_epoch = None
        self._apply_epoch(trainer, trainer.current_epoch)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply_epoch(trainer, trainer.current_epoch)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        last = batch_idx + 1 >= getattr(trainer, "num_training_batches", float("inf"))
        self.next_epoch = trainer.current_epoch + 1 if last else trainer.current_epoch

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.next_epoch = trainer.current_epoch + 1

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(batch, dict):
            raise TypeError(
                f"ProgressiveResizing needs the dict batch of DetectionDataModule, got {type(batch)}"
            )
        epoch = trainer.current_epoch
        size = self.size_for(epoch, batch_idx)
        images, targets, meta = resize_batch(
            batch["images"], batch["targets"], batch.get("meta"), size, stride=self.schedule.stride
        )
        batch["images"], batch["targets"] = images, targets
        if meta is not None:
            batch["meta"] = meta
        self.last_epoch, self.last_step, self.last_size = epoch, batch_idx, size
        if self.log_size:
            pl_module.log(
                "train/image_size", float(size), on_step=True, on_epoch=False, batch_size=len(images)
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "schedule": self.schedule.to_dict(),
            "magnitude": self.magnitude,
            "last_epoch": self.last_epoch,
            "last_step": self.last_step,
            "last_size": self.last_size,
            "next_epoch": self.next_epoch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The checkpoint's schedule wins: a resumed run must continue the sizes it started with.
        self.seed = int(state_dict["seed"])
        self.schedule = SizeSchedule(**state_dict["schedule"])
        magnitude = state_dict.get("magnitude")
        self.magnitude = None if magnitude is None else tuple(magnitude)
        self.last_epoch = int(state_dict["last_epoch"])
        self.last_step = int(state_dict["last_step"])
        self.last_size = int(state_dict["last_size"])
        self.next_epoch = int(state_dict.get("next_epoch", max(self.last_epoch, 0)))
        self._restored_epoch = self.next_epoch
