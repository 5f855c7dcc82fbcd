"""detectkit vs the peer's best path for the same job, side by side in one run.

Every case runs in a fresh subprocess pinned with ``taskset`` (1 thread: one core, ``--core``; 2 threads:
``--cores2``) with ``torch.set_num_threads(t)``; inside it both sides are set up once (untimed), warmed
up, then called alternately A B A B ... so load changes hit both equally. Where a case compares outputs
(inference), one output of each side is checked against the other before timing. Peak memory is
measured apart, one side per fresh subprocess (the RSS of the process and all its children, e.g.
loader workers, sampled every 10 ms over the warm-up and a few calls), so one side's allocations
never count for the other. Prints a table (what each side ran, median and minimum seconds per call,
throughput, speedup = peer median / detectkit median, >1 = detectkit faster, peak RSS of each side,
output difference), then ONE JSON line with every figure. ``--readme README.md`` also rewrites the
table between the ``bench-peers`` markers of the README, so its figures are this run's.
Needs the ``.venv-peers`` environment (``make bench-peers``): ultralytics is installed there for
comparison only; detectkit never imports it.

    python benchmarks/bench_peers.py [--only data,world_onnx] [--runs 10] [--threads 1] [--core 1]

Cases come from ``peers_data.py`` (data loader) and, when present, ``peers_model.py`` (train step,
inference); see ``peers_common.Case``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
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
    outputs = {}
    for _ in range(case.warmup):
        for side, work in sides.items():
            outputs[side] = work()
    compared = None
    if case.compare is not None:
        try:
            compared = case.compare(outputs["detectkit"], outputs["ultralytics"])
        except AssertionError as e:  # outputs differ beyond the case's tolerance: no speed figure
            return {"case": case.name, "threads": threads, "error": f"outputs differ: {e}"}
    outputs.clear()
    seconds: dict[str, list[float]] = {s: [] for s in sides}
    order = list(sides)
    for i in range(max(runs, case.min_runs)):
        for side in order if i % 2 == 0 else order[::-1]:  # A B B A A B ...: no side always goes first
            t0 = time.perf_counter()
            result = sides[side]()
            seconds[side].append(time.perf_counter() - t0)
            del result
    return {"case": case.name, "threads": threads, "seconds": seconds, "compare": compared}


def _tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (Linux /proc; 0 where unreadable)."""
    total, stack, seen = 0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return total


def peak_memory(case_name: str, side: str, threads: int, calls: int) -> dict:
    """Set up ONE side, warm up and call it ``calls`` times while sampling the RSS of this process
    and its children every 10 ms; returns the peak and the RSS before setup (both MB)."""
    import torch

    torch.set_num_threads(threads)
    case = next(c for c in all_cases() if c.name == case_name)
    setup = case.setup_detectkit if side == "detectkit" else case.setup_ultralytics
    before = _tree_rss(os.getpid())
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(os.getpid()))
            done.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    work = setup(threads)
    for _ in range(case.warmup + calls):
        result = work()
        del result
    done.set()
    sampler.join()
    peak[0] = max(peak[0], _tree_rss(os.getpid()))
    return {"case": case_name, "side": side, "peak_mb": peak[0] / 2**20, "start_mb": before / 2**20}


# ---- parent --------------------------------------------------------------------------------------
def run_pinned(case: Case, threads: int, runs: int, cores: str, timeout: float, memory_side: str | None = None) -> dict:
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
    if memory_side:
        cmd += ["--memory", memory_side]
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
        "peer": case.peer,
        "detectkit_ran": case.detectkit_ran,
        "peer_ran": case.peer_ran,
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
    if raw.get("compare"):
        row["compare"] = raw["compare"]
    return row


def add_memory(row: dict, mem: dict[str, dict]) -> dict:
    for side, m in mem.items():
        if "error" in m:
            row.setdefault("memory_errors", {})[side] = m["error"]
        elif side in row:
            row[side]["peak_rss_mb"] = m["peak_mb"]
    return row


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _fmt_compare(c: dict | None) -> str:
    if not c:
        return ""
    return ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}" for k, v in c.items())


def markdown_table(rows: list[dict]) -> str:
    """The README table: every row says what each side ran, time and peak memory side by side."""
    out = [
        "| case | threads | detectkit ran | peer ran | detectkit median / min | peer median / min | speedup "
        "| peak RSS detectkit / peer | outputs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['case']} | {r['threads']} | {r['detectkit_ran']} | {r['peer']}: {r['peer_ran']} "
                       f"| error: {r['error']} | | | | |")
            continue
        d, u = r["detectkit"], r["ultralytics"]
        per = f"{r['unit']}_per_s"
        mem = "/".join(f"{x['peak_rss_mb'] / 1024:.2f}" if "peak_rss_mb" in x else "?" for x in (d, u))
        out.append(
            f"| {r['case']} | {r['threads']} | {r['detectkit_ran']} | {r['peer']}: {r['peer_ran']} "
            f"| {_fmt_s(d['median_s'])} / {_fmt_s(d['min_s'])} ({d[per]:.1f} {r['unit']}/s) "
            f"| {_fmt_s(u['median_s'])} / {_fmt_s(u['min_s'])} ({u[per]:.1f} {r['unit']}/s) "
            f"| **{r['speedup']:.2f}x** | {mem} GB | {_fmt_compare(r.get('compare'))} |"
        )
    return "\n".join(out)


README_BEGIN = "<!-- bench-peers:begin (written by make bench-peers; do not edit by hand) -->"
README_END = "<!-- bench-peers:end -->"


def write_readme(path: Path, rows: list[dict], header: str) -> None:
    """Replace the text between the bench-peers markers of ``path`` with this run's table."""
    text = path.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{path}: the markers {README_BEGIN!r} and {README_END!r} are missing")
    body = f"{README_BEGIN}\n{header}\n\n{markdown_table(rows)}\n{README_END}"
    pattern = re.escape(README_BEGIN) + ".*?" + re.escape(README_END)
    path.write_text(re.sub(pattern, lambda _: body, text, count=1, flags=re.S))


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'case':<22}{'thr':>4}  {'detectkit med/min s':>20}  {'peer med/min s':>20}"
        f"{'runs':>6}  {'dk /s':>9}{'peer /s':>9}{'speedup':>9}  {'RSS dk/peer GB':>15}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['case']:<22}{r['threads']:>4}  ERROR {r['error']}")
            continue
        d, u = r["detectkit"], r["ultralytics"]
        per = f"{r['unit']}_per_s"
        mem = "/".join(f"{x['peak_rss_mb'] / 1024:.2f}" if "peak_rss_mb" in x else "?" for x in (d, u))
        print(
            f"{r['case']:<22}{r['threads']:>4}  {d['median_s']:>10.3f}/{d['min_s']:<9.3f}  "
            f"{u['median_s']:>10.3f}/{u['min_s']:<9.3f}{d['runs']:>6}  {d[per]:>9.1f}{u[per]:>9.1f}"
            f"{r['speedup']:>8.2f}x  {mem:>15}"
        )
    for r in rows:
        line = f"  {r['case']}: detectkit ran {r['detectkit_ran'] or '?'}; {r['peer']} ran {r['peer_ran'] or '?'}"
        if r.get("compare"):
            line += f"; outputs: {_fmt_compare(r['compare'])}"
        print(line + (f" ({r['note']})" if r.get("note") else ""))
    print("speedup = peer median / detectkit median (>1: detectkit faster); /s = items per second at the median; "
          "RSS = peak resident memory of the side's process and its workers, measured apart")


def versions() -> dict:
    out = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    for mod in ("torch", "ultralytics", "detectkit", "albumentations", "cv2", "onnxruntime"):
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
    p.add_argument("--threads", default="1", help="torch thread counts to run, e.g. 1,2")
    p.add_argument("--core", default="1", help="core(s) for 1-thread runs (taskset -c syntax)")
    p.add_argument("--cores2", default="0,1", help="cores for runs with more than one thread")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per case subprocess")
    p.add_argument("--memory-calls", type=int, default=3, help="calls per side in the memory run (0: no memory run)")
    p.add_argument("--readme", type=Path, help="rewrite the table between the bench-peers markers of this file")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # internal: run one case in this process
    p.add_argument("--memory", help=argparse.SUPPRESS)  # internal: with --measure, one side's peak memory
    args = p.parse_args()
    if args.measure:
        if args.memory:
            print(json.dumps(peak_memory(args.measure, args.memory, int(args.threads), args.runs)))
        else:
            print(json.dumps(measure(args.measure, int(args.threads), args.runs)))
        return
    cases = select(all_cases(), args.only)
    if args.list:
        for c in cases:
            print(f"{c.name:<28} {c.group:<24} {c.note}")
        return
    threads = [int(t) for t in args.threads.split(",")]
    rows = []
    started = time.time()
    for case in cases:
        for t in threads:
            cores = args.core if t == 1 and case.cores == 1 else args.cores2
            print(f"running {case.name} threads={t} cores={cores} ...", file=sys.stderr, flush=True)
            row = summarize(case, run_pinned(case, t, args.runs, cores, args.timeout))
            if args.memory_calls and "error" not in row:
                mem = {side: run_pinned(case, t, args.memory_calls, cores, args.timeout, memory_side=side)
                       for side in ("detectkit", "ultralytics")}
                add_memory(row, mem)
            rows.append(row)
    print()
    print_table(rows)
    info = versions()
    print(json.dumps({"benchmark": "peers", **info, "runs": args.runs, "results": rows}))
    if args.readme:
        minutes = (time.time() - started) / 60
        header = (
            f"`make bench-peers` ({info['machine']}, {info['cpus']} CPUs, torch {info['torch']}, ultralytics "
            f"{info['ultralytics']}, onnxruntime {info.get('onnxruntime', '?')}; cases pinned to core {args.core} "
            f"(loader rows with workers to cores {args.cores2}), "
            f"{args.runs} interleaved calls per side, {minutes:.0f} min in all; load average at the end "
            f"{', '.join(f'{x:.2f}' for x in info['loadavg'] or ())}):"
        )
        write_readme(args.readme, rows, header)
        print(f"wrote the table into {args.readme}", file=sys.stderr)


if __name__ == "__main__":
    main()
