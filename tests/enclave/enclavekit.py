"""Helpers for tests that run nodes inside Gramine (``gramine-direct``): the real CLI, real signing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
FLDSL = str(Path(sys.executable).with_name("fldsl"))


def fldsl(*args: str, cwd: Path, timeout: float = 900, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess[str]:
    """The real CLI, as a user runs it."""
    return subprocess.run([FLDSL, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def run_json(*args: str, cwd: Path, timeout: float = 900) -> tuple[int, dict[str, Any], str]:
    """Exit code, the JSON document and what the run said: its stderr and, under --json, the document's
    error message (an error that stops the run before any node is in the document, not on stderr)."""
    proc = fldsl("run", *args, "--json", cwd=cwd, timeout=timeout)
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        doc = {}
    said = proc.stderr + str((doc.get("error") or {}).get("message", ""))
    return proc.returncode, doc, said


def sign(flp: Path, build: Path, cwd: Path, *extra: str) -> None:
    """Compile and sign with the deployment's simulated enclave signing key (made on first use)."""
    init = fldsl("trust", "init", "--party", "media", cwd=cwd)
    assert init.returncode == 0, init.stderr
    proc = fldsl("compile", str(flp), "-o", str(build), "--sign", ".fldsl/trust/media/enclave_signing.key",
                 *extra, cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def holdout(doc: dict[str, Any], node: str, metric: str = "auc") -> float:
    return float(doc["nodes"][node]["metrics"][metric])


def node_failures(doc: dict[str, Any]) -> str:
    return "\n".join(f"{n}: exit {v['exit_code']} {v['error']}" for n, v in doc.get("nodes", {}).items())
