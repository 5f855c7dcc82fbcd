"""detectkit vs ultralytics on identical work, side by side in one run (issue 15).

Every case runs in a fresh subprocess pinned with ``taskset`` (1 thread: one core, ``--core``; 2 threads:
``--cores2``) with ``torch.set_num_threads(t)``; inside it both sides are set up once (untimed), warmed
up, then called alternately A B A B ... so load changes hit both equally. Prints a table of median and
minimum seconds per call, run count, throughput and the speedup (ultralytics median / detectkit median,
>1 = detectkit faster), then ONE JSON line with every figure. Needs the ``.venv-peers`` environment
(``make bench-peers``): ultralytics is installed there for comparison only; detectkit never imports it.

    python benchmarks/bench_peers.py [--only data,world_train] [--runs 10] [--threads 1,2] [--core 1]

Cases come from ``peers_data.py`` (data loader) and, when present, ``peers_model.py`` (train step,
inference); see ``peers_common.Case``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")  # ultralytics: no update checks, no downloads
os.environ.setdefault("YOLO_VERBOSE", "False")

from peers_common import Case, Timing, speedup  # noqa: E402

CASE_MODULES = ("peers_data", "peers_model")


def all_cases() -> list[Case]:
    out: list[Case] = []
    for name in CASE_MODULES:
        if not (HERE / f"{name}.py").exists():
            continue
        out.extend(importlib.import_module(name).cases())
    names = [c.name for c in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise SystemExit(f"duplicate case names: {sorted(dup)}")
    return out


def select(cases: list[Case], only: str | None) -> list[Case]:
    if not only:
        return cases
    wanted = {w.strip() for w in only.split(",") if w.strip()}
    chosen = [c for c in cases if c.group in wanted or c.name in wanted]
    unknown = wanted - {c.group for c in cases} - {c.name for c in cases}
    if unknown:
        known = sorted({c.group for c in cases} | {c.name for c in cases})
        raise SystemExit(f"unknown case(s) {sorted(unknown)}; known: {', '.join(known)}")
    return chosen


# ---- inside the pinned subprocess ----------------------------------------------------------------
def measure(case_name: str, threads: int, runs: int) -> dict:
    """Set up both sides, warm up, then time alternating calls; returns seconds per call."""
    import torch

    torch.set_num_threads(threads)
    case = next(c for c in all_cases() if c.name == case_name)
    sides = {}
    for side, setup in (("detectkit", case.setup_detectkit), ("ultralytics", case.setup_ultralytics)):
        t0 = time.perf_counter()
        sides[side] = setup(threads)
        print(f"  {case.name}/{side}: setup {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    for _ in range(case.warmup):
        for work in sides.values():
            work()
    seconds: dict[str, list[float]] = {s: [] for s in sides}
    order = list(sides)
    for i in range(max(runs, case.min_runs)):
        for side in order if i % 2 == 0 else order[::-1]:  # A B B A A B ...: no side always goes first
            t0 = time.perf_counter()
            result = sides[side]()
            seconds[side].append(time.perf_counter() - t0)
            del result
    return {"case": case.name, "threads": threads, "seconds": seconds}


# ---- parent --------------------------------------------------------------------------------------
def run_pinned(case: Case, threads: int, runs: int, cores: str, timeout: float) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--measure",
        case.name,
        "--threads",
        str(threads),
        "--runs",
        str(runs),
    ]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", cores, *cmd]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
    else:  # setup and compile times (excluded from the timing) stay visible
        sys.stderr.write("".join(f"{line}\n" for line in proc.stderr.splitlines() if line.startswith("  ")))
    if proc.returncode:
        return {
            "case": case.name,
            "threads": threads,
            "error": f"exit {proc.returncode}: " + (proc.stderr.strip().splitlines() or ["?"])[-1],
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(case: Case, raw: dict) -> dict:
    row = {
        "case": case.name,
        "group": case.group,
        "threads": raw["threads"],
        "unit": case.unit,
        "items_per_call": case.items_per_call,
        "note": case.note,
    }
    if "error" in raw:
        return {**row, "error": raw["error"]}
    t = {side: Timing(s) for side, s in raw["seconds"].items()}
    for side, timing in t.items():
        row[side] = {
            "median_s": timing.median,
            "min_s": timing.minimum,
            "runs": timing.runs,
            f"{case.unit}_per_s": case.items_per_call / timing.median,
        }
    row["speedup"] = speedup(t["detectkit"], t["ultralytics"])
    return row


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'case':<18}{'thr':>4}  {'detectkit med/min s':>20}  {'ultralytics med/min s':>22}"
        f"{'runs':>6}  {'dk /s':>9}{'ul /s':>9}{'speedup':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['case']:<18}{r['threads']:>4}  ERROR {r['error']}")
            continue
        d, u = r["detectkit"], r["ultralytics"]
        per = f"{r['unit']}_per_s"
        print(
            f"{r['case']:<18}{r['threads']:>4}  {d['median_s']:>10.3f}/{d['min_s']:<9.3f}  "
            f"{u['median_s']:>11.3f}/{u['min_s']:<10.3f}{d['runs']:>6}  {d[per]:>9.1f}{u[per]:>9.1f}"
            f"{r['speedup']:>8.2f}x"
        )
    notes = {r["case"]: r["note"] for r in rows if r.get("note")}
    for name, note in notes.items():
        print(f"  {name}: {note}")
    print(
        "speedup = ultralytics median / detectkit median (>1: detectkit faster); /s = items per second "
        "at the median"
    )


def versions() -> dict:
    out = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    for mod in ("torch", "ultralytics", "detectkit", "albumentations", "cv2"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception as e:  # a missing peer is reported, not fatal for the listing
            out[mod] = f"unavailable ({e.__class__.__name__})"
    try:  # which checkout was measured (an editable install vs PYTHONPATH)
        out["detectkit_path"] = str(Path(importlib.import_module("detectkit").__file__).parent)
    except Exception:
        out["detectkit_path"] = None
    out["loadavg"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma-separated case groups or names (default: all)")
    p.add_argument("--runs", type=int, default=10, help="timed calls per side (a case may ask for more)")
    p.add_argument("--threads", default="1,2", help="torch thread counts to run, e.g. 1,2")
    p.add_argument("--core", default="1", help="core(s) for 1-thread runs (taskset -c syntax)")
    p.add_argument("--cores2", default="0,1", help="cores for runs with more than one thread")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per case subprocess")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, int(args.threads), args.runs)))
        return
    cases = select(all_cases(), args.only)
    if args.list:
        for c in cases:
            print(f"{c.name:<28} {c.group:<24} {c.note}")
        return
    threads = [int(t) for t in args.threads.split(",")]
    rows = []
    for case in cases:
        for t in threads:
            cores = args.core if t == 1 else args.cores2
            print(f"running {case.name} threads={t} cores={cores} ...", file=sys.stderr, flush=True)
            rows.append(summarize(case, run_pinned(case, t, args.runs, cores, args.timeout)))
    print()
    print_table(rows)
    print(json.dumps({"benchmark": "peers", **versions(), "runs": args.runs, "results": rows}))


if __name__ == "__main__":
    main()
