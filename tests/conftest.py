"""Shared pytest fixtures. Test data lives in ``../shared`` next to the checkout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared test-data folder; tests that need it skip only when it is absent."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"shared test data folder absent: {SHARED_DIR} (expected next to the checkout)")
    return SHARED_DIR
