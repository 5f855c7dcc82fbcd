"""YOLO-World k-shot new classes on generated shapes, where the answer is known.

    python benchmarks/bench_kshot.py [--steps 120] [--kshot-steps 60] [--size 64] [--shots 1 5 10]
        [--protocol unseen|unlabelled]

1. Generated data (``detectkit.data.synthetic``, 5 shape classes). The base classes are
   rectangle, ellipse, triangle; diamond and cross are held out: the base training set is the
   training images that hold no diamond or cross (``--protocol unseen``, default), or all training
   images with the diamond and cross boxes removed, so they are unlabelled background there
   (``--protocol unlabelled``, the harder TFA-style split).
2. A YOLO-World v2 S is trained from random init on the base classes for ``--steps`` steps.
3. For k in ``--shots``: ``DetectionModule(new_classes=[diamond, cross])`` from the base weights
   learns the two new embeddings from k training images per new class (everything else frozen).
4. Validation AP (COCO AP@[.5:.95] and AP50, on the full val split) for the base classes with
   the base vocabulary before and with base + new after, and for the new classes after; plus the
   largest change of any base-class score/box on the val images (should be ~0).

The prompts are random unit vectors per class name (``.pt`` embeddings file: no CLIP offline),
so the new classes start from nothing and every bit of their AP is learned from the k images.
Prints a table and one JSON line. Sized for a small CPU budget (2 cores, under ~10 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from detectkit.checkpoint import save_weights
from detectkit.data import AugmentConfig, DetectionDataModule, LoaderConfig
from detectkit.data.synthetic import SyntheticConfig, synthetic_class_names, synthetic_dataset
from detectkit.modules.detector import DetectionModule
from detectkit.modules.metrics import build_map_metric, summarize_map
from detectkit.ops.nms import postprocess

NAMES = synthetic_class_names(5)
BASE, NEW = NAMES[:3], NAMES[3:]


def _subset(src: Path, dst: Path, keep_classes: list[str], image_ids: set[int] | None = None) -> Path:
    """A COCO folder holding ``src``'s images (``image_ids``: only those) and only the boxes of
    ``keep_classes`` (category list = those, in that order)."""
    data = json.loads((src / "annotations.json").read_text())
    dst.mkdir(parents=True, exist_ok=True)
    by_name = {c["name"]: c["id"] for c in data["categories"]}
    keep_ids = [by_name[n] for n in keep_classes]
    images = [im for im in data["images"] if image_ids is None or im["id"] in image_ids]
    for im in images:
        link = dst / im["file_name"]
        if not link.exists():
            os.symlink((src / im["file_name"]).resolve(), link)
    out = {
        **data,
        "images": images,
        "categories": [c for c in data["categories"] if c["id"] in keep_ids],
        "annotations": [
            a for a in data["annotations"] if a["category_id"] in keep_ids and a["image_id"] in {im["id"] for im in images}
        ],
    }
    (dst / "annotations.json").write_text(json.dumps(out))
    return dst


def _images_without(src: Path, classes: list[str]) -> set[int]:
    """Ids of the images that hold no object of ``classes``."""
    data = json.loads((src / "annotations.json").read_text())
    ids = {c["id"] for c in data["categories"] if c["name"] in classes}
    holding = {a["image_id"] for a in data["annotations"] if a["category_id"] in ids}
    return {im["id"] for im in data["images"]} - holding


def _kshot_images(src: Path, k: int, seed: int) -> set[int]:
    """k training images per new class (each holds at least one object of that class)."""
    data = json.loads((src / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    holding: dict[str, set[int]] = {n: set() for n in NEW}
    for a in data["annotations"]:
        if names[a["category_id"]] in holding:
            holding[names[a["category_id"]]].add(a["image_id"])
    rng = random.Random(seed)
    chosen: set[int] = set()
    for n in NEW:
        pool = sorted(holding[n] - chosen)
        chosen |= set(rng.sample(pool, k))
    return chosen


def _progress(start: float, what: str) -> None:
    print(f"[{time.perf_counter() - start:6.0f} s] {what}", file=sys.stderr, flush=True)


def _datamodule(train: Path | None, val: Path, size: int, batch: int) -> DetectionDataModule:
    return DetectionDataModule(
        train=str(train) if train else None, val=str(val), image_size=size,
        loader=LoaderConfig(batch_size=batch, num_workers=0),
        augment=AugmentConfig(mosaic_prob=0.0, mixup_prob=0.0),
    )  # fmt: skip


def _fit(module: DetectionModule, dm: DetectionDataModule, steps: int, root: Path) -> float:
    trainer = pl.Trainer(
        max_steps=steps, max_epochs=-1, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, enable_checkpointing=False,
        default_root_dir=root,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    return time.perf_counter() - start


@torch.no_grad()
def _predict(module: DetectionModule, val: Path, size: int) -> list[tuple[list[torch.Tensor], list, torch.Tensor, torch.Tensor]]:
    """Per val batch: detections, metas, raw boxes and scores (eval mode, val post-processing)."""
    dm = _datamodule(None, val, size, 16)
    dm.setup("validate")
    module.eval()
    out = []
    for batch in dm.val_dataloader():
        boxes, scores = module.model(module._images(batch))
        dets = postprocess(boxes, scores, **module.val_postprocess.to_dict())
        out.append((dets, batch["meta"], boxes, scores))
    return out


def _ap(preds, classes: list[int], names: list[str], folder: Path, size: int) -> dict[str, float]:
    """AP@[.5:.95] and AP50 over ``classes`` (model label indices): the val folder holds only those
    categories, in that order; detections of other classes are dropped and labels renumbered."""
    metric = build_map_metric()
    remap = {c: i for i, c in enumerate(classes)}
    dm = _datamodule(None, folder, size, 16)
    dm.setup("validate")
    for (dets, _, _, _), batch in zip(preds, dm.val_dataloader()):
        kept = []
        for d in dets:
            d = d[torch.isin(d[:, 5], torch.tensor(classes, dtype=d.dtype))].clone()
            d[:, 5] = torch.tensor([remap[int(c)] for c in d[:, 5]], dtype=d.dtype)
            kept.append(d)
        metric.update(kept, batch["meta"], letterboxed=True)
    summary = summarize_map(metric.compute(), names)
    return {"ap": 100 * summary["map"], "ap50": 100 * summary["map_50"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120, help="base training steps")
    parser.add_argument("--kshot-steps", type=int, default=60, help="k-shot steps per k")
    parser.add_argument("--size", type=int, default=64, help="image side (generated and trained)")
    parser.add_argument("--train-images", type=int, default=600)
    parser.add_argument("--val-images", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--lr", type=float, default=2e-3, help="base training lr")
    parser.add_argument("--kshot-lr", type=float, default=5e-2)
    parser.add_argument("--protocol", choices=["unseen", "unlabelled"], default="unseen",
                        help="base training without the new classes' images, or with them unlabelled")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_kshot_"))
    try:
        cfg = SyntheticConfig(num_classes=5, train_images=args.train_images, val_images=args.val_images,
                              size=args.size, seed=args.seed)  # fmt: skip
        root = synthetic_dataset(cfg, work / "syn")
        base_ids = _images_without(root / "train", NEW) if args.protocol == "unseen" else None
        base_train = _subset(root / "train", work / "base_train", BASE, base_ids)
        val_all = _subset(root / "val", work / "val_all", NAMES)
        val_base = _subset(root / "val", work / "val_base", BASE)
        val_new = _subset(root / "val", work / "val_new", NEW)
        _progress(start, f"data ready; base training {args.steps} steps")
        gen = torch.Generator().manual_seed(args.seed + 1)
        prompts = work / "prompts.pt"
        torch.save({n: torch.randn(512, generator=gen) for n in NAMES}, prompts)

        pl.seed_everything(args.seed, verbose=False)
        base = DetectionModule("yolo_world_v2_s", num_classes=3, class_names=BASE, text_encoder=str(prompts),
                               optim={"lr": args.lr, "weight_decay": 1e-5, "warmup_steps": 30, "final_lr_ratio": 0.1})  # fmt: skip
        base_s = _fit(base, _datamodule(base_train, val_base, args.size, args.batch), args.steps, work)
        weights = save_weights(base.model, work / "base.pt")
        base_preds = _predict(base, val_base, args.size)
        before = _ap(base_preds, [0, 1, 2], BASE, val_base, args.size)

        _progress(start, f"base model trained in {base_s:.0f} s and evaluated")
        rows = []
        for k in args.shots:
            pl.seed_everything(args.seed, verbose=False)
            shot = _subset(root / "train", work / f"k{k}", NAMES, _kshot_images(root / "train", k, args.seed))
            module = DetectionModule("yolo_world_v2_s", num_classes=5, class_names=NAMES, checkpoint=str(weights),
                                     text_encoder=str(prompts), new_classes=NEW,
                                     optim={"lr": args.kshot_lr, "weight_decay": 0.0, "warmup_steps": 5,
                                            "final_lr_ratio": 0.1})  # fmt: skip
            secs = _fit(module, _datamodule(shot, val_all, args.size, min(args.batch, 2 * k)), args.kshot_steps, work)
            preds = _predict(module, val_all, args.size)
            drift_score = max(float((p[3][..., :3] - b[3]).abs().max()) for p, b in zip(preds, base_preds))
            drift_box = max(float((p[2] - b[2]).abs().max()) for p, b in zip(preds, base_preds))
            _progress(start, f"k={k}: {args.kshot_steps} k-shot steps in {secs:.0f} s")
            after = _ap(preds, [0, 1, 2], BASE, val_base, args.size)
            new = _ap(preds, [3, 4], NEW, val_new, args.size)
            rows.append({"k": k, "images": len(json.loads((shot / "annotations.json").read_text())["images"]),
                         "kshot_s": round(secs, 1), "new_ap": round(new["ap"], 1), "new_ap50": round(new["ap50"], 1),
                         "base_ap_before": round(before["ap"], 1), "base_ap_after": round(after["ap"], 1),
                         "base_ap50_before": round(before["ap50"], 1), "base_ap50_after": round(after["ap50"], 1),
                         "max_base_score_change": drift_score, "max_box_change_px": drift_box})  # fmt: skip

        header = ("k", "imgs", "new AP", "new AP50", "base AP before", "base AP after", "base AP50 before",
                  "base AP50 after", "max |Δ base score|", "k-shot s")  # fmt: skip
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for r in rows:
            print(f"| {r['k']} | {r['images']} | {r['new_ap']:.1f} | {r['new_ap50']:.1f} | {r['base_ap_before']:.1f} | "
                  f"{r['base_ap_after']:.1f} | {r['base_ap50_before']:.1f} | {r['base_ap50_after']:.1f} | "
                  f"{r['max_base_score_change']:.1e} | {r['kshot_s']:.0f} |")  # fmt: skip
        result = {
            "bench": "yolo_world_kshot", "model": "yolo_world_v2_s", "image_size": args.size,
            "base_classes": BASE, "new_classes": NEW, "base_steps": args.steps, "kshot_steps": args.kshot_steps,
            "protocol": args.protocol, "base_train_images": len(json.loads((base_train / "annotations.json").read_text())["images"]),
            "base_train_s": round(base_s, 1), "threads": args.threads, "torch": torch.__version__,
            "machine": platform.machine(), "rows": rows, "total_s": round(time.perf_counter() - start, 1),
        }  # fmt: skip
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
