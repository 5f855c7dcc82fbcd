"""Data-loader throughput (images/s) of the training pipeline.

Cases: 640 px with mosaic + affine + mixup + HSV + flip (the full YOLO-NAS-style recipe), and
320 px with the DataModule defaults (super-gradients' YOLO-NAS recipe: affine, mixup, HSV,
flip). Data: the synthetic set generated at the case's size (cached). Prints a table and one
JSON line.

    python benchmarks/bench_dataloader.py [--workers 2] [--batches 20] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from detectkit.data import AugmentConfig, LoaderConfig  # noqa: E402
from detectkit.data.datamodule import DetectionDataModule  # noqa: E402
from detectkit.data.synthetic import SyntheticConfig, synthetic_dataset  # noqa: E402

CASES = {
    "640 mosaic+affine+mixup+hsv+flip": dict(
        image_size=640, augment=AugmentConfig(mosaic_prob=1.0, mixup_prob=0.5, degrees=5.0, shear=2.0), data_size=640
    ),
    "320 quickstart (defaults)": dict(image_size=320, data_size=320),
}


def run_case(name: str, opts: dict, workers: int, batches: int, batch_size: int, warmup: int) -> dict:
    opts = dict(opts)
    data_size = opts.pop("data_size")
    root = synthetic_dataset(SyntheticConfig(train_images=128, val_images=0, size=data_size, seed=11))
    dm = DetectionDataModule(train=str(root), loader=LoaderConfig(batch_size=batch_size, num_workers=workers),
                             seed=0, **opts)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(0)
    it = iter(loader)
    for _ in range(warmup):  # worker start-up and first decodes are not throughput
        next(it)
    images, start = 0, time.perf_counter()
    done = 0
    epoch = 0
    while done < batches:
        try:
            batch = next(it)
        except StopIteration:
            epoch += 1
            loader.sampler.set_epoch(epoch)
            it = iter(loader)
            continue
        images += len(batch["images"])
        done += 1
    elapsed = time.perf_counter() - start
    return {
        "case": name,
        "images_per_s": images / elapsed,
        "images": images,
        "seconds": elapsed,
        "workers": workers,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    results = [
        run_case(n, o, args.workers, args.batches, args.batch_size, args.warmup) for n, o in CASES.items()
    ]
    print(
        f"\ndata loader throughput ({args.workers} workers, batch {args.batch_size}, {os.cpu_count()} CPUs visible)"
    )
    print(f"{'case':<36}{'images/s':>10}{'images':>8}{'s':>8}")
    for r in results:
        print(f"{r['case']:<36}{r['images_per_s']:>10.1f}{r['images']:>8}{r['seconds']:>8.2f}")
    meta = {
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "batch_size": args.batch_size,
    }
    print(json.dumps({"benchmark": "dataloader", **meta, "results": results}))


if __name__ == "__main__":
    main()
