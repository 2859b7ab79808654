"""End-to-end helpers: real node processes over real gRPC and TLS, started by the launcher."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from fldsl.measurement import code_digest
from fldsl.runtime.launcher import RunResult, run_pipeline


@pytest.fixture(scope="session")
def trust_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The trust root: run_pipeline makes one folder per party of each pipeline run with it (ensure_trust).
    return tmp_path_factory.mktemp("trust")


def launch(make_build: Callable[[], Path], run_dir: Path, trust_dir: Path, *, expect_ok: bool = True,
           attempts: int = 3, **kw: Any) -> RunResult:
    """Build, then run every node. The simulated measurement covers the installed code: if the code changed
    between building and starting the nodes (other work in the same checkout), build and run again."""
    result = None
    for i in range(attempts):
        code_digest.cache_clear()  # the compiler pins with the cached digest: make it current
        before = code_digest()
        build = make_build()
        rd = run_dir if i == 0 else run_dir.with_name(f"{run_dir.name}-retry{i}")
        result = run_pipeline(build, run_dir=rd, trust_dir=trust_dir, **kw)
        if result.exit_code == 0 or code_digest.__wrapped__() == before:
            return result
    assert result is not None
    return result


def describe(result: RunResult) -> str:
    from fldsl.runtime.launcher import tail

    lines = [f"exit {result.exit_code}"]
    for nid, st in result.nodes.items():
        lines.append(f"{nid}: exit {st.exit_code} error={st.error}")
        lines += [f"   | {x}" for x in tail(st.log_path, 8)]
    return "\n".join(lines)
