"""Compression on the quickstart data, on this CPU: INT8 vs FP32, pruning, distillation.

    python benchmarks/bench_compression.py [--checkpoint runs/quickstart/.../last.ckpt]

Without ``--checkpoint`` the quickstart model is trained first (``detectkit.quickstart``).
Every model is measured the same way: exported to ONNX (FP32 fused, or Q/DQ INT8), its
validation mAP computed from onnxruntime's outputs with the validation post-processing, and its
onnxruntime latency (batch 1, median of ``--runs``, ``--threads`` intra-op threads) at the
training size and at ``--deploy-size``. Rows:

* ``fp32``: the trained model; ``int8_ptq``: max-calibrated INT8 (modelopt, TensorRT's Q/DQ
  scheme) of it; ``int8_qat``: + ``--qat-epochs`` of QAT (if > 0); ``int8_ort``: onnxruntime's
  static QDQ INT8 of the FP32 graph (the CPU deployment path, see ``detectkit/export/ort_int8.py``).
* ``pruned``: half the MACs (torch-pruning, group-norm importance), no fine-tuning;
  ``pruned_ft``: + ``--finetune-epochs`` epochs; ``pruned_ft_kd``: same budget with distillation
  from the fp32 model.

``--no-train`` measures what needs no trained model (MACs, parameters, onnxruntime latency of
FP32, INT8 and the pruned graph of a freshly initialised yolo_nas_s) and reports mAP as not
measured: for CPUs too slow to train the quickstart model in the time at hand.

Prints a table, then one JSON line with every figure and the targets met or missed.
"""

from __future__ import annotations

import argparse
import copy
import json
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
    cfg["scale"] = tuple(cfg.get("scale", (0.5, 1.5)))
    cfg["num_workers"] = 0
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


def ort_session(path: str | Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


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


def onnx_latency_ms(path: Path, size: int, threads: int, runs: int) -> float:
    session = ort_session(path, threads)
    x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    for _ in range(5):
        session.run(None, {"images": x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, {"images": x})
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def export(model, path: Path, size: int, quantized: bool) -> Path:
    from detectkit.export.deploy import ExportConfig, export_detector

    model = copy.deepcopy(model).cpu().eval()
    if not quantized:
        model.fuse()
    export_detector(model, path, ExportConfig(image_size=size), check=True, exact=not quantized)
    return path


def finetune(model, dm, epochs: int, lr: float, callbacks=(), seed: int = 0):
    import lightning.pytorch as pl

    from detectkit.modules.detector import DetectionModule

    pl.seed_everything(seed, workers=True)
    model.train()  # Lightning keeps the submodules' modes: an eval-mode copy would train in eval mode
    module = DetectionModule(model, num_classes=model.num_classes, lr=lr, warmup_steps=5, final_lr_ratio=0.1)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=list(callbacks), default_root_dir=tempfile.mkdtemp())
    trainer.fit(module, datamodule=dm)
    return module.model.eval()


def measure(name: str, model, dm, work: Path, args, quantized: bool = False, extra: dict | None = None) -> dict[str, Any]:
    from detectkit.callbacks.pruning import count_macs_params

    size = dm.image_size
    row: dict[str, Any] = {"name": name}
    if not quantized:
        macs, params = count_macs_params(copy.deepcopy(model).eval(), args.deploy_size)
        row.update(gmacs=macs / 1e9, mparams=params / 1e6)
    path = export(model, work / f"{name}_{size}.onnx", size, quantized)
    if args.no_train:
        row.update(map=None, map_50=None)
    else:
        row.update(onnx_map(path, dm.val_dataloader(), args.threads))
    row["ms_train_size"] = onnx_latency_ms(path, size, args.threads, args.runs)
    deploy = export(model, work / f"{name}_{args.deploy_size}.onnx", args.deploy_size, quantized)
    row["ms_deploy_size"] = onnx_latency_ms(deploy, args.deploy_size, args.threads, args.runs)
    row.update(extra or {})
    print(f"  {name}: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})}",
          flush=True)
    return row


def measure_ort_int8(fp32, dm, work: Path, args, calib: list[torch.Tensor]) -> dict[str, Any]:
    """onnxruntime's static QDQ INT8 (the CPU deployment path) of the FP32 graphs, same calibration."""
    from detectkit.export.ort_int8 import quantize_for_onnxruntime

    size = dm.image_size
    row: dict[str, Any] = {"name": "int8_ort"}
    arrays = [x[i : i + 1].numpy() for x in calib for i in range(x.shape[0])]
    q = quantize_for_onnxruntime(work / f"fp32_{size}.onnx", work / f"int8_ort_{size}.onnx", arrays)
    if args.no_train:
        row.update(map=None, map_50=None)
    else:
        row.update(onnx_map(q, dm.val_dataloader(), args.threads))
    row["ms_train_size"] = onnx_latency_ms(q, size, args.threads, args.runs)
    import torch.nn.functional as F

    big = [F.interpolate(torch.from_numpy(a), size=args.deploy_size, mode="bilinear").numpy() for a in arrays[:16]]
    qd = quantize_for_onnxruntime(work / f"fp32_{args.deploy_size}.onnx", work / f"int8_ort_{args.deploy_size}.onnx", big)
    row["ms_deploy_size"] = onnx_latency_ms(qd, args.deploy_size, args.threads, args.runs)
    print(f"  int8_ort: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})}",
          flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="quickstart checkpoint (default: train one)")
    p.add_argument("--run-dir", default="runs/bench_compression")
    p.add_argument("--train-epochs", type=int, default=8, help="quickstart epochs when training here")
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--qat-epochs", type=int, default=1)
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--finetune-lr", type=float, default=5e-4)
    p.add_argument("--macs-ratio", type=float, default=0.5)
    p.add_argument("--deploy-size", type=int, default=640)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--only", choices=("all", "int8", "prune"), default="all", help="run one part")
    p.add_argument("--no-train", action="store_true", help="MACs/params/latency only, untrained yolo_nas_s")
    args = p.parse_args(argv)
    if args.no_train:
        args.finetune_epochs = args.qat_epochs = 0
    torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    work = run_dir / "onnx"
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()

    from detectkit.callbacks import KnowledgeDistillation, QuantizationAwareTraining
    from detectkit.callbacks.pruning import count_macs_params, prune_to_macs
    from detectkit.callbacks.quantization import quantize_model

    from detectkit.export.commands import load_for_export

    ckpt = args.checkpoint
    if args.no_train:
        ckpt = None
    elif ckpt is None:
        from detectkit.quickstart import run as quickstart

        print(f"training the quickstart model ({args.train_epochs} epochs)...", flush=True)
        summary = quickstart(output_dir=run_dir / "quickstart", overrides=["--trainer.max_epochs", str(args.train_epochs)])
        ckpt = summary["checkpoint"]
    dm = quickstart_datamodule(run_dir / "data")
    if args.no_train:
        from detectkit import create_model

        fp32 = create_model("yolo_nas_s", num_classes=dm.num_classes).eval()
    else:
        fp32 = load_for_export(None, ckpt).eval()
    rows = [measure("fp32", fp32, dm, work, args)]

    calib = [images for images, _ in batches(dm.train_dataloader(), args.calib_batches)]
    if args.only in ("all", "int8"):
        ptq = quantize_model(copy.deepcopy(fp32), calib, args.calib_batches).eval()
        rows.append(measure("int8_ptq", ptq, dm, work, args, quantized=True))
        rows.append(measure_ort_int8(fp32, dm, work, args, calib))
    if args.only in ("all", "int8") and args.qat_epochs > 0:
        qat_cb = QuantizationAwareTraining(start_epoch=0, calib_batches=args.calib_batches, lr_factor=1.0)
        qat = finetune(copy.deepcopy(fp32), dm, args.qat_epochs, args.finetune_lr * 0.1, [qat_cb])
        rows.append(measure("int8_qat", qat, dm, work, args, quantized=True))

    if args.only in ("all", "prune"):
        pruned = copy.deepcopy(fp32)
        base_macs = count_macs_params(pruned, dm.image_size)[0]
        prune_to_macs(pruned, args.macs_ratio * base_macs, image_size=dm.image_size, importance="group_norm")
        rows.append(measure("pruned", pruned, dm, work, args))
    if args.only in ("all", "prune") and args.finetune_epochs > 0:
        ft = finetune(copy.deepcopy(pruned), dm, args.finetune_epochs, args.finetune_lr)
        rows.append(measure("pruned_ft", ft, dm, work, args))
        kd = KnowledgeDistillation(teacher=copy.deepcopy(fp32), feat_weight=0.5, temperature=2.0)
        ft_kd = finetune(copy.deepcopy(pruned), dm, args.finetune_epochs, args.finetune_lr, [kd])
        rows.append(measure("pruned_ft_kd", ft_kd, dm, work, args))

    by = {r["name"]: r for r in rows}
    int8_rows = [r for r in rows if r["name"].startswith("int8")] or [by["fp32"]]
    best_int8 = max(int8_rows, key=lambda r: r["map_50"] or 0.0)
    pruned_best = by.get("pruned_ft_kd") or by.get("pruned_ft") or by.get("pruned") or by["fp32"]
    by.setdefault("pruned", by["fp32"])

    def drop(a, b):
        return None if a is None or b is None else 100 * (a - b)

    checks = {
        "int8_map50_drop_pts": drop(by["fp32"]["map_50"], best_int8["map_50"]),
        "int8_speedup_train_size": by["fp32"]["ms_train_size"] / min(r["ms_train_size"] for r in int8_rows),
        "int8_speedup_deploy_size": by["fp32"]["ms_deploy_size"] / min(r["ms_deploy_size"] for r in int8_rows),
        "pruned_macs_ratio": by["pruned"]["gmacs"] / by["fp32"]["gmacs"],
        "pruned_speedup_deploy_size": by["fp32"]["ms_deploy_size"] / by["pruned"]["ms_deploy_size"],
        "pruned_map50_drop_pts": drop(by["fp32"]["map_50"], pruned_best["map_50"]),
        "kd_gain_map50_pts": drop(by.get("pruned_ft_kd", {}).get("map_50"), by.get("pruned_ft", {}).get("map_50")),
    }
    targets = {
        "int8_within_1pt_map50": None if checks["int8_map50_drop_pts"] is None else checks["int8_map50_drop_pts"] <= 1.0,
        "int8_1.5x_faster": max(checks["int8_speedup_train_size"], checks["int8_speedup_deploy_size"]) >= 1.5,
        "pruned_half_macs_1.4x_faster": checks["pruned_macs_ratio"] <= 0.55
        and checks["pruned_speedup_deploy_size"] >= 1.4,
    }
    header = f"{'model':<14}{'GMACs@' + str(args.deploy_size):>12}{'Mparams':>9}{'mAP':>8}{'mAP50':>8}" \
             f"{'ms@' + str(dm.image_size):>9}{'ms@' + str(args.deploy_size):>9}"
    print("\n" + header)
    for r in rows:
        gm = f"{r['gmacs']:.2f}" if "gmacs" in r else "-"
        mp = f"{r['mparams']:.2f}" if "mparams" in r else "-"
        m, m50 = ("-", "-") if r["map"] is None else (f"{r['map']:.3f}", f"{r['map_50']:.3f}")
        print(f"{r['name']:<14}{gm:>12}{mp:>9}{m:>8}{m50:>8}{r['ms_train_size']:>9.1f}{r['ms_deploy_size']:>9.1f}")
    print()
    for k, v in {**checks, **targets}.items():
        print(f"{k}: {round(v, 3) if isinstance(v, float) else v}")
    print(json.dumps({"bench": "compression", "checkpoint": str(ckpt), "threads": args.threads,
                      "train_size": dm.image_size, "deploy_size": args.deploy_size, "rows": rows, **checks,
                      "targets": targets, "seconds": round(time.time() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
