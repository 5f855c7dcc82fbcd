"""detectkit's own-data laptop recipe vs ultralytics' default recipe, trained from scratch (issue 22).

detectkit: ``experiments/yolo_nas_s_laptop.yaml`` (YOLO-NAS-S), ultralytics: ``yolov8s.yaml`` with its
default training settings (no pretrained weights), on the same train/val split of
``../shared/data/raccoon_voc`` with the same image size, epochs, batch and loader workers. The split
is converted once with ``detectkit data convert`` (YOLO txt for ultralytics, COCO JSON for the scorer);
detectkit reads the VOC folder itself. Each side then predicts the validation images with ITS OWN
predictor at conf 0.001 and saves COCO results JSON; ONE scorer (pycocotools) scores both files, so
neither tool's built-in metric decides. The per-epoch curves come from each tool's own per-epoch
validation (detectkit's results.csv, ultralytics' results.csv): cheap, but two scorers.

The two sides run at the same time, each pinned to one core (``taskset -c 0`` detectkit,
``taskset -c 1`` ultralytics, one torch thread each); on a shared machine the other load shows in
both wall times. Prints a table, ONE JSON line, and writes ``<out>/recipe_map.png``.

    python benchmarks/bench_recipe.py [--epochs 8] [--imgsz 320] [--batch 8] [--workers 1] [--out DIR]

Needs ``.venv-peers`` (``make bench-recipe`` builds it); detectkit itself never imports ultralytics.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = (ROOT / ".." / "shared" / "data" / "raccoon_voc").resolve()
RECIPE = ROOT / "experiments" / "yolo_nas_s_laptop.yaml"
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
CONF = 0.001
SIDES = ("detectkit", "ultralytics")
CORES = {"detectkit": 0, "ultralytics": 1}

Curve = list[dict[str, float]]
"""Per-epoch rows ``{epoch (1-based), wall_s (cumulative), map_50, map}`` from a tool's own validation."""


# ----------------------------------------------------------------------------------------------- scoring


def coco_eval(gt_json: str | os.PathLike, results: list[dict[str, Any]]) -> dict[str, float]:
    """mAP50 and mAP50-95 of COCO result rows against a COCO ground-truth file (pycocotools, all images
    of the ground truth; an empty result list scores 0 instead of raising)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {"map_50": 0.0, "map": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its whole table
        gt = COCO(str(gt_json))
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"map_50": float(ev.stats[1]), "map": float(ev.stats[0])}


def gt_index(gt_json: str | os.PathLike) -> tuple[dict[str, int], dict[str, int]]:
    """``file name -> image id`` and ``class name -> category id`` of a COCO ground truth, the keys both
    sides' predictions are written with (so neither side's own id scheme matters)."""
    gt = json.loads(Path(gt_json).read_text())
    return ({im["file_name"]: im["id"] for im in gt["images"]}, {c["name"]: c["id"] for c in gt["categories"]})


def category_ids_for(class_names: list[str], name_to_id: dict[str, int]) -> list[int]:
    """A model's label -> the ground truth's category id, matched by class name."""
    missing = [n for n in class_names if n not in name_to_id]
    if missing:
        raise SystemExit(f"model classes {missing} are not in the ground truth's categories {sorted(name_to_id)}")
    return [name_to_id[n] for n in class_names]


# ------------------------------------------------------------------------------------------------ curves


def _read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [{k.strip(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(f)]


def detectkit_curve(results_csv: str | os.PathLike) -> Curve:
    """detectkit's results.csv (1-based ``epoch``, per-epoch ``epoch_time`` seconds, ``val/map*``)."""
    out: Curve = []
    wall = 0.0
    for row in _read_csv(results_csv):
        if not row.get("val/map"):
            continue
        wall += float(row.get("epoch_time") or 0.0)
        out.append({"epoch": int(row["epoch"]), "wall_s": wall, "map_50": float(row["val/map_50"]),
                    "map": float(row["val/map"])})
    return out


def ultralytics_curve(results_csv: str | os.PathLike) -> Curve:
    """ultralytics' results.csv (1-based ``epoch``, cumulative ``time`` seconds, ``metrics/mAP50(B)``)."""
    return [{"epoch": int(float(r["epoch"])), "wall_s": float(r.get("time") or "nan"),
             "map_50": float(r["metrics/mAP50(B)"]), "map": float(r["metrics/mAP50-95(B)"])}
            for r in _read_csv(results_csv)]


def at_wall_time(curve: Curve, seconds: float) -> dict[str, float] | None:
    """The last epoch finished within ``seconds`` of training (None when not even the first was)."""
    done = [row for row in curve if row["wall_s"] <= seconds * 1.0001]
    return done[-1] if done else None


# ------------------------------------------------------------------------------------------ the two sides


def _predict_rows(pairs: list[tuple[str, Any, Any, Any]], file_to_id: dict[str, int],
                  category_ids: list[int]) -> list[dict[str, Any]]:
    """COCO rows from ``(file path, xyxy boxes, scores, labels)`` per image, through detectkit's writer."""
    from detectkit.predict.writers import coco_rows

    rows: list[dict[str, Any]] = []
    for path, boxes, scores, labels in pairs:
        rows += coco_rows(file_to_id[Path(path).name], boxes, scores, labels, category_ids, decimals=2)
    return rows


def _run_logged(cmd: list[str], log: Path, env: dict[str, str]) -> float:
    """Run ``cmd`` with its output in ``log``; the wall seconds. A failure names the log."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if rc:
        raise SystemExit(f"{cmd[0]} failed (exit {rc}); see {log}")
    return time.perf_counter() - t0


def side_detectkit(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Fit the laptop recipe (the CLI, as a user runs it), then predict the val images from last.ckpt."""
    import detectkit
    from detectkit.predict.pipeline import predict

    run = work / "detectkit"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    cmd = [str(Path(sys.executable).with_name("detectkit")), "fit", "--config", str(RECIPE),
           "--data.data_dir", str(DATA), "--data.image_size", str(a.imgsz),
           "--data.loader.batch_size", str(a.batch), "--data.loader.num_workers", str(a.workers),
           "--trainer.max_epochs", str(a.epochs), "--trainer.default_root_dir", str(run)]
    train_s = _run_logged(cmd, work / "detectkit_fit.log", dict(os.environ))
    ckpt = max(run.rglob("checkpoints/last.ckpt"), key=os.path.getmtime)
    model = detectkit.load(ckpt)
    file_to_id, name_to_id = gt_index(a.gt)
    images = sorted(str(p) for p in Path(a.val_images).iterdir())
    t0 = time.perf_counter()
    preds = predict(model, images, conf=CONF, size=a.imgsz, batch_size=a.batch)
    pred_s = time.perf_counter() - t0
    ids = category_ids_for(list(model.class_names), name_to_id)
    rows = _predict_rows([(p.source, p.boxes, p.scores, p.labels) for p in preds], file_to_id, ids)
    curve = detectkit_curve(max(run.rglob("results.csv"), key=os.path.getmtime))
    return {"train_s": train_s, "predict_s": pred_s, "rows": rows, "curve": curve, "checkpoint": str(ckpt)}


def side_ultralytics(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """ultralytics' default recipe for YOLOv8s from its yaml (random init), then predict the val images
    from last.pt. plots=False: its plots fetch Arial.ttf, which must not be downloaded here (AMP, whose
    check fetches yolo11n.pt, is CUDA-only)."""
    from ultralytics import YOLO, settings

    settings.update({k: False for k in ("mlflow", "wandb", "tensorboard", "clearml", "comet", "dvc", "neptune",
                                        "raytune", "hub") if k in settings})  # loggers detectkit[all] installed
    run = work / "ultralytics"
    shutil.rmtree(run, ignore_errors=True)
    model = YOLO("yolov8s.yaml")
    t0 = time.perf_counter()
    model.train(data=str(a.data_yaml), epochs=a.epochs, imgsz=a.imgsz, batch=a.batch, workers=a.workers,
                device="cpu", project=str(work), name="ultralytics", exist_ok=True, pretrained=False,
                plots=False, amp=False, verbose=False)
    train_s = time.perf_counter() - t0
    last = run / "weights" / "last.pt"
    trained = YOLO(str(last))
    file_to_id, name_to_id = gt_index(a.gt)
    images = sorted(str(p) for p in Path(a.val_images).iterdir())
    t0 = time.perf_counter()
    results = list(trained.predict(images, conf=CONF, imgsz=a.imgsz, batch=a.batch, device="cpu",
                                   max_det=300, verbose=False, stream=True))
    pred_s = time.perf_counter() - t0
    names = [trained.names[i] for i in range(len(trained.names))]
    ids = category_ids_for(names, name_to_id)
    pairs = [(r.path, r.boxes.xyxy, r.boxes.conf, r.boxes.cls) for r in results]
    return {"train_s": train_s, "predict_s": pred_s, "rows": _predict_rows(pairs, file_to_id, ids),
            "curve": ultralytics_curve(run / "results.csv"), "checkpoint": str(last)}


def run_side(a: argparse.Namespace) -> None:
    """Child process: one side, its summary and predictions saved under ``<out>/<side>_*.json``."""
    import torch

    torch.set_num_threads(1)
    work = Path(a.out)
    out = (side_detectkit if a.side == "detectkit" else side_ultralytics)(a, work)
    (work / f"{a.side}_predictions.json").write_text(json.dumps(out.pop("rows")))
    (work / f"{a.side}_summary.json").write_text(json.dumps(out))


# ------------------------------------------------------------------------------------------ orchestration


def prepare_data(work: Path, src: Path = DATA) -> tuple[Path, Path, Path]:
    """The split as YOLO txt (for ultralytics) and COCO JSON (the scorer's ground truth), converted once
    with ``detectkit data convert`` into ``<out>/data``; returns (data.yaml, val images, val GT json)."""
    data = work / "data"
    yolo, coco = data / "yolo", data / "coco"
    exe = str(Path(sys.executable).with_name("detectkit"))
    for dst, fmt, extra in ((yolo, "yolo", []), (coco, "coco", ["--no-copy"])):
        if not dst.exists():
            subprocess.run([exe, "data", "convert", str(src), str(dst), "--to", fmt, *extra], check=True,
                           stdout=subprocess.DEVNULL, cwd=ROOT)
    return yolo / "data.yaml", yolo / "val" / "images", coco / "val" / "annotations.json"


def launch(a: argparse.Namespace, data_yaml: Path, val_images: Path, gt: Path) -> None:
    """Both sides at once, each pinned to its core with one thread; waits for both."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", YOLO_OFFLINE="1", YOLO_VERBOSE="False",
               NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="offline", YOLO_CONFIG_DIR=str(Path(a.out) / "yolo_cfg"))
    procs = {}
    for side in SIDES:
        py = sys.executable if side == "detectkit" else str(a.peers_python)
        cmd = ["taskset", "-c", str(CORES[side]), py, str(Path(__file__).resolve()), "--side", side,
               "--epochs", str(a.epochs), "--imgsz", str(a.imgsz), "--batch", str(a.batch),
               "--workers", str(a.workers), "--out", str(a.out), "--data-yaml", str(data_yaml),
               "--val-images", str(val_images), "--gt", str(gt)]
        log = open(Path(a.out) / f"{side}.log", "w")
        procs[side] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), log)
    failed = []
    for side, (proc, log) in procs.items():
        if proc.wait():
            failed.append(side)
        log.close()
    if failed:
        raise SystemExit(f"side(s) {failed} failed; see {', '.join(str(Path(a.out) / f'{s}.log') for s in failed)}")


def summarize(side: str, summary: dict[str, Any], scores: dict[str, float], epochs: int,
              n_train: int) -> dict[str, Any]:
    """One side's row: the shared scorer's mAPs, train wall time, train images/s (epochs x train images
    over the fit's wall time, its per-epoch validation included, as a user waits for it)."""
    return {"side": side, **{k: round(v, 4) for k, v in scores.items()}, "train_s": round(summary["train_s"], 1),
            "train_images_per_s": round(epochs * n_train / summary["train_s"], 3),
            "predict_s": round(summary["predict_s"], 1)}


def same_wall_time(curves: dict[str, Curve], train_s: dict[str, float]) -> dict[str, Any]:
    """Each side's own-validation mAP at the faster side's total training time (per-epoch curves)."""
    limit = min(train_s.values())
    return {"seconds": round(limit, 1),
            **{s: at_wall_time(c, limit) for s, c in curves.items()}}


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'side':<12} {'mAP50':>7} {'mAP50-95':>9} {'train s':>9} {'train img/s':>12} {'predict s':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['side']:<12} {r['map_50']:>7.4f} {r['map']:>9.4f} {r['train_s']:>9.1f} "
                     f"{r['train_images_per_s']:>12.3f} {r['predict_s']:>10.1f}")
    return "\n".join(lines)


def plot(curves: dict[str, Curve], finals: dict[str, dict[str, float]], path: Path, title: str) -> None:
    """mAP50-95 and mAP50 per epoch (each tool's own validation) with the shared scorer's final points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "map", "mAP50-95"), (axes[1], "map_50", "mAP50")):
        for side, color in zip(SIDES, ("tab:blue", "tab:orange")):
            c = curves[side]
            ax.plot([r["epoch"] for r in c], [r[key] for r in c], "o-", color=color, ms=3,
                    label=f"{side} (own per-epoch val)")
            if c:
                ax.plot([c[-1]["epoch"]], [finals[side][key]], "*", color=color, ms=13,
                        label=f"{side} final, pycocotools")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=8)  # ~35 min a side on one shared core at 320 px
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_recipe"))
    p.add_argument("--peers-python", default=str(PEERS_PYTHON), help="python of the ultralytics environment")
    # internal: one side in a pinned child process
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--data-yaml", help=argparse.SUPPRESS)
    p.add_argument("--val-images", help=argparse.SUPPRESS)
    p.add_argument("--gt", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.side:
        return run_side(a)
    if not Path(a.peers_python).exists():
        raise SystemExit(f"{a.peers_python} not found: build it with `make .venv-peers` (ultralytics lives there)")
    if shutil.which("taskset") is None:
        raise SystemExit("taskset (util-linux) is needed to pin each side to one core")
    work = Path(a.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    a.out = str(work)
    data_yaml, val_images, gt = prepare_data(work)
    n_train = sum(1 for _ in (data_yaml.parent / "train" / "images").iterdir())
    t0 = time.perf_counter()
    launch(a, data_yaml, val_images, gt)
    total = time.perf_counter() - t0

    rows, curves, finals, train_s = [], {}, {}, {}
    for side in SIDES:
        summary = json.loads((work / f"{side}_summary.json").read_text())
        finals[side] = coco_eval(gt, json.loads((work / f"{side}_predictions.json").read_text()))
        rows.append(summarize(side, summary, finals[side], a.epochs, n_train))
        curves[side], train_s[side] = summary["curve"], summary["train_s"]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared machine)"
    note = (f"raccoon_voc {n_train} train / {len(json.loads(gt.read_text())['images'])} val images, {a.imgsz} px, "
            f"{a.epochs} epochs, batch {a.batch}, {a.workers} loader worker(s), from scratch; both sides ran "
            f"concurrently, detectkit on core 0 (taskset -c 0), ultralytics on core 1 (taskset -c 1), one torch "
            f"thread each, on a shared machine (other users' load is in both wall times); scores: pycocotools "
            f"on each side's saved predictions at conf {CONF}")
    print(table(rows))
    print(note)
    png = work / "recipe_map.png"
    plot(curves, finals, png, f"detectkit yolo_nas_s_laptop vs ultralytics yolov8s.yaml: raccoon_voc, {a.imgsz} px, "
                              f"batch {a.batch}, from scratch, one core each (shared machine)")
    print(f"curve: {png}")
    print(json.dumps({"bench": "recipe", "machine": machine, "epochs": a.epochs, "imgsz": a.imgsz,
                      "batch": a.batch, "workers": a.workers, "wall_s": round(total, 1), "rows": rows,
                      "same_wall_time": same_wall_time(curves, train_s), "curves": curves, "note": note}))


if __name__ == "__main__":
    main()
