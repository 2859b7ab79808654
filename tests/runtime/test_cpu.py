"""Worker pools follow the enclave's thread budget, not only the host's cores."""

from __future__ import annotations

import os

import pytest

from fldsl.runtime.cpu import ENV, worker_count


def test_worker_count_is_capped_by_the_manifest_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.delenv(ENV, raising=False)
    assert worker_count(8) == 8
    monkeypatch.setenv(ENV, "2")
    assert worker_count(8) == 2
    monkeypatch.setenv(ENV, "nonsense")
    assert worker_count(8) == 8
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert worker_count(8) == 1
