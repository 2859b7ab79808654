"""Tests that run nodes inside Gramine are marked ``gramine`` (and ``slow``, ``e2e``); they skip with the
reason where Gramine's tools are not on PATH (``bash ../shared/gramine/install.sh`` installs them;
``.ci/run`` does so when that folder exists)."""

from __future__ import annotations

import shutil

import pytest

TOOLS = ("gramine-direct", "gramine-manifest", "gramine-sgx-sign", "gramine-sgx-sigstruct-view")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if not missing:
        return
    skip = pytest.mark.skip(reason=f"Gramine is not installed ({', '.join(missing)} not on PATH); "
                                   "install it with `bash ../shared/gramine/install.sh`")
    for item in items:
        if "gramine" in item.keywords:
            item.add_marker(skip)
