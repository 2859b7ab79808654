"""A host that slips code in beside the measured package (a ``sitecustomize.py`` on ``PYTHONPATH``).

The red team's finding: the simulated measurement covers fldsl's files on disk, so a host that added a
``sitecustomize.py`` through ``PYTHONPATH`` ran altered code under the pinned measurement. Now nodes run in
isolated mode (``fldsl run`` starts them with ``python -I``; Gramine's manifest fixes ``-I``), and a node
started any other way refuses to run when such code took effect.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import buildkit
import pytest
from conftest import describe, launch

from fldsl.runtime.launcher import ensure_trust, write_addresses

pytestmark = pytest.mark.e2e

# What the attacker's hook does: leave a mark (and could poison or dump anything the node handles).
HOOK = "import os, pathlib\npathlib.Path(os.environ['INJECTED_MARK']).write_text('ran')\n"


@pytest.fixture
def injected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(HOOK)
    mark = tmp_path / "hook-ran"
    monkeypatch.setenv("PYTHONPATH", str(hook_dir))
    monkeypatch.setenv("INJECTED_MARK", str(mark))
    return mark


def test_a_node_started_with_an_injected_sitecustomize_refuses_to_run(tmp_path: Path, trust_dir: Path,
                                                                      injected: Path) -> None:
    build = buildkit.vertical_build(tmp_path / "b", rows=200, epochs=1)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_addresses(run_dir / "addresses.json", ["media.trainer", "shop.trainer"])
    ensure_trust(trust_dir, ["media.trainer", "shop.trainer"])
    proc = subprocess.run(
        [sys.executable, "-m", "fldsl.runtime.node", "--build", str(build), "--node", "media.trainer",
         "--addresses", str(run_dir / "addresses.json"), "--run-dir", str(run_dir), "--trust-dir",
         str(trust_dir / "media"), "--connect-timeout", "5"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert injected.exists(), "the hook should have run in this (non-isolated) interpreter"
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "sitecustomize" in proc.stderr and "python -I" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_fldsl_run_starts_nodes_isolated_so_the_hook_never_runs(tmp_path: Path, trust_dir: Path,
                                                                injected: Path) -> None:
    res = launch(lambda: buildkit.vertical_build(tmp_path / "b", rows=200, epochs=1), tmp_path / "run",
                 trust_dir)
    assert res.exit_code == 0, describe(res)
    assert not injected.exists()
