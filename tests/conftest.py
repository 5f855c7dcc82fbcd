"""Shared pytest fixtures. Test data lives in ``../shared`` next to the checkout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from strict_skips import SHARED_REASON, pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401 (hooks)
from worker_watch import pytest_configure, pytest_runtest_logstart, pytest_testnodedown  # noqa: F401 (hooks)

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# OpenMP threads that spin-wait burn 5-10x the CPU per training step when the cores are shared
# (measured on the 2-core dev box); libgomp reads this when torch is first imported, i.e. later.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Under pytest-xdist (`make test` runs two workers on the 2-core CI machine) each worker and the
# processes it starts use one intra-op thread: two workers x two threads would oversubscribe.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared test-data folder; tests that need it skip only when it is absent."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"{SHARED_REASON}: {SHARED_DIR} (expected next to the checkout)")
    return SHARED_DIR
