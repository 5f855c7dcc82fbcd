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


def _row() -> dict:
    case = Case("world_onnx_320", "world_onnx", "images", 1, lambda t: lambda: None, lambda t: lambda: None,
                detectkit_ran="our graph", peer_ran="its graph")
    row = bench_peers.summarize(case, {"threads": 1, "seconds": {"detectkit": [0.1], "ultralytics": [0.2]},
                                       "compare": {"max box diff px": 1e-4}})
    return bench_peers.add_memory(row, {"detectkit": {"peak_mb": 512.0}, "ultralytics": {"peak_mb": 1024.0}})


def test_readme_table_says_what_ran_with_memory_beside_time(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bench_peers.README_BEGIN}\nold table\n{bench_peers.README_END}\noutro\n")
    bench_peers.write_readme(readme, [_row()], "header line")
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old table" not in text
    assert "| world_onnx_320 | 1 | our graph | ultralytics: its graph |" in text
    assert "**2.00x** | 0.50/1.00 GB | max box diff px 1.0e-04 |" in text
    bench_peers.write_readme(readme, [_row()], "header line")  # idempotent: one table, not two
    assert readme.read_text().count("| world_onnx_320 |") == 1
    (tmp_path / "bare.md").write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        bench_peers.write_readme(tmp_path / "bare.md", [_row()], "header")


def test_tree_rss_counts_the_children():
    import os
    import subprocess

    alone = bench_peers._tree_rss(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(200 << 20); time.sleep(30)"])
    try:
        import time

        deadline = time.time() + 20
        while bench_peers._tree_rss(os.getpid()) < alone + (150 << 20) and time.time() < deadline:
            time.sleep(0.1)
        assert bench_peers._tree_rss(os.getpid()) >= alone + (150 << 20)
    finally:
        child.kill()
        child.wait()


def test_world_outputs_are_compared_in_each_sides_layout():
    import numpy as np
    import peers_model

    rng = np.random.default_rng(0)
    xyxy = rng.uniform(0, 300, (1, 10, 4)).astype(np.float32)
    scores = rng.uniform(0, 1, (1, 10, 3)).astype(np.float32)
    cxcywh = np.concatenate([(xyxy[..., :2] + xyxy[..., 2:]) / 2, xyxy[..., 2:] - xyxy[..., :2]], -1)
    peer = [np.concatenate([cxcywh, scores], -1).transpose(0, 2, 1)]  # ultralytics' [B, 4+K, A]
    out = peers_model.compare_world([xyxy, scores], peer)
    assert out["max box diff px"] < 1e-3 and out["max score diff"] == 0
    with pytest.raises(AssertionError, match="scores by 0.01"):
        peers_model.compare_world([xyxy, scores + 0.01], peer)
