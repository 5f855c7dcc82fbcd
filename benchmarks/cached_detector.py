"""A detector trained once with the quickstart runner and reused: the benchmarks that need a real
trained model (tracking, slicing) train it on first use and find it in their cache afterwards."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path


def cached_detector(cache: Path, run_name: str, overrides: Sequence[str] = ()) -> Path:
    """The checkpoint recorded in ``cache/detector.json`` if it still exists, else train the
    quickstart recipe (with ``overrides``) into ``cache/run_name`` and record its summary."""
    record = cache / "detector.json"
    if record.is_file():
        path = Path(json.loads(record.read_text())["checkpoint"])
        if path.is_file():
            return path
    from detectkit.cli.quickstart import DEFAULT_CONFIG, run

    summary = run(DEFAULT_CONFIG, cache / run_name, overrides)
    cache.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(summary))
    print(f"trained: {json.dumps(summary)}", file=sys.stderr)
    return Path(summary["checkpoint"])
