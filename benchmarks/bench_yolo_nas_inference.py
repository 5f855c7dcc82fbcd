"""YOLO-NAS CPU inference latency: the speed options against the previous default path; params, GFLOPs.

    taskset -c 1 python benchmarks/bench_yolo_nas_inference.py [--runs 10] [--threads 1] [--sizes 320 640]
        [--batches 1 8] [--variants unfused,fused,fused+channels_last,fused+compile]

Variants: ``unfused`` is detectkit's previous default path (eager, contiguous, Conv+BN unfused);
``fused`` folds BN and the QARepVGG branches (``fuse(full=True)``); ``+channels_last`` runs model
and input NHWC; ``+compile`` is ``torch.compile`` (inductor, weights frozen as constants; compile
time printed separately). Forwards of every variant are interleaved (rotating order) under
``torch.no_grad`` (inference_mode for eager); prints median / min / count ms and the speedup
over the first variant, a table of params/GFLOPs, then one JSON line
(``{"benchmark": "yolo_nas_inference", ...}``). The forward is the eval-mode one (decoded boxes +
scores, no NMS). Weights are random: speed and FLOPs do not depend on their values.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time

import torch
from bench_train_step import interleaved, summary
from torch.utils.flop_counter import FlopCounterMode

from detectkit import create_model
from detectkit.models.speed import set_channels_last

VARIANTS = ("unfused", "fused", "fused+channels_last", "fused+compile", "fused+channels_last+compile")


def build_variant(model: torch.nn.Module, variant: str, x: torch.Tensor):
    """A no-argument forward of ``variant`` on ``x`` and its first-call (compile) seconds."""
    parts = variant.split("+")
    unknown = set(parts) - {"unfused", "fused", "channels_last", "compile"}
    if unknown or parts[0] not in ("unfused", "fused"):
        raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    m = copy.deepcopy(model).eval()
    if parts[0] == "fused":
        m.fuse(full=True)
    if "channels_last" in parts:
        set_channels_last(m)  # images stay NCHW, as DetectionModule does
    run = m
    if "compile" in parts:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # weights folded as constants (oneDNN pre-packing on CPU)
        run = torch.compile(m, dynamic=False)

    def forward():
        with torch.no_grad():
            return run(x)

    t0 = time.perf_counter()
    forward()
    return forward, time.perf_counter() - t0


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
    ap.add_argument("--variants", default="unfused,fused,fused+channels_last,fused+compile",
                    help=f"comma-separated, first is the baseline; from {', '.join(VARIANTS)}")
    ap.add_argument("--flops-models", nargs="+", default=["yolo_nas_s", "yolo_nas_m", "yolo_nas_l"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    torch.manual_seed(0)

    model = create_model(args.model).eval()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    latency = []
    for size in args.sizes:
        for batch in args.batches:
            x = torch.rand(batch, 3, size, size)
            work, first = {}, {}
            for name in names:
                work[name], first[name] = build_variant(model, name, x)
                for _ in range(args.warmup):
                    work[name]()
            rows = summary(interleaved(work, args.runs), names[0], batch)
            for r in rows:
                r.update(size=size, batch=batch, first_call_s=round(first[r["variant"]], 2))
                print(f"  {args.model} {size}x{size} b{batch} {r['variant']}: median {1e3 * r['median_s']:.1f} ms, "
                      f"speedup {r['speedup_vs_' + names[0]]:.2f}", flush=True)
            latency.extend(rows)

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

    print(f"\nYOLO-NAS CPU latency (ms), interleaved, {args.runs} runs each, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.2f}; speedup vs {names[0]}")
    print(f"{'model':<12}{'size':>6}{'batch':>7}  {'variant':<30}{'median':>9}{'min':>9}{'n':>4}{'speedup':>9}{'1st call s':>11}")
    for r in latency:
        print(f"{args.model:<12}{r['size']:>6}{r['batch']:>7}  {r['variant']:<30}{1e3 * r['median_s']:>9.1f}"
              f"{1e3 * r['min_s']:>9.1f}{r['count']:>4}{r['speedup_vs_' + names[0]]:>9.2f}{r['first_call_s']:>11.1f}")
    print(f"\n{'model':<12}{'params':>14}{'params fused':>14}{'GFLOPs@640':>12}{'fused':>10}")
    for r in models:
        print(f"{r['model']:<12}{r['params']:>14,}{r['params_fused']:>14,}{r['gflops_640']:>12.2f}{r['gflops_640_fused']:>10.2f}")
    print(json.dumps({
        "benchmark": "yolo_nas_inference", "torch": torch.__version__, "threads": args.threads,
        "runs": args.runs, "warmup": args.warmup, "model": args.model, "latency": latency, "models": models,
    }))


if __name__ == "__main__":
    main()
