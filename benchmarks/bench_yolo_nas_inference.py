"""YOLO-NAS eager CPU latency (unfused vs fused), parameter counts and GFLOPs.

    python benchmarks/bench_yolo_nas_inference.py [--runs 10] [--threads 2] [--sizes 320 640] [--batches 1 8]

Prints a table and one JSON line (``{"benchmark": "yolo_nas_inference", ...}``). Latency is the
median of ``--runs`` timed forwards after ``--warmup`` untimed ones, under ``torch.inference_mode``,
of the eval-mode forward (decoded boxes + scores, no NMS). Weights are random: speed and FLOPs do
not depend on their values.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from detectkit import create_model


def median_latency_ms(model: torch.nn.Module, x: torch.Tensor, warmup: int, runs: int) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gflops(model: torch.nn.Module, size: int) -> float:
    """Forward GFLOPs at batch 1 (FlopCounterMode counts a multiply-add as 2 FLOPs)."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.rand(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="yolo_nas_s")
    ap.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--flops-models", nargs="+", default=["yolo_nas_s", "yolo_nas_m", "yolo_nas_l"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = create_model(args.model).eval()
    fused = copy.deepcopy(model).fuse(full=True)
    latency = []
    for size in args.sizes:
        for batch in args.batches:
            x = torch.rand(batch, 3, size, size)
            row = {"size": size, "batch": batch}
            for name, m in (("unfused", model), ("fused", fused)):
                row[f"{name}_ms"] = round(median_latency_ms(m, x, args.warmup, args.runs), 2)
            row["speedup"] = round(row["unfused_ms"] / row["fused_ms"], 3)
            latency.append(row)
            print(f"  {args.model} {size}x{size} b{batch}: unfused {row['unfused_ms']} ms, fused {row['fused_ms']} ms", flush=True)

    models = []
    for name in args.flops_models:
        m = create_model(name).eval()
        f = copy.deepcopy(m).fuse(full=True)
        models.append({
            "model": name,
            "params": n_params(m),
            "params_fused": n_params(f),
            "gflops_640": round(gflops(m, 640), 2),
            "gflops_640_fused": round(gflops(f, 640), 2),
        })

    print(f"\nYOLO-NAS eager CPU latency, median of {args.runs} (ms), torch {torch.__version__}, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}")
    print(f"{'model':<12}{'size':>6}{'batch':>7}{'unfused':>10}{'fused':>10}{'speedup':>9}")
    for r in latency:
        print(f"{args.model:<12}{r['size']:>6}{r['batch']:>7}{r['unfused_ms']:>10.1f}{r['fused_ms']:>10.1f}{r['speedup']:>9.2f}")
    print(f"\n{'model':<12}{'params':>14}{'params fused':>14}{'GFLOPs@640':>12}{'fused':>10}")
    for r in models:
        print(f"{r['model']:<12}{r['params']:>14,}{r['params_fused']:>14,}{r['gflops_640']:>12.2f}{r['gflops_640_fused']:>10.2f}")
    print(json.dumps({
        "benchmark": "yolo_nas_inference", "torch": torch.__version__, "threads": args.threads,
        "runs": args.runs, "warmup": args.warmup, "model": args.model, "latency": latency, "models": models,
    }))


if __name__ == "__main__":
    main()
