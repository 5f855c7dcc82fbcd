"""``detectkit nas search|show|export``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from detectkit.errors import OptionParser, UserError


def _parser() -> argparse.ArgumentParser:
    from detectkit.nas.search import DEFAULT_STORAGE

    p = OptionParser(prog="detectkit nas", description="multi-objective architecture search over the YOLO-NAS space")
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("search", help="run, resume or join a search (one worker per process)")
    s.add_argument("--config", required=True, help="search YAML, e.g. experiments/nas_quickstart.yaml")
    s.add_argument("--storage", help="override the config's storage URL (sqlite:///file.db, postgresql://...)")
    s.add_argument("--study-name", help="override the config's study_name")
    s.add_argument("--n-trials", type=int, help="override the study's total number of trials")
    s.add_argument("--worker", type=int, default=int(os.environ.get("DETECTKIT_NAS_WORKER", 0)),
                   help="worker index (sampler seed offset) when several processes share a study")
    s.add_argument("--workers", type=int, default=1,
                   help="start this many worker processes here (indices --worker .. --worker+N-1), wait for "
                        "them, then re-measure and report (default: %(default)s, this process is the worker)")
    s.add_argument("--threads", type=int,
                   help="torch threads per worker (default: cores / workers when --workers > 1, else torch's default)")
    s.add_argument("--no-report", action="store_true",
                   help="only run trials: no final re-measurement or table (what --workers starts its workers with)")
    for name, text in (("show", "Pareto front table + PNG of a study"), ("export", "write a trial's arch.yaml and fit recipe")):
        q = sub.add_parser(name, help=text)
        q.add_argument("study")
        q.add_argument("--storage", default=DEFAULT_STORAGE, help="study storage URL (default: %(default)s)")
        q.add_argument("--out", help="output folder (default: runs/nas/STUDY[/trial_N])")
        if name == "export":
            q.add_argument("--trial", type=int, required=True)
        else:
            q.add_argument("--remeasure", action="store_true",
                           help="time every complete trial again, interleaved, in this process, before the table")
            q.add_argument("--rounds", type=int, default=10, help="re-measurement rounds (default: %(default)s)")
            q.add_argument("--runs", type=int, default=5, help="runs per model and round (default: %(default)s)")
    return p


def _start_workers(args: argparse.Namespace, threads: int) -> list[subprocess.Popen]:
    """``--workers N``: N ``nas search`` processes on this machine, each ``threads`` torch threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    common = ["--config", args.config, "--threads", str(threads), "--no-report"]
    for flag, value in (("--storage", args.storage), ("--study-name", args.study_name), ("--n-trials", args.n_trials)):
        if value is not None:
            common += [flag, str(value)]
    return [subprocess.Popen([sys.executable, "-m", "detectkit.cli", "nas", "search", *common, "--worker", str(args.worker + i)],
                             env=env) for i in range(args.workers)]


def _wait(procs: list[subprocess.Popen]) -> list[int]:
    try:
        return [p.wait() for p in procs]
    except KeyboardInterrupt:  # Ctrl-C: the workers stop too (their running trials resume later)
        # a terminal's Ctrl-C reaches the workers as well (one process group); a SIGINT sent to this
        # process alone does not: pass it on to those still running after a moment
        deadline = time.time() + 5
        while time.time() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.2)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        raise


def _search(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from detectkit.nas.report import show
    from detectkit.nas.search import SearchConfig, open_study, run_search, running_trials

    cfg = SearchConfig.from_yaml(args.config)
    cfg = replace(cfg, storage=args.storage or cfg.storage, study_name=args.study_name or cfg.study_name)
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    threads = args.threads or (max(1, (os.cpu_count() or 1) // args.workers) if args.workers > 1 else None)
    if args.workers > 1:
        study = open_study(cfg, args.worker)  # created and seeded once, before the workers join it
        codes = _wait(_start_workers(args, threads))
        failed = [(args.worker + i, c) for i, c in enumerate(codes) if c != 0]
        if failed:
            raise ValueError(f"nas search workers failed (worker, exit code): {failed}; the study keeps their "
                             f"finished trials: run the same command again to resume")
    else:
        if threads:
            import torch

            torch.set_num_threads(threads)
        study = run_search(cfg, worker=args.worker, n_trials=args.n_trials)
    if args.no_report:
        return
    busy = running_trials(study)
    if busy:
        print(f"trials {busy} of {study.study_name!r} are still running in other workers: latency not re-measured "
              f"(the search-time figures below); when they finish: detectkit nas show {study.study_name} "
              f"--storage {cfg.storage} --remeasure")
    summary = show(study.study_name, cfg.storage, cfg.out, remeasure=None if busy else cfg.remeasure)
    print(summary["table"])
    print(summary["verdict"]["text"])
    print(json.dumps({"study": study.study_name, "storage": cfg.storage, "png": summary["png"],
                      "table": summary["markdown"], "found_faster_than_yolo_nas_s": summary["verdict"]["holds"]}))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.action == "search":
            _search(args)
        elif args.action == "show":
            from detectkit.nas.report import show

            summary = show(args.study, args.storage, args.out,
                           remeasure={"rounds": args.rounds, "runs": args.runs} if args.remeasure else None)
            print(summary["table"])
            print(summary["verdict"]["text"])
            print(json.dumps({"png": summary["png"], "table": summary["markdown"],
                              "found_faster_than_yolo_nas_s": summary["verdict"]["holds"]}))
        else:
            from detectkit.nas.report import export_trial

            print(json.dumps(export_trial(args.study, args.storage, args.trial, args.out)))
    except ValueError as e:
        raise UserError(str(e)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
