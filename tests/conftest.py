"""Suite-wide test configuration.

Tests marked ``shared_data`` use the real FATE data in ``../shared/data`` (beside the checkout; CI has it).
Where it is absent they are skipped with a reason that says where the data was looked for, so a fresh clone
without ``../shared`` still runs green.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``$FLDSL_SHARED_DATA`` or ``<repo>/../shared/data``."""
    env = os.environ.get("FLDSL_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def fate_dir() -> Path:
    return shared_data_dir() / "fate"


@pytest.fixture
def fate_data() -> Path:
    d = fate_dir()
    if not d.is_dir():
        pytest.skip(f"FATE data not found at {d} (set FLDSL_SHARED_DATA or put ../shared beside it)")
    return d


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if fate_dir().is_dir():
        return
    skip = pytest.mark.skip(
        reason=f"needs ../shared/data: FATE data not found at {fate_dir()} (set FLDSL_SHARED_DATA)"
    )
    for item in items:
        if "shared_data" in item.keywords:
            item.add_marker(skip)
