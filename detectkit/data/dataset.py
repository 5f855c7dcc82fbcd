"""Records -> model-ready samples (uint8 CHW image, boxes in input pixels, labels, meta).

Train samples go through mosaic / affine / mixup / HSV / flip at ``image_size`` x
``image_size``; validation samples are letterboxed. Everything random comes from
``(seed, epoch, index)``, so the same seed gives the same batches whatever the number of
workers. ``epoch``, ``magnitude``, ``image_size`` and the mosaic/mixup switch live in shared
memory so persistent workers see changes made in the main process.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from detectkit.data.images import ImageReadError, check_images, read_image_reduced, reduced_size
from detectkit.data.mosaic import _resize_longest, mixup, mosaic4
from detectkit.data.records import DatasetError, DetectionSplit, ImageRecord, log_problems
from detectkit.data.transforms import AugmentConfig, letterbox_sample, random_affine, random_hsv
from detectkit.utils.malloc import keep_freed_memory

__all__ = ["DetectionDataset", "check_images"]

log = logging.getLogger("detectkit.data")

_EPOCH, _MAGNITUDE, _MIX_ON, _SIZE = range(4)


CACHE_MODES = (None, "ram")
MIN_BATCH_POOL = 8  # smaller batches draw mosaic/mixup partners from the whole split


class DetectionDataset(Dataset):
    """One split as a torch dataset; ``train=True`` enables augmentation.

    ``cache="ram"`` decodes every image once, at construction, shrunk so its longest side is
    ``image_size`` (the size mosaic and the letterbox resize it to anyway, with the same
    interpolation and rounding, so samples are pixel-identical to uncached ones at that size), and
    keeps the uint8 arrays in memory; forked loader workers share them copy-on-write. Like
    ultralytics' ``cache=ram``: it trades memory (width x height x 3 bytes per image at most
    ``image_size`` on the longest side, logged) for the JPEG decode, the largest per-image cost.
    When progressive resizing asks for a larger size than the cache holds, images are read from
    disk again (never upsampled from the cache).
    """

    def __init__(
        self,
        split: DetectionSplit,
        image_size: int = 640,
        train: bool = False,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        center: bool = True,
        skip_bad_images: bool = False,
        check: bool = True,
        cache: str | None = None,
    ):
        self.split = split
        self.class_names = list(split.class_names)
        self.train = train
        self.augment = augment or AugmentConfig()
        self.seed = int(seed)
        self.center = center
        self.skip_bad_images = skip_bad_images
        records = list(split.records)
        if check:
            bad = [p for p in check_images(split) if p.severity == "error"]
            if bad:
                listing = "; ".join(f"{p.file}: {p.message}" for p in bad[:5]) + (
                    f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
                )
                if not skip_bad_images:
                    raise DatasetError(
                        f"{len(bad)} unusable image(s) in {split.source} ({split.split}): {listing}. "
                        "Fix them or pass skip_bad_images=True to skip them."
                    )
                bad_paths = {p.file for p in bad}
                records = [r for r in records if str(r.path) not in bad_paths]
                log.warning(
                    "skipping %d unusable image(s) of %s (%s): %s",
                    len(bad),
                    split.source,
                    split.split,
                    listing,
                )
        if not records:
            raise DatasetError(f"{split.source} ({split.split}): no usable images")
        self.records: list[ImageRecord] = records
        self.skipped_at_setup = len(split.records) - len(records)
        self._shared = mp.RawArray("d", [0.0, 1.0, 1.0, float(image_size)])
        self._bad_count = mp.RawValue("i", 0)
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
        self.cache = cache
        self._cache_size = int(image_size)
        self._cached: list[tuple[np.ndarray, float] | None] = []
        if cache == "ram":
            self._fill_cache()
        # set by __getitems__ while one batch is built: (its indices, decoded images by index)
        self._batch: tuple[np.ndarray, dict] | None = None
        # the user albumentations pipeline (augment.extra), built on first use
        self._extra: object | None = None

    def _fill_cache(self) -> None:
        """Decode (threads: OpenCV and Pillow release the GIL) and shrink every image once."""
        size = self._cache_size

        def load(i: int) -> tuple[np.ndarray, float] | None:
            rec = self.records[i]
            try:
                img, k = read_image_reduced(rec.path, size)
            except ImageReadError:
                return None  # left to the per-sample path, which raises or counts and logs the skip
            if (img.shape[1], img.shape[0]) != reduced_size(rec.width, rec.height, k):
                return None  # same: the per-sample path names the size mismatch
            if max(img.shape[:2]) <= size:
                return img, 1.0 / k
            img, r = _resize_longest(img, size)
            return img, r / k

        with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
            self._cached = list(pool.map(load, range(len(self.records))))
        nbytes = sum(c[0].nbytes for c in self._cached if c is not None)
        log.info("cached %d images in RAM (%.0f MiB, longest side <= %d)", len(self._cached), nbytes / 2**20, size)

    # ---- state shared with (persistent) workers ------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self._shared[_EPOCH] = float(epoch)

    @property
    def epoch(self) -> int:
        return int(self._shared[_EPOCH])

    def set_magnitude(self, magnitude: float) -> None:
        """Augmentation strength 0..1 (affine and HSV ranges scale with it)."""
        self._shared[_MAGNITUDE] = float(np.clip(magnitude, 0.0, 1.0))

    @property
    def magnitude(self) -> float:
        return float(self._shared[_MAGNITUDE])

    def set_mix_enabled(self, enabled: bool) -> None:
        """Mosaic and mixup on/off (``close_mosaic`` turns them off for the last epochs)."""
        self._shared[_MIX_ON] = 1.0 if enabled else 0.0

    @property
    def mix_enabled(self) -> bool:
        return bool(self._shared[_MIX_ON])

    def set_image_size(self, size: int) -> None:
        if size % 32:
            raise ValueError(f"image size must be a multiple of 32, got {size}")
        self._shared[_SIZE] = float(size)

    @property
    def image_size(self) -> int:
        return int(self._shared[_SIZE])

    @property
    def bad_images_skipped(self) -> int:
        """Images skipped while loading (decode failures after setup), over all workers."""
        return int(self._bad_count.value)

    # ---- cheap statistics for curriculum / inspection -------------------------------------
    def box_stats(self) -> dict[str, np.ndarray | list]:
        """Per-image difficulty inputs from the annotations only: ``num_boxes`` [N],
        ``rel_areas`` (list of [n] box area / image area), ``mean_rel_area`` and
        ``min_rel_area`` [N] (1.0 for images without boxes)."""
        num, rel = [], []
        for r in self.records:
            b, _ = r.train_targets()
            area = max(r.width * r.height, 1)
            a = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / area).astype(np.float32)
            num.append(len(b))
            rel.append(a)
        return {
            "num_boxes": np.array(num, np.int64),
            "rel_areas": rel,
            "mean_rel_area": np.array([a.mean() if len(a) else 1.0 for a in rel], np.float32),
            "min_rel_area": np.array([a.min() if len(a) else 1.0 for a in rel], np.float32),
        }

    def __len__(self) -> int:
        return len(self.records)

    # ---- loading -------------------------------------------------------------------------
    def _read(self, index: int) -> tuple[int, np.ndarray, float]:
        """(index actually used, image, scale of the image relative to the file): from the RAM
        cache (scale <= 1) when it holds the image at the current size or larger, else the file."""
        if self._cached and self.image_size <= self._cache_size:
            hit = self._cached[index % len(self.records)]
            if hit is not None:
                return index % len(self.records), hit[0], hit[1]
        return self._read_file(index, self.image_size)

    def _read_file(self, index: int, longest: int | None = None) -> tuple[int, np.ndarray, float]:
        """(index actually used, image, its scale vs the file); a bad image is an error naming it,
        or with ``skip_bad_images`` a counted, logged substitution by the next good one. With
        ``longest`` (training), large JPEGs are decoded at reduced scale (``read_image_reduced``)."""
        n = len(self.records)
        for step in range(n):
            i = (index + step) % n
            rec = self.records[i]
            try:
                img, k = read_image_reduced(rec.path, longest)
                if (img.shape[1], img.shape[0]) != reduced_size(rec.width, rec.height, k):
                    w, h = img.shape[1] * k, img.shape[0] * k
                    raise ImageReadError(
                        rec.path, f"annotations say {rec.width}x{rec.height} but the image is {w}x{h}"
                    )
                return i, img, 1.0 / k
            except ImageReadError as e:
                if not self.skip_bad_images:
                    raise DatasetError(f"{e} (pass skip_bad_images=True to skip such images)") from e
                with self._bad_count.get_lock() if hasattr(self._bad_count, "get_lock") else _nullcontext():
                    self._bad_count.value += 1
                log.warning("skipping unreadable image %s (%s); using the next one", rec.path, e.reason)
        raise DatasetError(f"{self.split.source}: no readable image left")

    def _load_train(self, index: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, float]:
        """(index used, image, boxes in that image's pixels, labels, image scale vs the file).
        While a batch is built, each image is decoded once and kept (shrunk to the training size,
        as mosaic and the letterbox would do anyway) for the other samples of the batch."""
        memo = self._batch[1] if self._batch is not None else None
        if memo is not None and index in memo:
            return memo[index]
        i, img, r = self._read(index)
        if memo is not None and max(img.shape[:2]) > self.image_size:
            img, r2 = _resize_longest(img, self.image_size)
            r *= r2
        boxes, labels = self.records[i].train_targets()
        if r != 1.0:
            boxes = np.asarray(boxes, np.float32) * np.float32(r)
        out = (i, img, boxes, labels, r)
        if memo is not None:
            memo[index] = out
        return out

    def _partners(self, rng: np.random.Generator, k: int) -> list[int]:
        """``k`` partner indices for mosaic / mixup (see ``AugmentConfig.mix_pool``)."""
        if self._batch is not None and self.augment.mix_pool == "batch":
            pool = self._batch[0]
            return [int(j) for j in pool[rng.integers(0, len(pool), k)]]
        return [int(j) for j in rng.integers(0, len(self), k)]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A whole batch (the DataLoader calls this instead of ``__getitem__`` per sample): the
        samples share decoded images and draw mosaic/mixup partners from the batch."""
        if not self.train or len(indices) < MIN_BATCH_POOL:
            return [self[int(i)] for i in indices]
        if torch.utils.data.get_worker_info() is not None:  # a fresh worker: stop re-faulting its buffers
            keep_freed_memory()
        self._batch = (np.asarray(indices, np.int64), {})
        try:
            return [self[int(i)] for i in indices]  # through the subclass's __getitem__
        finally:
            self._batch = None

    def _user_pipeline(self, img: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``augment.extra`` on a train sample; back to ``image_size`` square if a transform resized it."""
        from detectkit.data.user_transforms import apply_pipeline

        if self._extra is None:
            self._extra = self.augment.build_extra()
        img, boxes, labels = apply_pipeline(self._extra, img, boxes, labels, rng)
        if img.shape[:2] != (self.image_size, self.image_size):
            img, boxes, _ = letterbox_sample(img, boxes, self.image_size, center=False, pad_value=self.augment.pad_value)
        return img, boxes, labels

    def _train_sample(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, object, dict]:
        cfg, size = self.augment, self.image_size
        rng = np.random.default_rng([self.seed, self.epoch, index])
        magnitude = self.magnitude
        mix = self.mix_enabled
        applied = {"mosaic": False, "mixup": False}

        def single(idx: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, object]:
            used, img, boxes, labels, r = self._load_train(idx)
            img, boxes, info = letterbox_sample(img, boxes, size, center=False, pad_value=cfg.pad_value)
            if r != 1.0:  # a cached, shrunk image: meta keeps describing the file
                rec = self.records[used]
                info = dataclasses.replace(info, scale=info.scale * r, orig_size=(rec.height, rec.width))
            return img, boxes, labels, used, info

        if cfg.extra and cfg.extra_mode == "replace":
            img, boxes, labels, used, info = single(index)
            img, boxes, labels = self._user_pipeline(img, boxes, labels, rng)
            return img, boxes, labels, used, info, applied
        if mix and rng.random() < cfg.mosaic_prob:
            others = self._partners(rng, 3)
            parts = [self._load_train(int(j)) for j in (index, *others)]
            used, info = parts[0][0], None
            # the window is built in this process's scratch buffer: random_affine below always writes a
            # new image from it (nothing returned or kept refers to it), so no canvas per sample
            img, boxes, labels = mosaic4([p[1:4] for p in parts], size, rng, cfg.pad_value, cfg.min_visibility,
                                         out=getattr(self, "_mosaic_buf", None))
            self._mosaic_buf = img
            applied["mosaic"] = True
        else:
            img, boxes, labels, used, info = single(index)
        # the flip is decided first and folded into each warp (it commutes with the blend and HSV)
        flip = bool(rng.random() < cfg.flip_prob)
        blend = mix and rng.random() < cfg.mixup_prob
        # without a blend the HSV jitter runs inside the warp, on the image part only (not the padding)
        colour = None if blend else (lambda im: random_hsv(im, cfg, magnitude, rng))
        img, boxes, labels = random_affine(img, boxes, labels, cfg, magnitude, rng, flip, colour)
        if blend:
            o_img, o_boxes, o_labels, _, _ = single(self._partners(rng, 1)[0])
            o = random_affine(o_img, o_boxes, o_labels, cfg, magnitude, rng, flip)
            img, boxes, labels = mixup((img, boxes, labels), o)
            applied["mixup"] = True
            img = random_hsv(img, cfg, magnitude, rng)
        if cfg.extra:
            img, boxes, labels = self._user_pipeline(img, boxes, labels, rng)
        return img, boxes, labels, used, info, applied

    def __getitem__(self, index: int) -> dict:
        if self.train:
            img, boxes, labels, used, info, applied = self._train_sample(int(index))
        else:
            used, img, _ = self._read_file(int(index))
            rec = self.records[used]
            b, labels = rec.train_targets()
            img, boxes, info = letterbox_sample(
                img, b, self.image_size, center=self.center, pad_value=self.augment.pad_value
            )
            applied = {"mosaic": False, "mixup": False}
        rec = self.records[used]
        scale, pad = (info.scale, info.pad) if info is not None else (1.0, (0, 0))
        meta = {
            "image_id": int(rec.image_id),
            # the id as the annotation file wrote it when that was not an int (COCO string ids):
            # a COCO results file for that annotation file needs it instead of image_id
            "source_id": rec.source_id,
            "index": int(used),
            "path": str(rec.path),
            "orig_size": (int(rec.height), int(rec.width)),
            "scale": float(scale),
            "pad": (int(pad[0]), int(pad[1])),
            "boxes": torch.from_numpy(rec.boxes.copy()),
            "labels": torch.from_numpy(rec.labels.copy()),
            "iscrowd": torch.from_numpy(rec.iscrowd.astype(np.int64)),
            "augment": applied,  # informational: which mixing transforms made this sample
        }
        return {
            # a CHW view of the HWC array: collate does the one transposing copy
            "image": torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1),
            "boxes": torch.from_numpy(np.asarray(boxes, np.float32).reshape(-1, 4)),
            "labels": torch.from_numpy(np.asarray(labels, np.int64).reshape(-1)),
            "meta": meta,
        }

    def __repr__(self) -> str:
        return (
            f"DetectionDataset({Path(self.split.source).name}:{self.split.split}, images={len(self)}, "
            f"classes={len(self.class_names)}, train={self.train}, size={self.image_size})"
        )


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def summarize_problems(split: DetectionSplit) -> None:
    log_problems(split.problems, f"{split.source} ({split.split})")
