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
import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detectkit.errors import OptionParser, UserError

__all__ = ["build_parser", "main", "track_main", "next_run_dir", "run_predict", "slice_config"]


def build_parser() -> argparse.ArgumentParser:
    p = OptionParser(
        prog="detectkit predict", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Detect objects with a checkpoint; no config needed. Settings left unset come from the "
                    "checkpoint (the size it was validated at, its conf/iou).",
        epilog="With a recipe instead: detectkit predict --config X.yaml --ckpt_path Y (predicts the recipe's "
               "data through Lightning; --help-full with --config lists its options).")
    p.add_argument("--source", required=True, nargs="+",
                   help="image file, folder, glob ('imgs/*.jpg'), video file, http(s) URL, webcam index (0) or "
                        "stream URL (rtsp://, http MJPEG) (several allowed)")
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
    p.add_argument("--vid-stride", type=int, default=1, help="predict every N-th video/stream frame (default 1)")
    p.add_argument("--stream-retries", type=int, default=3,
                   help="reopen attempts when a live stream stops, before the run ends (default 3)")
    p.add_argument("--stream-timeout", type=float, default=10.0,
                   help="seconds an open or a frame read may take before it counts as lost (default 10)")
    p.add_argument("--track", action="store_true",
                   help="track objects across video frames: IDs drawn, tracks/<video>.txt (MOT) and .json written")
    p.add_argument("--tracker", default="bytetrack", help="bytetrack (default), sort or ocsort (the trackers package)")
    p.add_argument("--track-conf", type=float, default=None,
                   help="score a detection needs to start a track (default: the tracker's, 0.7 for ByteTrack)")
    p.add_argument("--slice", type=int, default=None, metavar="PIXELS",
                   help="sliced inference for small objects in large images: tiles of PIXELS x PIXELS, each "
                        "predicted at --size, boxes merged across tiles (the slice extra, sahi)")
    p.add_argument("--overlap", type=float, default=0.2, help="with --slice: fraction of a tile shared with "
                                                              "its neighbours (default 0.2)")
    p.add_argument("--slice-merge", choices=("nms", "nmm"), default="nms",
                   help="with --slice: of the boxes tiles found for one object keep the best (nms, default) or "
                        "their union box (nmm, SAHI's default)")
    p.add_argument("--slice-match", choices=("ios", "iou"), default="ios",
                   help="with --slice: two boxes are one object when their intersection over the smaller box (ios, "
                        "default) or their IoU is at least --slice-threshold")
    p.add_argument("--slice-threshold", type=float, default=0.5, help="with --slice: see --slice-match (default 0.5)")
    p.add_argument("--no-full-image", action="store_true",
                   help="with --slice: tiles only, without the whole image downscaled as one more tile")
    return p


def slice_config(args: argparse.Namespace) -> Any:
    """The :class:`~detectkit.predict.slicing.SliceConfig` the options ask for (None without --slice)."""
    if args.slice is None:
        return None
    from detectkit.predict.slicing import SliceConfig, tile_grid

    try:
        config = SliceConfig(size=args.slice, overlap=args.overlap, merge=args.slice_merge,
                             match_metric=args.slice_match, match_threshold=args.slice_threshold,
                             full_image=not args.no_full_image)
    except ValueError as e:
        raise UserError(f"--slice: {e}") from None
    tile_grid(args.slice, args.slice, config)  # the `slice` extra (sahi), checked before the model loads
    return config


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
    from detectkit.predict.sources import SourceOptions
    from detectkit.predict.step import no_detections_hint
    from detectkit.predict.writers import VideoWriter, coco_rows, write_coco_results
    from detectkit.utils.files import atomic_write

    if args.size is not None and args.size % 32:
        raise UserError(f"--size must be a multiple of 32, got {args.size}")
    for flag, value, low in (("--vid-stride", args.vid_stride, 1), ("--stream-retries", args.stream_retries, 0)):
        if value < low:
            raise UserError(f"{flag} must be >= {low}, got {value}")
    if not args.stream_timeout > 0:
        raise UserError(f"--stream-timeout must be > 0 seconds, got {args.stream_timeout}")
    options = SourceOptions(vid_stride=args.vid_stride, retries=args.stream_retries, timeout=args.stream_timeout)
    if args.track:
        from detectkit.predict.track import TRACKERS

        if args.tracker not in TRACKERS:
            raise UserError(f"--tracker {args.tracker!r}: choose one of {', '.join(TRACKERS)}")
        import trackers  # noqa: F401  the `track` extra, checked before the model loads
    slicing = slice_config(args)
    device = _default_device(args.device)
    start = time.perf_counter()
    model = _load(args.checkpoint, device)
    save_dir = Path(args.save_dir) if args.save_dir else next_run_dir()
    save_dir.mkdir(parents=True, exist_ok=True)
    sources = args.source if len(args.source) > 1 else args.source[0]
    stream = predict(model, sources, conf=args.conf, iou=args.iou, size=args.size, max_det=args.max_det,
                     agnostic=args.agnostic, batch_size=args.batch_size, device=device, stream=True,
                     source_options=options, slice=slicing)
    rows: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    counts: Counter[str] = Counter()
    used: set[str] = set()
    videos: dict[str, VideoWriter] = {}
    tracks: dict[str, _Tracks] = {}
    best = 0.0
    try:
        for i, pred in enumerate(stream):
            if args.track:
                key = pred.source.rsplit("#", 1)[0] if pred.fps is not None else "images"
                if key not in tracks:
                    stem = Path(pred.name).stem.rsplit("_", 1)[0] if pred.fps is not None else "images"
                    tracks[key] = _Tracks(args.tracker, pred.fps or 25.0, args.track_conf, save_dir / "tracks" / stem)
                pred = tracks[key].update(pred)
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
    except KeyboardInterrupt:  # how a webcam or stream run is stopped: keep what was predicted
        print(f"interrupted after {len(images)} images: writing what was predicted", file=sys.stderr)
    finally:
        stream.close()  # stops the source's reader thread
        for writer in videos.values():
            writer.close()
        for track in tracks.values():
            track.write()
    write_coco_results(save_dir / "predictions.json", rows)
    atomic_write(save_dir / "images.json", json.dumps(images, indent=1))
    seconds = time.perf_counter() - start
    summary = {"images": len(images), "detections": len(rows), "classes": dict(counts.most_common()),
               "save_dir": str(save_dir), "seconds": round(seconds, 2), "device": device, "best_score": best}
    if args.track:
        summary["tracks"] = {str(t.stem.with_suffix(".txt")): t.count for t in tracks.values()}
    if images and not rows:
        summary["hint"] = no_detections_hint(resolve_settings(model, conf=args.conf).post.conf, best, len(images))
    return summary


class _Tracks:
    """One video's tracker and its rows, written as ``<stem>.txt`` (MOT) and ``<stem>.json``."""

    def __init__(self, name: str, fps: float, conf: float | None, stem: Path) -> None:
        from detectkit.predict.track import Tracker

        self.tracker = Tracker(name, fps, conf)
        self.stem = stem
        self.lines: list[str] = []
        self.rows: list[dict[str, Any]] = []
        self.ids: set[int] = set()

    def update(self, pred: Any) -> Any:
        from detectkit.predict.writers import mot_lines, track_rows

        pred = self.tracker.update(pred)
        frame = pred.frame + 1  # MOT frames count from 1, in the source video's numbering
        self.lines += mot_lines(frame, pred.boxes, pred.track_ids, pred.scores)
        self.rows += track_rows(frame, pred.boxes, pred.track_ids, pred.scores, pred.labels, pred.category_ids)
        self.ids.update(int(i) for i in pred.track_ids)
        return pred

    @property
    def count(self) -> int:
        return len(self.ids)

    def write(self) -> None:
        from detectkit.utils.files import atomic_write

        self.stem.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.stem.with_suffix(".txt"), "".join(line + "\n" for line in self.lines))
        atomic_write(self.stem.with_suffix(".json"), json.dumps(self.rows))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # a lost stream's one line
    summary = run_predict(args)
    classes = ", ".join(f"{n} {k}" for k, n in list(summary["classes"].items())[:8])
    print(f"{summary['images']} images, {summary['detections']} detections" + (f" ({classes})" if classes else "")
          + f" in {summary['seconds']:.1f} s on {summary['device']} -> {summary['save_dir']} "
          f"(annotated images, predictions.json{', tracks/' if 'tracks' in summary else ''})")
    if "tracks" in summary:
        print("tracks: " + ", ".join(f"{path} ({n} IDs)" for path, n in summary["tracks"].items()))
    if "hint" in summary:
        print(summary["hint"], file=sys.stderr)
    return 0


def track_main(argv: Sequence[str] | None = None) -> int:
    """``detectkit track ...``: ``detectkit predict --track ...``."""
    return main(["--track", *(sys.argv[1:] if argv is None else argv)])
