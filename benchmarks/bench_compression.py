"""Compression on the quickstart data, on this CPU: pruning + distillation, INT8, mixed precision.

    python benchmarks/bench_compression.py --checkpoint runs/quickstart/logs/version_0/checkpoints/last.ckpt

Without ``--checkpoint`` the quickstart model is trained first (``detectkit.cli.quickstart``).
Every model is measured the same way: exported to ONNX (FP32 fused, or Q/DQ INT8), its
validation mAP computed from onnxruntime's outputs with the validation post-processing (at the
training size), and its onnxruntime latency at ``--deploy-size`` (batch 1, ``--threads``
intra-op threads; each count in ``--threads`` is its own column). Latency runs are *interleaved*: every round times each model once, so load
changes on a shared machine hit every row alike; median and minimum of ``--runs`` rounds.

Rows (the fine-tuning budget is printed: epochs x training batches):

* ``dense``: the checkpoint's model.
* ``dense_ft``: the same model fine-tuned with the pruned rows' budget (same epochs, batches, lr,
  EMA), not pruned: the fair reference for what pruning costs, since the pruned rows train that
  much longer than the checkpoint did. It is also the default KD teacher (``--teacher``).
* ``pruned_ft``: ``--macs-ratio`` of the MACs, reached in ``--prune-steps`` steps with one
  fine-tuning epoch after each and ``--extra-epochs`` more (default 3 + 2 = the quickstart's own
  5 epochs; ``StructuredPruning``: layer-wise budgets from the pruning sensitivity ranking times
  each unit's onnxruntime time per MAC at ``--deploy-size`` (``detectkit.compress.latency``),
  BatchNorm recalibrated after each step), no distillation;
  ``pruned_ft_kd``: the same with ``KnowledgeDistillation`` from ``--teacher`` (default ``dense_ft``). The KD model is
  saved as a checkpoint and re-loaded through ``detectkit.load`` before export.
* ``int8_ort``: onnxruntime's static QDQ INT8 of the FP32 graph (the CPU deployment path);
  ``pruned_kd_int8_ort``: the same on the pruned + KD model.
* ``int8_mp_skipN``: modelopt PTQ (TensorRT's Q/DQ scheme, run by onnxruntime) with the ``N``
  layers most sensitive to INT8 (``quantization_sensitivity``) kept in float, N = 0, k, 2k.
* ``yolo_world_v2_s`` / ``yolo_world_v2_s_pruned``: MACs, parameters and latency of an
  untrained yolo_world_v2_s and its ``--macs-ratio`` prune (no YOLO-World checkpoint exists for
  the quickstart data, so mAP is not measured for these two rows).

Prints a table, then one JSON line with every figure and the targets met or missed.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from detectkit.export.onnx import ort_session  # noqa: E402
from detectkit.modules import OptimConfig

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"


def quickstart_datamodule(cache_dir: Path):
    from detectkit.data import DetectionDataModule
    from detectkit.data.synthetic import SyntheticConfig

    cfg = yaml.safe_load(QUICKSTART.read_text())["data"]
    syn = cfg.pop("synthetic", {})
    for k in ("object_size", "small_size"):
        if k in syn:
            syn[k] = tuple(syn[k])
    cfg["loader"] = {**cfg.get("loader", {}), "num_workers": 0}
    dm = DetectionDataModule(**cfg, synthetic=SyntheticConfig(**syn), cache_dir=str(cache_dir))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def batches(loader, n: int | None = None):
    for i, batch in enumerate(loader):
        if n is not None and i >= n:
            break
        images = batch["images"]
        yield (images.float() / 255.0 if images.dtype == torch.uint8 else images.float()), batch


def thread_counts(text: str) -> list[int]:
    counts = [int(t) for t in text.split(",") if t.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"--threads: positive integers separated by commas, got {text!r}")
    return counts


def onnx_map(path: Path, loader, threads: int) -> dict[str, float]:
    """Validation mAP from onnxruntime's boxes/scores with the training module's val post-processing."""
    from detectkit.modules.metrics import build_map_metric, metric_inputs
    from detectkit.ops.nms import postprocess

    session = ort_session(path, threads)
    metric = build_map_metric()
    for images, batch in batches(loader):
        for i in range(images.shape[0]):  # the graphs are exported with dynamic batch; batch 1 keeps it simple
            boxes, scores = session.run(None, {"images": images[i : i + 1].numpy()})
            dets = postprocess(torch.from_numpy(boxes), torch.from_numpy(scores), conf=0.01, iou=0.7, top_k=1000,
                               max_det=300)
            preds, targets = metric_inputs(dets, [batch["meta"][i]])
            metric.update(preds, targets)
    result = metric.compute()
    return {"map": float(result["map"]), "map_50": float(result["map_50"])}


def interleaved_latency_ms(paths: dict[str, Path], size: int, threads: int, runs: int) -> dict[str, dict[str, float]]:
    """Median and minimum ms per model; each round runs every model once (same load for all)."""
    sessions = {name: ort_session(p, threads) for name, p in paths.items()}
    x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    for session in sessions.values():  # warm-up
        for _ in range(2):
            session.run(None, {"images": x})
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, session in sessions.items():
            t = time.perf_counter()
            session.run(None, {"images": x})
            times[name].append((time.perf_counter() - t) * 1000)
    return {name: {"median": statistics.median(v), "min": min(v)} for name, v in times.items()}


def export(model, path: Path, size: int, quantized: bool) -> Path:
    from detectkit.export.deploy import ExportConfig, export_detector

    model = copy.deepcopy(model).cpu().eval()
    if not quantized:
        model.fuse()
    export_detector(model, path, ExportConfig(image_size=size), check=True, exact=not quantized)
    return path


def finetune(model, dm, epochs: int, lr: float, callbacks=(), train_batches: int | None = None, seed: int = 0,
             save: Path | None = None):
    """Fine-tune ``model`` with ``callbacks`` (+ the quickstart EMA); returns the module's detector."""
    import lightning.pytorch as pl

    from detectkit.modules.detector import DetectionModule
    from detectkit.modules.ema import ModelEMA

    pl.seed_everything(seed, workers=True)
    model.train()  # Lightning keeps the submodules' modes: an eval-mode copy would train in eval mode
    module = DetectionModule(model, num_classes=model.num_classes,
                             optim=OptimConfig(lr=lr, warmup_steps=5, final_lr_ratio=0.1))
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, limit_train_batches=train_batches,
                         callbacks=[ModelEMA(decay=0.9997, decay_type="threshold"), *callbacks],
                         default_root_dir=tempfile.mkdtemp())
    trainer.fit(module, datamodule=dm)
    if save is not None:
        trainer.save_checkpoint(save)
    return module.model.eval()


def model_row(name: str, model, dm, work: Path, args, quantized: bool = False, score: bool = True) -> dict[str, Any]:
    """MACs/params (float models), ONNX at the training size (mAP) and at the deploy size (latency later)."""
    from detectkit.compress.prune import count_macs_params

    row: dict[str, Any] = {"name": name}
    if not quantized:
        macs, params = count_macs_params(copy.deepcopy(model).eval(), args.deploy_size)
        row.update(gmacs=macs / 1e9, mparams=params / 1e6)
    if score:
        path = export(model, work / f"{name}_{dm.image_size}.onnx", dm.image_size, quantized)
        row.update(onnx_map(path, dm.val_dataloader(), max(args.threads)))
    else:
        row.update(map=None, map_50=None)
    row["onnx"] = str(export(model, work / f"{name}_{args.deploy_size}.onnx", args.deploy_size, quantized))
    print(f"  {name}: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})}",
          flush=True)
    return row


def ort_int8_row(name: str, fp32_name: str, dm, work: Path, args, calib: list[torch.Tensor]) -> dict[str, Any]:
    """onnxruntime's static QDQ INT8 (the CPU deployment path) of ``fp32_name``'s graphs."""
    import torch.nn.functional as F

    from detectkit.export.ort_int8 import quantize_for_onnxruntime

    arrays = [x[i : i + 1].numpy() for x in calib for i in range(x.shape[0])]
    q = quantize_for_onnxruntime(work / f"{fp32_name}_{dm.image_size}.onnx", work / f"{name}_{dm.image_size}.onnx",
                                 arrays)
    row: dict[str, Any] = {"name": name, **onnx_map(q, dm.val_dataloader(), max(args.threads))}
    big = [F.interpolate(torch.from_numpy(a), size=args.deploy_size, mode="bilinear").numpy() for a in arrays[:16]]
    row["onnx"] = str(quantize_for_onnxruntime(work / f"{fp32_name}_{args.deploy_size}.onnx",
                                               work / f"{name}_{args.deploy_size}.onnx", big))
    print(f"  {name}: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})}",
          flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="quickstart checkpoint (default: train one)")
    p.add_argument("--run-dir", default="runs/bench_compression")
    p.add_argument("--train-epochs", type=int, default=5, help="quickstart epochs when training here")
    p.add_argument("--prune-steps", type=int, default=3, help="pruning steps, one fine-tuning epoch after each")
    p.add_argument("--extra-epochs", type=int, default=2,
                   help="fine-tuning epochs after the last step (default: 3 + 2 = the quickstart's 5 epochs)")
    p.add_argument("--train-batches", type=int, default=None, help="training batches per epoch (default: all)")
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--macs-ratio", type=float, default=0.5)
    p.add_argument("--latency-strength", type=float, default=1.0,
                   help="layer budgets: exponent of each unit's onnxruntime time per MAC at --deploy-size (0: MACs only)")
    p.add_argument("--teacher", choices=("dense_ft", "dense"), default="dense_ft",
                   help="KD teacher: the dense model fine-tuned with the same budget (default) or the checkpoint as is")
    p.add_argument("--kd-weight", type=float, default=1.0)
    p.add_argument("--kd-feat-weight", type=float, default=0.5)
    p.add_argument("--kd-temperature", type=float, default=2.0)
    p.add_argument("--mixed-k", type=int, default=2, help="k: mixed-precision rows skip 0, k and 2k layers")
    p.add_argument("--deploy-size", type=int, default=640)
    p.add_argument("--threads", type=thread_counts, default=[1, 2],
                   help="onnxruntime intra-op threads, comma-separated: one latency column each (first: "
                        "the pruning latency profile and mAP runs)")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--only", default="all",
                   help="comma-separated parts: prune (pruned_ft, pruned_ft_kd, pruned + INT8), int8 (int8_ort), "
                        "mixed (int8_mp_skip*), world (yolo_world_v2_s rows); default all")
    args = p.parse_args(argv)
    parts = {"prune", "int8", "mixed", "world"} if args.only == "all" else set(args.only.split(","))
    if not parts <= {"prune", "int8", "mixed", "world"}:
        p.error(f"--only: unknown part in {args.only!r}")
    torch.set_num_threads(max(args.threads))
    handler = logging.StreamHandler()  # detectkit's own INFO lines (pruning steps, ranking, time-per-MAC
    handler.setFormatter(logging.Formatter("  %(name)s: %(message)s"))  # multipliers); Lightning's stay as they are
    logging.getLogger("detectkit").addHandler(handler)
    logging.getLogger("detectkit").setLevel(logging.INFO)
    run_dir = Path(args.run_dir)
    work = run_dir / "onnx"
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()

    from detectkit.callbacks import KnowledgeDistillation, StructuredPruning

    import detectkit
    from detectkit.compress.quantize import quantize_model
    from detectkit.compress.sensitivity import quantization_sensitivity, select_skip_layers

    ckpt = args.checkpoint
    if ckpt is None:
        from detectkit.cli.quickstart import run as quickstart

        print(f"training the quickstart model ({args.train_epochs} epochs)...", flush=True)
        summary = quickstart(output_dir=run_dir / "quickstart", overrides=["--trainer.max_epochs", str(args.train_epochs)])
        ckpt = summary["checkpoint"]
    dm = quickstart_datamodule(run_dir / "data")
    dense = detectkit.load(ckpt, device="cpu").eval()
    rows = [model_row("dense", dense, dm, work, args)]
    calib = [images for images, _ in batches(dm.train_dataloader(), args.calib_batches)]
    epochs = args.prune_steps + args.extra_epochs
    n_batches = args.train_batches or len(dm.train_dataloader())
    budget = {"epochs": epochs, "train_batches_per_epoch": n_batches, "train_steps": epochs * n_batches,
              "batch_size": dm.batch_size, "finetune_lr": args.finetune_lr,
              "prune_steps": args.prune_steps, "macs_ratio_target": args.macs_ratio}

    if "prune" in parts:
        def pruning():
            return StructuredPruning(target_macs_ratio=args.macs_ratio, steps=args.prune_steps, epochs_between=1,
                                     image_size=dm.image_size, layerwise=True, calib_batches=4,
                                     latency_size=args.deploy_size if args.latency_strength else None,
                                     latency_strength=args.latency_strength, latency_threads=args.threads[0])

        print(f"fine-tuning budget: {budget}", flush=True)
        dense_ft = finetune(copy.deepcopy(dense), dm, epochs, args.finetune_lr, [], args.train_batches,
                            save=run_dir / "dense_ft.ckpt")  # kept: the teacher, reusable as a checkpoint
        rows.append(model_row("dense_ft", dense_ft, dm, work, args))
        budget["kd_teacher"] = args.teacher
        teacher = dense_ft if args.teacher == "dense_ft" else dense
        kd = KnowledgeDistillation(teacher=copy.deepcopy(teacher), weight=args.kd_weight,
                                   feat_weight=args.kd_feat_weight, temperature=args.kd_temperature)
        saved = run_dir / "pruned_kd.ckpt"
        first = pruning()
        finetune(copy.deepcopy(dense), dm, epochs, args.finetune_lr, [first, kd], args.train_batches, save=saved)
        ft_kd = detectkit.load(saved, device="cpu")  # the pruned architecture comes back from the record
        kd_row = model_row("pruned_ft_kd", ft_kd, dm, work, args)
        # the no-KD run prunes with the same layer budgets (same dense model, same batches): the
        # ranking and latency profile are computed once and handed over as the callback's state
        second = pruning()
        second.load_state_dict({"unit_weights": first.unit_weights,
                                "sensitivity": [list(t) for t in first.sensitivity]})
        ft = finetune(copy.deepcopy(dense), dm, epochs, args.finetune_lr, [second], args.train_batches)
        rows += [model_row("pruned_ft", ft, dm, work, args), kd_row]
        budget["unit_weights"] = {u: round(w, 3) for u, w in first.unit_weights.items()}
    if "int8" in parts:
        rows.append(ort_int8_row("int8_ort", "dense", dm, work, args, calib))
    if "prune" in parts:
        rows.append(ort_int8_row("pruned_kd_int8_ort", "pruned_ft_kd", dm, work, args, calib))
    if "mixed" in parts:
        sens = quantization_sensitivity(dense, calib, num_batches=2)
        for k in (0, args.mixed_k, 2 * args.mixed_k):
            q = quantize_model(copy.deepcopy(dense), calib, args.calib_batches, skip_layers=select_skip_layers(sens, k))
            row = model_row(f"int8_mp_skip{k}", q.eval(), dm, work, args, quantized=True)
            row["float_layers"] = select_skip_layers(sens, k)
            rows.append(row)
    if "world" in parts:
        from detectkit.compress.prune import count_macs_params, prune_to_macs
        from detectkit.registry import create_model

        world = create_model("yolo_world_v2_s", num_classes=dm.num_classes).eval()
        rows.append(model_row("yolo_world_v2_s", world, dm, work, args, score=False))
        base = count_macs_params(world, dm.image_size)[0]
        try:
            prune_to_macs(world, args.macs_ratio * base, image_size=dm.image_size)
            rows.append(model_row("yolo_world_v2_s_pruned", world, dm, work, args, score=False))
        except RuntimeError as e:  # reported, not fatal: the rest of the table stands
            print(f"  yolo_world_v2_s_pruned: not pruned: {e}", flush=True)

    for n in args.threads:
        lat = interleaved_latency_ms({r["name"]: Path(r["onnx"]) for r in rows}, args.deploy_size, n, args.runs)
        for r in rows:
            r[f"ms_median_t{n}"], r[f"ms_min_t{n}"] = lat[r["name"]]["median"], lat[r["name"]]["min"]
    by = {r["name"]: r for r in rows}

    def speedup(name, ref="dense", n=args.threads[0]):
        return by[ref][f"ms_median_t{n}"] / by[name][f"ms_median_t{n}"] if name in by else None

    def speedups(name, ref="dense"):
        return {n: speedup(name, ref, n) for n in args.threads} if name in by else None

    checks: dict[str, Any] = {"load": os.getloadavg()}
    if "pruned_ft_kd" in by:
        checks.update(
            pruned_macs_ratio=by["pruned_ft_kd"]["gmacs"] / by["dense"]["gmacs"],
            pruned_kd_map_drop=by["dense"]["map"] - by["pruned_ft_kd"]["map"],
            pruned_noKD_map_drop=by["dense"]["map"] - by["pruned_ft"]["map"],
            kd_gain_map=by["pruned_ft_kd"]["map"] - by["pruned_ft"]["map"],
            pruned_kd_map_drop_vs_dense_ft=by["dense_ft"]["map"] - by["pruned_ft_kd"]["map"],
            pruned_noKD_map_drop_vs_dense_ft=by["dense_ft"]["map"] - by["pruned_ft"]["map"],
            pruned_speedup=speedups("pruned_ft_kd"),
            pruned_int8_speedup=speedups("pruned_kd_int8_ort"),
        )
        checks["targets"] = {"pruned_kd_within_0.02_map_of_dense": checks["pruned_kd_map_drop"] <= 0.02,
                             "pruned_kd_within_0.02_map_of_dense_ft": checks["pruned_kd_map_drop_vs_dense_ft"] <= 0.02,
                             "pruned_1.6x_faster": {n: v >= 1.6 for n, v in checks["pruned_speedup"].items()},
                             "kd_ahead_of_no_kd": checks["kd_gain_map"] > 0}
    if "int8_ort" in by:
        checks.update(int8_ort_speedup=speedups("int8_ort"), int8_ort_map_drop=by["dense"]["map"] - by["int8_ort"]["map"])
    if "yolo_world_v2_s_pruned" in by:
        checks.update(world_pruned_macs_ratio=by["yolo_world_v2_s_pruned"]["gmacs"] / by["yolo_world_v2_s"]["gmacs"],
                      world_pruned_speedup=speedups("yolo_world_v2_s_pruned", "yolo_world_v2_s"))

    header = (f"{'model':<24}{'GMACs@' + str(args.deploy_size):>12}{'Mparams':>9}{'mAP':>8}{'mAP50':>8}"
              + "".join(f"{f'ms med {n}t':>11}{f'min {n}t':>9}{f'x {n}t':>7}" for n in args.threads))
    print(f"\nbudget: {budget}; latency at {args.deploy_size}: {args.runs} interleaved rounds per thread count, "
          f"load {checks['load']}\n" + header)
    for r in rows:
        gm = f"{r['gmacs']:.2f}" if "gmacs" in r else "-"
        mp = f"{r['mparams']:.2f}" if "mparams" in r else "-"
        m, m50 = ("-", "-") if r["map"] is None else (f"{r['map']:.3f}", f"{r['map_50']:.3f}")
        ref = "yolo_world_v2_s" if r["name"].startswith("yolo_world") else "dense"
        print(f"{r['name']:<24}{gm:>12}{mp:>9}{m:>8}{m50:>8}"
              + "".join(f"{r[f'ms_median_t{n}']:>11.1f}{r[f'ms_min_t{n}']:>9.1f}{speedup(r['name'], ref, n):>7.2f}"
                        for n in args.threads))
    print()
    for k, v in checks.items():
        print(f"{k}: {round(v, 4) if isinstance(v, float) else v}")
    print(json.dumps({"bench": "compression", "checkpoint": str(ckpt), "threads": args.threads, "budget": budget,
                      "train_size": dm.image_size, "deploy_size": args.deploy_size, "rows": rows, **checks,
                      "seconds": round(time.time() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
