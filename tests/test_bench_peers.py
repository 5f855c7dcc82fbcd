"""bench_peers' bookkeeping: case selection, the summary figures and the table (no ultralytics needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_peers  # noqa: E402
from peers_common import Case  # noqa: E402


def _case(name: str, group: str) -> Case:
    return Case(name, group, "images", 16, lambda t: lambda: None, lambda t: lambda: None)


def test_select_by_group_or_name_and_unknown_names_fail():
    cases = [_case("data_w0", "data"), _case("data_w2", "data"), _case("world_infer_320", "world_infer")]
    assert [c.name for c in bench_peers.select(cases, "data")] == ["data_w0", "data_w2"]
    assert [c.name for c in bench_peers.select(cases, "world_infer_320,data_w2")] == [
        "data_w2",
        "world_infer_320",
    ]
    assert bench_peers.select(cases, None) == cases
    with pytest.raises(SystemExit, match="unknown case"):
        bench_peers.select(cases, "data,nope")


def test_summary_speedup_is_the_ratio_of_medians(capsys):
    case = _case("data_w0", "data")
    raw = {"threads": 1, "seconds": {"detectkit": [0.2, 0.25, 0.3], "ultralytics": [0.5, 0.4, 0.9]}}
    row = bench_peers.summarize(case, raw)
    assert row["detectkit"]["median_s"] == pytest.approx(0.25)
    assert row["ultralytics"]["min_s"] == pytest.approx(0.4)
    assert row["detectkit"]["runs"] == 3
    assert row["detectkit"]["images_per_s"] == pytest.approx(16 / 0.25)
    assert row["speedup"] == pytest.approx(0.5 / 0.25)
    bench_peers.print_table([row, bench_peers.summarize(case, {"threads": 2, "error": "exit 1: boom"})])
    out = capsys.readouterr().out
    assert "2.00x" in out and "ERROR exit 1: boom" in out
