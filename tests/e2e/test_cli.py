"""`fldsl run` as a user types it: the README demo, a refused run, one node in the foreground."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import buildkit
import pytest

from fldsl.measurement import code_digest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
FLDSL = [sys.executable, "-c", "import sys; from fldsl.cli import main; sys.exit(main())"]


def _fldsl(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="160")
    return subprocess.run([*FLDSL, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_demo_pipeline_runs_and_learns(tmp_path: Path) -> None:
    for _ in range(3):  # retried only if the checkout's code changed while it ran (sim measurement)
        before = code_digest.__wrapped__()
        out = _fldsl(["run", str(REPO / "pipelines" / "vertical_wide_deep.flp"), "--json"], tmp_path)
        if out.returncode == 0 or code_digest.__wrapped__() == before:
            break
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    doc = json.loads(out.stdout)
    shop = doc["nodes"]["shop.trainer"]
    assert shop["metrics"]["auc"] > 0.7, shop
    assert (tmp_path / ".fldsl" / "trust").is_dir()  # created on first use
    run_dir = Path(doc["run_dir"])
    assert run_dir.resolve().is_relative_to((tmp_path / "runs" / "vertical_wide_deep").resolve())
    assert (run_dir / "metrics.jsonl").stat().st_size > 0
    assert sorted(p.name for p in (run_dir / "models").iterdir()) == [
        "media.trainer_model.savedmodel.sealed", "media.trainer_model.sealed",
        "shop.trainer_model.savedmodel.sealed", "shop.trainer_model.sealed"]


def test_refused_run_prints_the_failing_node_and_exits_3(tmp_path: Path) -> None:
    build = buildkit.vertical_build(tmp_path, rows=100, epochs=1)
    plan = build / "nodes" / "media.trainer" / "plan.json"
    plan.write_text(plan.read_text().replace('"batch_size": 64', '"batch_size": 65'))
    out = _fldsl(["run", str(build)], tmp_path)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "plan.json was modified after compile" in out.stdout
    assert "node media.trainer failed" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr


def _one_node_run(tmp_path: Path, attempt: int) -> tuple[subprocess.CompletedProcess, int, str]:
    from fldsl.runtime.attestation.parties import local_deployment
    from fldsl.runtime.launcher import write_addresses

    root = tmp_path / f"try{attempt}"
    build = buildkit.vertical_build(root, rows=200, epochs=1)
    run_dir = root / "run"
    run_dir.mkdir()
    write_addresses(run_dir / "addresses.json", ["media.trainer", "shop.trainer"])
    trust = tmp_path / "trust"
    local_deployment(trust, ["media", "shop"])
    other = subprocess.Popen(
        [sys.executable, "-m", "fldsl.runtime.node", "--build", str(build), "--node", "shop.trainer",
         "--addresses", str(run_dir / "addresses.json"), "--run-dir", str(run_dir),
         "--trust-dir", str(trust / "shop"), "--connect-timeout", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        out = _fldsl(["run", str(build), "--node", "media.trainer", "--run-dir", str(run_dir),
                      "--trust-dir", str(trust)], tmp_path)
        shop_out, _ = other.communicate(timeout=120)
    finally:
        other.kill()
    return out, other.returncode, shop_out


def test_one_node_in_the_foreground(tmp_path: Path) -> None:
    for attempt in range(3):  # retried only if the checkout's code changed while it ran (sim measurement)
        before = code_digest.__wrapped__()
        out, shop_rc, shop_out = _one_node_run(tmp_path, attempt)
        if out.returncode == 0 or code_digest.__wrapped__() == before:
            break
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert shop_rc == 0
    # A node's stdout is progress lines for a launcher; the last one says it is done.
    last = [ln for ln in out.stdout.splitlines() if ln.startswith("@fldsl ")][-1]
    assert json.loads(last[len("@fldsl "):])["event"] == "done"
    assert '"event": "done"' in shop_out


def test_ctrl_c_stops_every_node_and_exits_130(tmp_path: Path) -> None:
    import signal
    import time

    code_digest.cache_clear()
    build = buildkit.vertical_build(tmp_path, rows=400, epochs=3, batch=8, checkpoint_every=5)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([*FLDSL, "run", str(build), "--run-dir", str(run_dir), "--trust-dir",
                             str(tmp_path / "trust")], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, COLUMNS="160"))
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and '"event": "checkpoint"' in metrics.read_text():
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C: the whole process group
    out, err = proc.communicate(timeout=60)
    if proc.returncode == 3 and "mr_enclave" in out:
        pytest.skip("the checkout's code changed between building and starting (sim measurement)")
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    assert "Traceback" not in out + err
    assert "interrupted" in out
    # The live display said SIMULATED (its last frame stays on screen), not only the final summary.
    assert "SIMULATED attestation (media.trainer, shop.trainer): " in out, out[-3000:]
    # Every node stopped at a step boundary and kept its last checkpoint.
    for node in ("media.trainer", "shop.trainer"):
        assert list((run_dir / "checkpoints" / node).glob("ckpt-*.sealed"))
