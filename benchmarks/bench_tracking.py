"""Tracking quality of ``detectkit predict --track`` on generated moving shapes with known tracks.

    python benchmarks/bench_tracking.py [--frames 150] [--objects 4] [--seed 0] [--checkpoint X]

Writes a clip of coloured shapes (the quickstart classes) moving and bouncing on a textured
background through the one VideoWriter, with its ground truth as a MOT-challenge txt, runs the
real ``detectkit predict --source clip.mp4 --track`` on it with a trained checkpoint, and scores the
tracks file with ``trackers.eval`` (CLEAR MOTA / ID switches, HOTA, IDF1: TrackEval's matching).
Without ``--checkpoint`` the quickstart recipe is trained once (3-12 minutes on 2 CPU cores) and
cached under benchmarks/.cache/tracking/ (not committed). Prints a table and one JSON line.
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

CACHE = Path(__file__).resolve().parent / ".cache" / "tracking"


def trained_checkpoint(cache: Path = CACHE) -> Path:
    """The quickstart detector (trained on the generated shapes), trained on first use then reused."""
    return cached_detector(cache, "quickstart")  # 160 steps; a shorter run scores ~0.05 on these shapes


def write_clip(folder: Path, frames: int, objects: int, size: int, seed: int) -> tuple[Path, Path]:
    """clip.mp4 (through the one VideoWriter) and gt.txt: ``frame,id,x,y,w,h,1,1,1`` (MOT ground truth:
    considered, class 1, visible), frames counted from 1 like the tracks file."""
    from detectkit.data.synthetic import moving_shapes
    from detectkit.predict.writers import VideoWriter

    folder.mkdir(parents=True, exist_ok=True)
    clip, gt = folder / "clip.mp4", folder / "gt.txt"
    lines = []
    with VideoWriter(clip, 25) as writer:
        for i, (image, boxes, _, ids) in enumerate(moving_shapes(frames, objects, size=size, seed=seed)):
            writer.write(image)
            lines += [f"{i + 1},{t},{x1:.2f},{y1:.2f},{x2 - x1:.2f},{y2 - y1:.2f},1,1,1"
                      for (x1, y1, x2, y2), t in zip(boxes.tolist(), ids.tolist())]
    gt.write_text("\n".join(lines) + "\n")
    return clip, gt


def track_and_score(clip: Path, gt: Path, checkpoint: Path, tracker: str, out: Path, extra: list[str]) -> dict:
    """The real ``detectkit track`` on the clip, scored against gt.txt by trackers.eval."""
    from trackers.eval import evaluate_mot_sequence

    from detectkit.cli import main

    start = time.perf_counter()
    code = main(["track", "--source", str(clip), "--checkpoint", str(checkpoint), "--save-dir", str(out),
                 "--tracker", tracker, "--device", "cpu", *extra])
    if code != 0:
        raise SystemExit(f"detectkit track exited with {code}")
    seconds = time.perf_counter() - start
    result = evaluate_mot_sequence(gt, out / "tracks" / "clip.txt", metrics=["CLEAR", "HOTA", "Identity"])
    return {"tracker": tracker, "MOTA": round(100 * result.CLEAR.MOTA, 1), "IDSW": int(result.CLEAR.IDSW),
            "HOTA": round(100 * result.HOTA.HOTA, 1), "IDF1": round(100 * result.Identity.IDF1, 1),
            "FP": int(result.CLEAR.CLR_FP), "FN": int(result.CLEAR.CLR_FN), "seconds": round(seconds, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=150)
    p.add_argument("--objects", type=int, default=3)
    p.add_argument("--size", type=int, default=160, help="clip side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help="default: the quickstart detector, trained once and cached")
    p.add_argument("--trackers", nargs="+", default=["bytetrack", "sort", "ocsort"])
    p.add_argument("--conf", type=float, default=None, help="detection threshold (default: the checkpoint's)")
    p.add_argument("--track-conf", type=float, default=None, help="score that starts a track (default: the tracker's)")
    args = p.parse_args()
    checkpoint = Path(args.checkpoint) if args.checkpoint else trained_checkpoint()
    folder = CACHE / f"clip_{args.frames}_{args.objects}_{args.size}_{args.seed}"
    clip, gt = write_clip(folder, args.frames, args.objects, args.size, args.seed)
    extra = [*(["--conf", str(args.conf)] if args.conf is not None else []),
             *(["--track-conf", str(args.track_conf)] if args.track_conf is not None else [])]
    rows = [track_and_score(clip, gt, checkpoint, name, folder / name, extra) for name in args.trackers]
    print(f"{args.frames} frames, {args.objects} objects, {args.size} px, seed {args.seed}; checkpoint {checkpoint}")
    print(f"{'tracker':<10} {'MOTA':>6} {'IDSW':>5} {'HOTA':>6} {'IDF1':>6} {'FP':>5} {'FN':>5} {'s':>6}")
    for r in rows:
        print(f"{r['tracker']:<10} {r['MOTA']:>6} {r['IDSW']:>5} {r['HOTA']:>6} {r['IDF1']:>6} {r['FP']:>5} {r['FN']:>5} "
              f"{r['seconds']:>6}")
    print(json.dumps({"frames": args.frames, "objects": args.objects, "size": args.size, "seed": args.seed,
                      "conf": args.conf, "track_conf": args.track_conf, "results": rows}))
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--train-only"]:
        print(trained_checkpoint())
        sys.exit(0)
    sys.exit(main())
