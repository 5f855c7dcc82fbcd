"""Data-loader cases of bench_peers: the training pipeline of detectkit and of ultralytics on the same
JPEGs, the same augmentations, the same batch size.

Work: 640 px, batch 16, mosaic (p=1) + random affine (translate 0.1, scale 0.5-1.5, no rotation or
shear, as ultralytics' defaults) + HSV (ultralytics' gains 0.015 / 0.7 / 0.4 on both sides: detectkit
with ``hsv_mode: gain``, which reads them as ultralytics does) + horizontal flip (p=0.5), mixup off,
output uint8 batches. ultralytics' extra albumentations step (Blur, MedianBlur, ToGray, CLAHE at
p=0.01 each, applied when albumentations is installed) is switched off: detectkit runs none of them,
so the two sides do the same set of augmentations.
Images: the generated dataset rendered at 640 x 480 and written as JPEG (quality 92) in the YOLO layout
(``images/`` + ``labels/`` + ``data.yaml``), which both libraries read. Made once per machine in the temp
dir. The ultralytics side is its own ``YOLODataset`` built by ``build_yolo_dataset`` with the same
augmentation settings; both sides are fed by a plain ``torch.utils.data.DataLoader`` with the same
settings and their own collate functions, so only the dataset and augmentation code differ.

512 images, more than ultralytics keeps decoded without ``cache``: in mosaic training its dataset
holds the last min(n, 8 x batch, 1000) = 128 loaded images in a buffer and draws mosaic partners
from it, so on a set of 128 images (this bench's earlier size) its "no cache" rows never decoded a
JPEG after the first pass, i.e. measured a RAM cache. With 512 it decodes about one image per sample
(as it does on any real dataset above the buffer), as detectkit does (one decode per sample, mosaic
partners from the batch).

With 0 workers one call loads one batch, on one core. With N workers one call is one fresh pass over
the whole set (an epoch: ``PASS_BATCHES`` batches, worker start and shutdown included) for both sides,
on two cores (the main process and its workers, as a 2-core machine trains): persistent workers of
the side not being timed would otherwise fill their prefetch queue while the other side is timed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from peers_common import Case, Work

SIZE = 640
BATCH = 16
IMAGES = 512
PASS_BATCHES = IMAGES // BATCH  # batches per call when workers > 0: one epoch, worker start included
SEED = 0
# shared augmentation settings (ultralytics names -> detectkit names)
AUG = dict(
    mosaic=1.0,
    mixup=0.0,
    degrees=0.0,
    translate=0.1,
    scale=0.5,
    shear=0.0,
    fliplr=0.5,
    hsv_h=0.015,
    hsv_s=0.7,
    hsv_v=0.4,
)


def dataset_root() -> Path:
    """The JPEG dataset (YOLO layout, 640x480), generated once and reused."""
    root = Path(tempfile.gettempdir()) / f"detectkit_peers_data_{IMAGES}_{SIZE}x480_v1"
    if (root / ".done").exists():
        return root
    import cv2

    from detectkit.data.synthetic import SyntheticConfig, render_image

    cfg = SyntheticConfig(train_images=IMAGES, val_images=0, size=SIZE, seed=SEED, max_objects=8)
    img_dir, lbl_dir = root / "train" / "images", root / "train" / "labels"
    img_dir.mkdir(parents=True, exist_ok=True)
    lbl_dir.mkdir(parents=True, exist_ok=True)
    h = 480
    for i in range(IMAGES):
        img, boxes, labels = render_image(cfg, np.random.default_rng([SEED, 0, i]))
        img = cv2.resize(img, (SIZE, h), interpolation=cv2.INTER_AREA)
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4) * [1.0, h / SIZE, 1.0, h / SIZE]
        cv2.imwrite(str(img_dir / f"{i:05d}.jpg"), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
        lines = []
        for (x1, y1, x2, y2), c in zip(boxes, labels):
            cx, cy, bw, bh = (x1 + x2) / 2 / SIZE, (y1 + y2) / 2 / h, (x2 - x1) / SIZE, (y2 - y1) / h
            lines.append(f"{int(c)} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}")
        (lbl_dir / f"{i:05d}.txt").write_text("\n".join(lines) + "\n")
    names = "\n".join(f"  {k}: {n}" for k, n in enumerate(["rectangle", "ellipse", "triangle"]))
    (root / "data.yaml").write_text(
        f"path: {root}\ntrain: train/images\nval: train/images\nnc: 3\nnames:\n{names}\n"
    )
    (root / ".done").write_text("ok\n")
    return root


def _cycle(loader) -> Work:
    """0 workers: one call = the next batch, restarting the pass when it ends."""
    state = {"it": iter(loader)}

    def work():
        try:
            return next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            return next(state["it"])

    return work


def _passes(loader) -> Work:
    """N workers: one call = a fresh pass of PASS_BATCHES batches (worker start included)."""

    def work():
        it = iter(loader)
        out = [next(it) for _ in range(PASS_BATCHES)]
        del it  # shuts the workers down before the other side is timed
        return out

    return work


def _loader(dataset, collate_fn, workers: int):
    import torch

    g = torch.Generator().manual_seed(SEED)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=BATCH,
        shuffle=True,
        num_workers=workers,
        collate_fn=collate_fn,
        drop_last=True,
        persistent_workers=False,
        generator=g,
        worker_init_fn=_worker_init if workers else None,
    )


def _worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)


def _detectkit(workers: int, cache: str | None) -> Work:
    from detectkit.data.collate import collate
    from detectkit.data.dataset import DetectionDataset
    from detectkit.data.formats.detect import open_dataset
    from detectkit.data.transforms import AugmentConfig

    split = open_dataset(str(dataset_root())).load("train")
    aug = AugmentConfig(
        mosaic_prob=AUG["mosaic"],
        mixup_prob=AUG["mixup"],
        degrees=AUG["degrees"],
        translate=AUG["translate"],
        scale=(1 - AUG["scale"], 1 + AUG["scale"]),
        shear=AUG["shear"],
        hsv_prob=1.0,
        hsv_mode="gain",
        hsv_h=AUG["hsv_h"],
        hsv_s=AUG["hsv_s"],
        hsv_v=AUG["hsv_v"],
        flip_prob=AUG["fliplr"],
    )
    kwargs = {"cache": cache} if cache else {}
    ds = DetectionDataset(split, SIZE, train=True, augment=aug, seed=SEED, **kwargs)
    loader = _loader(ds, collate, workers)
    return _passes(loader) if workers else _cycle(loader)


def _ultralytics(workers: int, cache: str | None) -> Work:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics.cfg import get_cfg
    from ultralytics.data.build import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    root = dataset_root()
    data = check_det_dataset(str(root / "data.yaml"), autodownload=False)
    cfg = get_cfg(
        overrides=dict(
            imgsz=SIZE,
            cache=cache or False,
            workers=workers,
            fraction=1.0,
            copy_paste=0.0,
            cutmix=0.0,
            perspective=0.0,
            flipud=0.0,
            bgr=0.0,
            close_mosaic=0,
            **AUG,
        )
    )
    ds = build_yolo_dataset(cfg, data["train"], BATCH, data, mode="train", rect=False, stride=32)
    switched_off = 0
    for t in getattr(ds.transforms, "transforms", []):  # the extras detectkit does not run: off
        if type(t).__name__ == "Albumentations":
            t.transform = None
            switched_off += 1
    if not switched_off:
        raise RuntimeError("ultralytics' Albumentations step was not found: the cases would not be like for like")
    loader = _loader(ds, ds.collate_fn, workers)
    return _passes(loader) if workers else _cycle(loader)


def cases() -> list[Case]:
    out = []
    for workers in (0, 2):
        for cache in (None, "ram"):
            name = f"data_w{workers}" + ("_cache" if cache else "")
            items = BATCH * (PASS_BATCHES if workers else 1)
            out.append(
                Case(
                    name=name,
                    group="data",
                    unit="images",
                    items_per_call=items,
                    setup_detectkit=lambda t, w=workers, c=cache: _detectkit(w, c),
                    setup_ultralytics=lambda t, w=workers, c=cache: _ultralytics(w, c),
                    warmup=1 if workers else 2,
                    note=f"640 mosaic+affine+hsv+flip, batch {BATCH}, {workers} workers"
                    + (", RAM cache on both" if cache else ", no cache")
                    + (f", one call = a fresh epoch of {PASS_BATCHES} batches on 2 cores" if workers else ", 1 core"),
                    min_runs=3,
                    cores=2 if workers else 1,
                    detectkit_ran=f"DetectionDataset + DataLoader, {IMAGES} JPEGs 640x480, {SIZE} px, batch {BATCH}, "
                    f"mosaic 1.0, translate 0.1, scale 0.5-1.5, HSV gains 0.015/0.7/0.4, flip 0.5, {workers} workers"
                    + (", RAM cache" if cache else ""),
                    peer_ran="its YOLODataset (build_yolo_dataset) with the same settings and collate, its "
                    "albumentations extras off" + (", RAM cache" if cache else ""),
                )
            )
    return out
