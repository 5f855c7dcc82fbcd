"""``detectkit predict --source <file|dir|glob|video|url> --checkpoint X``: no config needed.

The checkpoint is loaded with :func:`detectkit.load` (its record gives the classes, the image
size and letterbox it was validated at, and the post-processing), images go through the one
prediction path (:func:`detectkit.predict.predict`), and the save folder gets the annotated
images (videos as annotated videos), ``predictions.json`` (COCO results, the one writer) and
``images.json`` (the image ids, file names and sizes those rows refer to).

``detectkit predict --config X.yaml --ckpt_path Y`` (a recipe's data split through Lightning)
is the LightningCLI subcommand; see ``detectkit predict --config X.yaml --help-full``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detectkit.errors import OptionParser, UserError

__all__ = ["build_parser", "main", "next_run_dir", "run_predict"]


def build_parser() -> argparse.ArgumentParser:
    p = OptionParser(
        prog="detectkit predict", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Detect objects with a checkpoint; no config needed. Settings left unset come from the "
                    "checkpoint (the size it was validated at, its conf/iou).",
        epilog="With a recipe instead: detectkit predict --config X.yaml --ckpt_path Y (predicts the recipe's "
               "data through Lightning; --help-full with --config lists its options).")
    p.add_argument("--source", required=True, nargs="+",
                   help="image file, folder, glob ('imgs/*.jpg'), video file or http(s) URL (several allowed)")
    p.add_argument("--checkpoint", required=True,
                   help="detectkit .ckpt, super-gradients .pth or ultralytics .pt weights")
    p.add_argument("--conf", type=float, default=None, help="score threshold (default: the checkpoint's, 0.25)")
    p.add_argument("--iou", type=float, default=None, help="NMS IoU threshold (default: the checkpoint's, 0.7)")
    p.add_argument("--size", type=int, default=None,
                   help="input side, a multiple of 32 (default: the size the checkpoint was validated at)")
    p.add_argument("--max-det", type=int, default=None, help="detections kept per image (default: the checkpoint's)")
    p.add_argument("--agnostic", action="store_true", default=None, help="class-agnostic NMS")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--save-dir", default=None, help="output folder (default: runs/predict/<n>, the next free n)")
    p.add_argument("--no-images", action="store_true", help="write only predictions.json, no annotated images")
    p.add_argument("--hide-conf", action="store_true", help="draw class names without scores")
    return p


def next_run_dir(root: str | Path = "runs/predict") -> Path:
    """``root/1``, ``root/2``, ...: the first number not taken."""
    root = Path(root)
    taken = {int(p.name) for p in root.glob("*") if p.name.isdigit()} if root.is_dir() else set()
    n = 1
    while n in taken:
        n += 1
    return root / str(n)


def _load(checkpoint: str, device: str | None) -> Any:
    import detectkit

    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file")
    return detectkit.load(checkpoint, device=device)


def _default_device(device: str | None) -> str:
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_predict(args: argparse.Namespace) -> dict[str, Any]:
    """Predict, write the outputs, return the summary (also printed by :func:`main`)."""
    from PIL import Image

    from detectkit.predict import predict
    from detectkit.predict.pipeline import resolve_settings
    from detectkit.predict.step import no_detections_hint
    from detectkit.predict.writers import VideoWriter, coco_rows, write_coco_results
    from detectkit.utils.files import atomic_write

    if args.size is not None and args.size % 32:
        raise UserError(f"--size must be a multiple of 32, got {args.size}")
    device = _default_device(args.device)
    start = time.perf_counter()
    model = _load(args.checkpoint, device)
    save_dir = Path(args.save_dir) if args.save_dir else next_run_dir()
    save_dir.mkdir(parents=True, exist_ok=True)
    sources = args.source if len(args.source) > 1 else args.source[0]
    stream = predict(model, sources, conf=args.conf, iou=args.iou, size=args.size, max_det=args.max_det,
                     agnostic=args.agnostic, batch_size=args.batch_size, device=device, stream=True)
    rows: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    counts: Counter[str] = Counter()
    used: set[str] = set()
    videos: dict[str, VideoWriter] = {}
    best = 0.0
    try:
        for i, pred in enumerate(stream):
            rows.extend(coco_rows(i, pred.boxes, pred.scores, pred.labels, pred.category_ids))
            h, w = pred.image.shape[:2]
            images.append({"id": i, "file_name": pred.name, "source": pred.source, "width": w, "height": h})
            counts.update(pred.names)
            best = max(best, pred.best_score or 0.0)
            if args.no_images:
                continue
            drawn = pred.draw(show_confidence=not args.hide_conf)
            if pred.fps is not None:  # a video frame: append to that video's annotated copy
                video = pred.source.rsplit("#", 1)[0]
                if video not in videos:
                    videos[video] = VideoWriter(save_dir / f"{Path(pred.name).stem.rsplit('_', 1)[0]}.mp4", pred.fps)
                videos[video].write(drawn)
                continue
            name = pred.name
            if name in used:  # the same file name from two folders or URLs
                name = f"{Path(name).stem}_{i:06d}{Path(name).suffix}"
            used.add(name)
            Image.fromarray(drawn).save(save_dir / name)
    finally:
        for writer in videos.values():
            writer.close()
    write_coco_results(save_dir / "predictions.json", rows)
    atomic_write(save_dir / "images.json", json.dumps(images, indent=1))
    seconds = time.perf_counter() - start
    summary = {"images": len(images), "detections": len(rows), "classes": dict(counts.most_common()),
               "save_dir": str(save_dir), "seconds": round(seconds, 2), "device": device, "best_score": best}
    if images and not rows:
        summary["hint"] = no_detections_hint(resolve_settings(model, conf=args.conf).post.conf, best, len(images))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    summary = run_predict(args)
    classes = ", ".join(f"{n} {k}" for k, n in list(summary["classes"].items())[:8])
    print(f"{summary['images']} images, {summary['detections']} detections" + (f" ({classes})" if classes else "")
          + f" in {summary['seconds']:.1f} s on {summary['device']} -> {summary['save_dir']} "
          f"(annotated images, predictions.json)")
    if "hint" in summary:
        print(summary["hint"], file=sys.stderr)
    return 0
