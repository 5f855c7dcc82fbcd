"""Validation mAP time: detectkit's metric path vs pycocotools vs faster-coco-eval called directly.

A generated COCO-sized ground truth (default 5,000 images, about 7 boxes an image, 80 classes,
box sides spread over COCO's small/medium/large areas, 1% crowd boxes) and 100 detections per
image (noisy copies of the ground truth, some with the wrong class, plus random boxes: the COCO
result-file limit, so all three methods score the same detections). Interleaved rounds
(A B C A B C ...), each run in a forked child (its peak memory is its own):

- detectkit: ``build_map_metric()`` as ``DetectionModule`` validates: ``update(..., letterboxed=True)`` per batch of 32
  (NMS output + batch meta), then ``compute`` (summary, per-class AP, PR arrays from one run);
- pycocotools: ``COCO`` + ``loadRes`` + ``COCOeval`` evaluate/accumulate/summarize;
- faster-coco-eval direct: the same calls on faster-coco-eval's ``COCO``/``COCOeval_faster``
  (per-class AP is in its ``eval['precision']``).

Inputs (tensors for detectkit, the JSON-like dicts for the others) are built before the clock
starts. Prints a table (median and min wall time, median CPU time, runs, peak memory above the
child's start) and one JSON line with each method's mAP, the largest mAP difference and the time
ratios (wall and CPU).

    python benchmarks/bench_metric.py [--images 5000] [--rounds 3] [--threads 1]
    python benchmarks/bench_metric.py --images 500 --rounds 2     # quick
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP/torch threads")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # thread pools read these when numpy/torch load
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import numpy as np  # noqa: E402
import torch  # noqa: E402

NUM_CLASSES = 80
DETS_PER_IMAGE = 100


# ---------------------------------------------------------------------------- data
def generate(n_images: int, seed: int) -> tuple[list[dict], list[np.ndarray], np.ndarray]:
    """Per-image ground truth dicts (xyxy, labels, iscrowd, image_id, size), per-image detections
    ``[100, 6]`` (xyxy, score, label) and the image sizes ``[n, 2]`` (h, w)."""
    rng = np.random.default_rng(seed)
    sizes = np.stack([rng.integers(360, 641, n_images), rng.integers(480, 641, n_images)], 1)  # h, w
    gts, dets = [], []
    for i in range(n_images):
        h, w = (float(v) for v in sizes[i])
        n = int(np.clip(rng.poisson(7), 1, 30))
        side = np.exp(rng.uniform(np.log(6), np.log(320), (n, 1)))  # areas from ~36 to ~100k px
        wh = side * np.exp(rng.uniform(-0.5, 0.5, (n, 2)))
        wh = np.minimum(wh, [w, h])
        xy = rng.uniform(0, 1, (n, 2)) * ([w, h] - wh)
        boxes = np.concatenate([xy, xy + wh], 1)
        labels = rng.integers(0, NUM_CLASSES, n)
        crowd = (rng.random(n) < 0.01).astype(np.int64)
        gts.append({"boxes": boxes.astype(np.float32), "labels": labels, "iscrowd": crowd, "image_id": 1000 + i,
                    "size": (int(h), int(w))})
        # noisy copies: 1-3 per object, jitter ~ 10% of the side, 10% with another class
        copies = rng.integers(1, 4, n)
        src = np.repeat(np.arange(n), copies)
        jitter = rng.normal(0, 0.1, (len(src), 4)) * np.tile(wh[src], 2)
        d_boxes = boxes[src] + jitter
        d_labels = np.where(rng.random(len(src)) < 0.1, rng.integers(0, NUM_CLASSES, len(src)), labels[src])
        d_scores = np.clip(rng.beta(5, 2, len(src)) - np.abs(jitter).mean(1) / np.tile(wh[src], 2).mean(1), 0.01, 1)
        # random boxes up to 100 detections
        r = max(0, DETS_PER_IMAGE - len(src))
        r_side = np.exp(rng.uniform(np.log(6), np.log(320), (r, 2)))
        r_side = np.minimum(r_side, [w, h])
        r_xy = rng.uniform(0, 1, (r, 2)) * ([w, h] - r_side)
        r_boxes = np.concatenate([r_xy, r_xy + r_side], 1)
        det = np.concatenate([
            np.concatenate([d_boxes, d_scores[:, None], d_labels[:, None]], 1),
            np.concatenate([r_boxes, rng.beta(1, 6, (r, 1)), rng.integers(0, NUM_CLASSES, (r, 1))], 1),
        ])[:DETS_PER_IMAGE]
        det[:, 0:4:2] = det[:, 0:4:2].clip(0, w)
        det[:, 1:4:2] = det[:, 1:4:2].clip(0, h)
        dets.append(det.astype(np.float32))
    return gts, dets, sizes


def coco_json(gts: list[dict], dets: list[np.ndarray]) -> tuple[dict, list[dict]]:
    """The same data as a COCO ground-truth dict and a COCO result list (category id = label)."""
    images, anns, results = [], [], []
    for g, d in zip(gts, dets):
        h, w = g["size"]
        images.append({"id": g["image_id"], "height": h, "width": w})
        for b, c, cr in zip(g["boxes"].astype(np.float64).tolist(), g["labels"].tolist(), g["iscrowd"].tolist()):
            bw, bh = b[2] - b[0], b[3] - b[1]
            anns.append({"id": len(anns) + 1, "image_id": g["image_id"], "category_id": int(c),
                         "bbox": [b[0], b[1], bw, bh], "area": bw * bh, "iscrowd": int(cr)})
        for x1, y1, x2, y2, s, c in d.astype(np.float64).tolist():
            results.append({"image_id": g["image_id"], "category_id": int(c), "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": s})
    gt = {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in range(NUM_CLASSES)]}
    return gt, results


def detectkit_inputs(gts: list[dict], dets: list[np.ndarray], batch_size: int) -> list[tuple[list, list]]:
    """Batches as validation hands them to the metric: per image ``[N,6]`` tensors from NMS and the
    batch ``meta`` (no letterbox here: scale 1, pad 0)."""
    batches = []
    for s in range(0, len(gts), batch_size):
        d = [torch.from_numpy(x) for x in dets[s:s + batch_size]]
        metas = [{"image_id": g["image_id"], "orig_size": g["size"], "scale": 1.0, "pad": (0, 0),
                  "boxes": torch.from_numpy(g["boxes"]), "labels": torch.from_numpy(g["labels"]),
                  "iscrowd": torch.from_numpy(g["iscrowd"])} for g in gts[s:s + batch_size]]
        batches.append((d, metas))
    return batches


# ---------------------------------------------------------------------------- methods
def run_detectkit(batches: list[tuple[list, list]]) -> dict[str, Any]:
    from detectkit.modules.metrics import build_map_metric

    metric = build_map_metric()
    for d, metas in batches:  # what DetectionModule._eval_step does after NMS
        metric.update(d, metas, letterboxed=True)
    res = metric.compute()
    per_class = np.full(NUM_CLASSES, -1.0)  # indexed by label like the COCO runs' category order
    per_class[metric.last_result.classes] = metric.last_result.ap_per_class()
    return {"map": float(res["map"]), "map_50": float(res["map_50"]), "map_small": float(res["map_small"]),
            "mar_100": float(res["mar_100"]), "per_class": per_class.tolist()}


def _coco_run(COCO: Any, COCOeval: Any, gt: dict, results: list[dict], **kw: Any) -> dict[str, Any]:
    coco_gt = COCO()
    coco_gt.dataset = gt
    coco_gt.createIndex()
    coco_dt = coco_gt.loadRes(results)
    ev = COCOeval(coco_gt, coco_dt, "bbox", **kw)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    p = ev.eval["precision"][:, :, :, 0, -1]  # per-class AP from the same run
    per_class = [float(p[:, :, k][p[:, :, k] > -1].mean()) if (p[:, :, k] > -1).any() else -1.0
                 for k in range(p.shape[2])]
    return {"map": float(ev.stats[0]), "map_50": float(ev.stats[1]), "map_small": float(ev.stats[3]),
            "mar_100": float(ev.stats[8]), "per_class": per_class}


def run_pycocotools(gt: dict, results: list[dict]) -> dict[str, Any]:
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # its progress prints
        return _coco_run(COCO, COCOeval, gt, results)


def run_faster_coco_eval(gt: dict, results: list[dict]) -> dict[str, Any]:
    from faster_coco_eval import COCO, COCOeval_faster

    return _coco_run(COCO, COCOeval_faster, gt, results, print_function=lambda *a, **k: None)


# ---------------------------------------------------------------------------- timing
def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def timed_in_child(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``fn`` in a forked child: wall and CPU seconds (CPU time is the steadier figure on a
    shared machine), its result and its peak RSS above the start (MB)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        code = 0
        try:
            start_rss = _rss_kb("VmRSS")
            t, cpu = time.perf_counter(), time.process_time()
            out = fn()
            out = {"seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - cpu,
                   "peak_mb": (_rss_kb("VmHWM") - start_rss) / 1024, **out}
        except BaseException as e:  # report, never fall through into the parent's code
            out, code = {"error": repr(e)}, 1
        with os.fdopen(w, "w") as f:
            f.write(json.dumps(out))
        os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    os.waitpid(pid, 0)
    out = json.loads(data)
    if "error" in out:
        raise RuntimeError(f"benchmark child failed: {out['error']}")
    return out


def main() -> None:
    args = ARGS
    torch.set_num_threads(args.threads)
    # every library is imported before the clock: a run times the evaluation, not Python imports
    import faster_coco_eval  # noqa: F401
    import pycocotools.cocoeval  # noqa: F401

    import detectkit.modules.metrics  # noqa: F401
    t = time.perf_counter()
    gts, dets, _ = generate(args.images, args.seed)
    gt_json, results = coco_json(gts, dets)
    batches = detectkit_inputs(gts, dets, args.batch_size)
    n_gt = sum(len(g["labels"]) for g in gts)
    print(f"generated {args.images} images, {n_gt} boxes ({n_gt / args.images:.1f}/image), "
          f"{sum(len(d) for d in dets)} detections in {time.perf_counter() - t:.1f}s", file=sys.stderr)

    methods = {"detectkit": run_detectkit, "pycocotools": run_pycocotools, "faster-coco-eval": run_faster_coco_eval}
    runs: dict[str, list[dict]] = {k: [] for k in methods}
    for rnd in range(args.rounds):
        for name, fn in methods.items():  # A B C A B C ...
            if name == "detectkit":
                call = functools.partial(fn, batches)
            else:  # fresh copies made before the clock starts (loadRes and COCOeval mutate them)
                call = functools.partial(fn, copy.deepcopy(gt_json), copy.deepcopy(results))
            out = timed_in_child(call)
            runs[name].append(out)
            print(f"round {rnd + 1} {name}: {out['seconds']:.2f}s map={out['map']:.6f}", file=sys.stderr)

    med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    cpu = {k: statistics.median(r["cpu_seconds"] for r in v) for k, v in runs.items()}
    print(f"\n{args.images} images, {args.rounds} interleaved rounds, {args.threads} thread(s), "
          f"{platform.processor() or platform.machine()}")
    print(f"{'method':<18}{'median s':>10}{'min s':>10}{'cpu s':>10}{'runs':>6}{'peak MB':>10}{'map':>10}{'map_50':>10}")
    for k, v in runs.items():
        print(f"{k:<18}{med[k]:>10.2f}{min(r['seconds'] for r in v):>10.2f}{cpu[k]:>10.2f}{len(v):>6}"
              f"{max(r['peak_mb'] for r in v):>10.0f}{v[0]['map']:>10.5f}{v[0]['map_50']:>10.5f}")

    first = {k: v[0] for k, v in runs.items()}
    keys = ("map", "map_50", "map_small", "mar_100")
    max_diff = max(abs(first[a][k] - first[b][k]) for k in keys for a in first for b in first)
    pc = np.array([first[k]["per_class"] for k in first])
    per_class_diff = float(np.abs(pc - pc[0]).max())
    summary = {
        "benchmark": "metric",
        "images": args.images,
        "rounds": args.rounds,
        "threads": args.threads,
        "seconds_median": {k: round(v, 3) for k, v in med.items()},
        "cpu_seconds_median": {k: round(v, 3) for k, v in cpu.items()},
        "map": {k: round(v["map"], 6) for k, v in first.items()},
        "map_50": {k: round(v["map_50"], 6) for k, v in first.items()},
        "max_abs_diff": max_diff,
        "per_class_ap_max_abs_diff": per_class_diff,
        "maps_equal_1e-4": bool(max_diff <= 1e-4 and per_class_diff <= 1e-4),
        "speedup_vs_pycocotools": round(med["pycocotools"] / med["detectkit"], 3),
        "detectkit_over_faster_coco_eval": round(med["detectkit"] / med["faster-coco-eval"], 3),
        "cpu_speedup_vs_pycocotools": round(cpu["pycocotools"] / cpu["detectkit"], 3),
        "cpu_detectkit_over_faster_coco_eval": round(cpu["detectkit"] / cpu["faster-coco-eval"], 3),
        "peak_mb": {k: round(max(r["peak_mb"] for r in v), 1) for k, v in runs.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
