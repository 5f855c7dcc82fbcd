"""benchmarks/gpu_suite.sh in its dry mode: every step runs on the CPU at tiny sizes, what needs a GPU
is skipped with its reason, and the table ends in one JSON line. A step that crashes, hangs or was
never started shows up as an ``error`` (or ``skipped``) entry with its reason, and the others still run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.sh"
STEPS = ["train_world", "tensorrt", "serve", "train_nas"]


def run_suite(tmp_path: Path, *args: str, timeout: float = 300, **env: str) -> tuple[subprocess.CompletedProcess, dict]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("DRY_RUN", "STEPS", "STEP_TIMEOUT", "SUITE_BUDGET", "SERVE_HTTP", "GPU_SUITE_COMPILE")}
    full = {**base, "OUT": str(tmp_path / "results"), "PYTHON": sys.executable, "NO_ALBUMENTATIONS_UPDATE": "1",
            "WANDB_MODE": "offline", **env}
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full, timeout=timeout,
                          cwd=tmp_path)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output; stderr:\n{proc.stderr[-3000:]}"
    return proc, json.loads(lines[-1])


@pytest.mark.slow
def test_dry_run_runs_every_step_and_names_each_skip(tmp_path):
    proc, report = run_suite(tmp_path, "--dry-run")
    detail = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, detail
    assert report["benchmark"] == "gpu_suite" and report["dry_run"] is True
    assert list(report["steps"]) == STEPS
    rows = {}
    for name, step in report["steps"].items():
        assert step["status"] in ("ok", "skipped"), f"{name}: {step['status']}: {step.get('reason')}\n{detail}"
        if step["status"] == "skipped":
            assert step["reason"].strip(), name
        for row in step["rows"]:
            assert row["status"] in ("ok", "skipped"), f"{name}/{row['name']}: {row.get('reason')}\n{detail}"
            if row["status"] == "skipped":
                assert len(row["reason"].strip()) > 10, row
            rows[row["name"]] = row
            assert f"   {row['name']}" in proc.stdout  # one table line per figure
    for name in ("world_s/detectkit_eager_fp32", "world_s/detectkit_bf16_cl", "nas_s/detectkit_eager_fp32"):
        assert rows[name]["status"] == "ok" and rows[name]["images_per_s"] > 0, rows[name]
        assert rows[name]["gflop_per_step"] > 0 and rows[name]["mfu"] is None, rows[name]  # no peak for a CPU
        assert rows[name]["mfu_omitted"]
    assert rows["world_s/detectkit_bf16_cl_compile"]["status"] == "skipped"
    assert rows["nas_s/backend_batching"]["status"] == "ok"
    assert rows["nas_s/backend_batching"]["b1_images_per_s"] > 0
    if report["steps"]["tensorrt"]["status"] == "skipped":  # this machine: no TensorRT, no GPU
        assert "tensorrt" in report["steps"]["tensorrt"]["reason"].lower()
        # the graphs were still exported (everything up to the engine ran)
        assert "exported" in rows["nas_s/trt_fp16"]["reason"] and "QuantizeLinear" in rows["nas_s/trt_int8"]["reason"]
    assert report["wall_s"] < 120, report["wall_s"]


def test_a_crashing_or_hanging_step_is_an_error_entry_and_the_rest_still_report(tmp_path):
    proc, report = run_suite(tmp_path, "--dry-run", timeout=120, STEPS="no_such_step train_world", STEP_TIMEOUT="1")
    assert proc.returncode == 1, proc.stderr  # a step errored
    assert list(report["steps"]) == ["no_such_step", "train_world"]
    crashed, hung = report["steps"]["no_such_step"], report["steps"]["train_world"]
    assert crashed["status"] == "error" and "invalid choice" in crashed["reason"], crashed
    assert hung["status"] == "error" and "timed out after 1 s" in hung["reason"], hung
    assert "step no_such_step FAILED" in proc.stderr and "step train_world FAILED" in proc.stderr


def test_a_spent_time_budget_skips_the_remaining_steps_with_its_reason(tmp_path):
    proc, report = run_suite(tmp_path, timeout=60, DRY_RUN="1", SUITE_BUDGET="0")
    assert proc.returncode == 0, proc.stderr
    assert report["dry_run"] is True and list(report["steps"]) == STEPS
    for step in report["steps"].values():
        assert step["status"] == "skipped" and "time budget" in step["reason"], step
