"""The README's model table: parameters (unfused, fused), GFLOPs at 640 and CPU latency, every model.

    python benchmarks/bench_model_table.py [--size 640] [--runs 3] [--threads 1] [--models yolo_nas_s ...]

Latency is the median of ``--runs`` eager eval-mode forwards (decoded boxes + scores, no NMS) at
batch 1 after one warm-up, unfused and fused, under ``torch.inference_mode``. Prints a Markdown
table and one JSON line. Weights are random: speed and FLOPs do not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

# one timing and one FLOP-counting implementation for every benchmark
from bench_yolo_nas_inference import gflops, median_latency_ms  # noqa: E402  (same folder)

from detectkit import create_model, list_models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", nargs="*", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.rand(1, 3, args.size, args.size)
    rows = []
    # yolo_nas_custom is a family of architectures (arch=...), not one model of the table
    for name in args.models or [n for n in list_models() if not n.endswith("_custom")]:
        model = create_model(name).eval()
        params = sum(p.numel() for p in model.parameters())
        flops = gflops(model, args.size)
        unfused = median_latency_ms(model, x, warmup=1, runs=args.runs)
        model.fuse()
        rows.append({
            "model": name, "params": params, "params_fused": sum(p.numel() for p in model.parameters()),
            "gflops": round(flops, 2), "gflops_fused": round(gflops(model, args.size), 2),
            "latency_ms": round(unfused, 1), "latency_fused_ms": round(median_latency_ms(model, x, 1, args.runs), 1),
        })
        r = rows[-1]
        print(f"| {name} | {r['params']:,} | {r['params_fused']:,} | {r['gflops']:.1f} ({r['gflops_fused']:.1f}) "
              f"| {r['latency_ms']:.0f} ms ({r['latency_fused_ms']:.0f} ms) |", flush=True)
    print(json.dumps({"benchmark": "model_table", "size": args.size, "threads": args.threads, "runs": args.runs,
                      "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "rows": rows}))


if __name__ == "__main__":
    main()
