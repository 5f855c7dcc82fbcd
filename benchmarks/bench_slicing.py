"""Sliced inference for small objects: COCO AP on large generated images with and without slicing.

A YOLO-NAS-S detector is trained once on 128 px generated images whose shapes are 12-24 px (the
quickstart recipe with small objects; a few minutes on 2 CPU cores, cached under
benchmarks/.cache/slicing/, not committed). It then predicts 1280x1280 generated images holding
12-24 px shapes of the same kinds, through the one prediction path (:func:`detectkit.predict.predict`):
the whole image letterboxed to the model's size, the whole image at its own 1280 px, and sliced
(SliceConfig: tiles, NMS or NMM merging, with and without the downscaled full image as one more
tile). Each run is scored by faster-coco-eval (AP, AP50, AP_small) against the known boxes.
Prints a table and one JSON line.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_slicing.py [--images 8] [--checkpoint X]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from cached_detector import cached_detector

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
CACHE = Path(__file__).resolve().parent / ".cache" / "slicing"
#: shapes of 12-24 px in 128 px training images, like those in the 1280 px test images
TRAIN_OVERRIDES = [
    "--data.synthetic.object_size=[0.094,0.19]", "--data.synthetic.small_fraction=0.0",
    "--data.synthetic.min_objects=3", "--data.synthetic.max_objects=8", "--data.synthetic.max_overlap=0.1",
    "--data.augment.scale=[0.8,1.25]", "--data.synthetic.train_images=384", "--data.synthetic.val_images=32",
    "--trainer.max_epochs=4", "--trainer.check_val_every_n_epoch=4",
]


def trained_checkpoint(cache: Path = CACHE) -> Path:
    """The small-object detector, trained on first use then reused."""
    return cached_detector(cache, "train", TRAIN_OVERRIDES)


def test_images(count: int, size: int, seed: int) -> list[tuple]:
    """``count`` generated ``size`` px images (RGB, boxes xyxy, labels) with 20-40 shapes of 12-24 px."""
    import numpy as np

    from detectkit.data.synthetic import SyntheticConfig, render_image

    cfg = SyntheticConfig(size=size, num_classes=3, object_size=(12 / size, 24 / size), small_fraction=0.0,
                          min_objects=20, max_objects=40, max_overlap=0.1, texture=0.3)
    return [render_image(cfg, np.random.default_rng([seed, i])) for i in range(count)]


def score(model, images: list[tuple], conf: float, **options) -> dict:
    """AP of one prediction setting over ``images`` (faster-coco-eval, the project's metric) and its time."""
    import torch

    from detectkit.modules.metrics import build_map_metric

    metric = build_map_metric()
    start = time.perf_counter()
    preds = model.predict([image for image, _, _ in images], conf=conf, max_det=100, batch_size=8, **options)
    seconds = time.perf_counter() - start
    metric.update([{"boxes": torch.as_tensor(p.boxes), "scores": torch.as_tensor(p.scores),
                    "labels": torch.as_tensor(p.labels)} for p in preds],
                  [{"boxes": torch.as_tensor(b), "labels": torch.as_tensor(lab), "image_id": i}
                   for i, (_, b, lab) in enumerate(images)])
    result = metric.compute()
    keys = {"AP": "map", "AP50": "map_50", "AP_small": "map_small", "AR100": "mar_100"}
    return {name: round(float(result[key]), 4) for name, key in keys.items()} | {
        "s_per_image": round(seconds / len(images), 2), "detections": sum(len(p) for p in preds)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="default: the small-object detector, trained once and cached")
    p.add_argument("--images", type=int, default=6, help="test images (default 6)")
    p.add_argument("--image-size", type=int, default=1280, help="test image side (default 1280)")
    p.add_argument("--conf", type=float, default=0.05, help="score threshold for the scored detections")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()

    import detectkit
    from detectkit.predict.slicing import SliceConfig

    checkpoint = Path(args.checkpoint) if args.checkpoint else trained_checkpoint()
    model = detectkit.load(checkpoint, device="cpu")
    trained = model.inference.image_size[0]
    images = test_images(args.images, args.image_size, args.seed)
    runs = {
        f"whole image at the model's {trained} px": {},
        f"whole image at {args.image_size} px": {"size": args.image_size},
        f"sliced {trained} px, overlap 0.2, NMM (+ whole image)": {"slice": SliceConfig(trained, 0.2, "nmm")},
        f"sliced {trained} px, overlap 0.2, NMS (+ whole image)": {"slice": SliceConfig(trained, 0.2, "nms")},
        f"sliced {trained} px, overlap 0.2, NMM, tiles only": {"slice": SliceConfig(trained, 0.2, "nmm",
                                                                                   full_image=False)},
    }
    rows = {}
    for name, options in runs.items():
        rows[name] = score(model, images, args.conf, **options)
        print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)
    cols = ["AP", "AP50", "AP_small", "AR100", "s_per_image", "detections"]
    width = max(map(len, rows))
    print(f"{args.images} generated {args.image_size}x{args.image_size} images, "
          f"{sum(len(b) for _, b, _ in images)} shapes of 12-24 px; detector trained at {trained} px; conf {args.conf}")
    print(f"{'setting':<{width}}  " + "  ".join(f"{c:>11}" for c in cols))
    for name, row in rows.items():
        print(f"{name:<{width}}  " + "  ".join(f"{row[c]:>11}" for c in cols))
    print(json.dumps({"benchmark": "slicing", "images": args.images, "image_size": args.image_size,
                      "trained_size": trained, "checkpoint": str(checkpoint), "conf": args.conf, "results": rows}))
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--train-only"]:
        print(trained_checkpoint())
        sys.exit(0)
    sys.exit(main())
