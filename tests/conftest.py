"""Shared test fixtures. Tests mirror the packages: tests/core, tests/data, tests/multimodal, tests/app."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Deterministic, small thread use: the CI machine has 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real IU X-Ray reports). Absent in a user's clone: tests skip with a reason."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (only present in the project's CI checkout)")
    return SHARED_DATA
