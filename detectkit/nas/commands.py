"""``detectkit nas search|show|export``."""

from __future__ import annotations

import argparse
import json
import os
import sys
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
    for name, text in (("show", "Pareto front table + PNG of a study"), ("export", "write a trial's arch.yaml and fit recipe")):
        q = sub.add_parser(name, help=text)
        q.add_argument("study")
        q.add_argument("--storage", default=DEFAULT_STORAGE, help="study storage URL (default: %(default)s)")
        q.add_argument("--out", help="output folder (default: runs/nas/STUDY[/trial_N])")
        if name == "export":
            q.add_argument("--trial", type=int, required=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.action == "search":
            from dataclasses import replace

            from detectkit.nas.report import show
            from detectkit.nas.search import SearchConfig, run_search

            cfg = SearchConfig.from_yaml(args.config)
            cfg = replace(cfg, storage=args.storage or cfg.storage, study_name=args.study_name or cfg.study_name)
            study = run_search(cfg, worker=args.worker, n_trials=args.n_trials)
            summary = show(study.study_name, cfg.storage, cfg.out)
            print(summary["table"])
            print(json.dumps({"study": study.study_name, "storage": cfg.storage, "png": summary["png"],
                              "table": summary["markdown"]}))
        elif args.action == "show":
            from detectkit.nas.report import show

            summary = show(args.study, args.storage, args.out)
            print(summary["table"])
            print(json.dumps({"png": summary["png"], "table": summary["markdown"]}))
        else:
            from detectkit.nas.report import export_trial

            print(json.dumps(export_trial(args.study, args.storage, args.trial, args.out)))
    except ValueError as e:
        raise UserError(str(e)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
