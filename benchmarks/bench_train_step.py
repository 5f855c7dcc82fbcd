"""YOLO-NAS-S train step (forward, PPYOLOE loss, backward, AdamW): speed options vs the old default path.

    taskset -c 1 python benchmarks/bench_train_step.py [--size 320] [--batch 8] [--runs 5] [--threads 1]
        [--variants eager,channels_last,compile] [--model yolo_nas_s] [--device cpu]

Every variant trains its own copy of the same weights through ``DetectionModule.run_model`` /
``compute_loss`` (the path ``training_step`` takes): ``eager`` is detectkit's previous default
(eager, contiguous NCHW, fp32); ``channels_last``, ``compile`` (inductor) and ``bf16`` (autocast,
loss in fp32) are the options. Steps are interleaved (A B C, B C A, ...) so load changes hit
every variant alike; prints median / min / count seconds per step and the speedup of each variant
over ``eager`` (median over median), then one JSON line. Compile time (the first step) is
reported separately. ``--profile N`` then profiles one more step of each variant
(``torch.profiler``) and prints its N most expensive operators by self time, with their share.
Pin to one core (``taskset -c 1``) and set OMP_WAIT_POLICY=PASSIVE on a
shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from detectkit.modules import DetectionModule, param_groups  # noqa: E402

VARIANTS = {  # name -> DetectionModule speed options, autocast dtype
    "eager": ({}, None),
    "channels_last": ({"channels_last": True}, None),
    "compile": ({"compile": {"dynamic": False}}, None),
    "channels_last+compile": ({"channels_last": True, "compile": {"dynamic": False}}, None),
    "bf16": ({}, torch.bfloat16),
}


def synthetic_targets(batch: int, size: int, per_image: int = 4, num_classes: int = 80) -> torch.Tensor:
    """Fixed random boxes (batch_index, class, x1, y1, x2, y2): the assigner does real work."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for b in range(batch):
        for _ in range(per_image):
            wh = torch.rand(2, generator=g) * size * 0.4 + size * 0.05
            xy = torch.rand(2, generator=g) * (size - wh)
            cls = float(torch.randint(num_classes, (1,), generator=g))
            rows.append([b, cls, *xy.tolist(), *(xy + wh).tolist()])
    return torch.tensor(rows, dtype=torch.float32)


def interleaved(work: dict[str, Callable[[], object]], runs: int, sync: Callable[[], None] = lambda: None
                ) -> dict[str, list[float]]:
    """Seconds per call of each callable, called in rotating order ``runs`` times each."""
    names = list(work)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for i in range(runs):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            sync()
            t0 = time.perf_counter()
            result = work[name]()
            sync()
            seconds[name].append(time.perf_counter() - t0)
            del result
    return seconds


def summary(seconds: dict[str, list[float]], baseline: str, items: int) -> list[dict]:
    base = statistics.median(seconds[baseline])
    return [{"variant": n, "median_s": round(statistics.median(s), 4), "min_s": round(min(s), 4), "count": len(s),
             "items_per_s": round(items / statistics.median(s), 2),
             "speedup_vs_" + baseline: round(base / statistics.median(s), 3)} for n, s in seconds.items()]


def make_step(model_name: str, state: dict, variant: str, size: int, batch: int, device: str) -> Callable[[], object]:
    options, dtype = VARIANTS[variant]
    module = DetectionModule(model_name, num_classes=80, **options).to(device).train()
    module.model.load_state_dict(state)
    opt = torch.optim.AdamW(param_groups(module.model, 1e-5), lr=2e-4)
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    targets = synthetic_targets(batch, size).to(device)
    dev = device.split(":")[0]

    def step():
        with torch.autocast(device_type=dev, dtype=dtype or torch.float32, enabled=dtype is not None):
            head = module.run_model(x)
        loss, _ = module.compute_loss(head, targets, batch)  # fp32 whatever the autocast (as training_step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def top_ops(step: Callable[[], object], n: int) -> list[dict]:
    """The ``n`` operators with the most self time (CPU, or CUDA when present) in one profiled step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        step()
    events = prof.key_averages()
    attr = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events) or 1.0
    ranked = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:n]
    return [{"op": e.key, "self_ms": round(getattr(e, attr) / 1000, 2), "share": round(getattr(e, attr) / total, 4),
             "calls": e.count} for e in ranked]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="yolo_nas_s")
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, print the N top operators (self time) of one step of each variant")
    p.add_argument("--variants", default="eager,channels_last,compile",
                   help=f"comma-separated, first is the baseline; from {', '.join(VARIANTS)}")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    torch.manual_seed(0)
    state = DetectionModule(args.model, num_classes=80).model.state_dict()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    work, first = {}, {}
    for name in names:
        work[name] = make_step(args.model, state, name, args.size, args.batch, args.device)
        t0 = time.perf_counter()
        for _ in range(args.warmup):  # the first step compiles
            work[name]()
        sync()
        first[name] = round(time.perf_counter() - t0, 2)
    rows = summary(interleaved(work, args.runs, sync), names[0], args.batch)
    print(f"{args.model} train step, {args.size}x{args.size}, batch {args.batch}, {args.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}")
    print(f"{'variant':<24}{'median s':>10}{'min s':>9}{'n':>4}{'images/s':>10}{'speedup':>9}{'warmup s':>10}")
    for r in rows:
        print(f"{r['variant']:<24}{r['median_s']:>10.3f}{r['min_s']:>9.3f}{r['count']:>4}{r['items_per_s']:>10.2f}"
              f"{r['speedup_vs_' + names[0]]:>9.2f}{first[r['variant']]:>10.1f}")
    profiles = {name: top_ops(work[name], args.profile) for name in names} if args.profile else {}
    for name, ops in profiles.items():
        print(f"\ntop {args.profile} operators by self time, one step, {name}:")
        for op in ops:
            print(f"  {op['op']:<48}{op['self_ms']:>10.1f} ms{op['share'] * 100:>7.1f} %{op['calls']:>7} calls")
    print(json.dumps({"benchmark": "train_step", "model": args.model, "device": args.device, "size": args.size,
                      "batch": args.batch, "threads": torch.get_num_threads(), "baseline": names[0],
                      "warmup_s": first, "results": rows, "profiles": profiles}))


if __name__ == "__main__":
    main()
