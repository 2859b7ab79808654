"""``fldsl bench``: a tiny vertical pipeline three ways end to end, and the plain mode's harness guard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fldsl.cli import main

REPO = Path(__file__).resolve().parents[2]
FLP = REPO / "pipelines" / "vertical_wide_deep.flp"


@pytest.mark.e2e
def test_bench_prints_three_rows_and_records_results(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    res = CliRunner().invoke(main, [
        "bench", str(FLP), "--set", "rows=300", "--reps", "1", "--steps", "8", "--out", str(out),
        "--trust-dir", str(tmp_path / "trust")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rows = [line for line in res.output.splitlines() if line.startswith("│")]
    assert [r.split("│")[1].strip() for r in rows] == ["native", "plain", "attested"], res.output
    assert "attested / plain (paired)" in res.output

    (doc_path,) = out.glob("vertical_wide_deep/*/results.json")
    doc = json.loads(doc_path.read_text())
    by_mode = {r["mode"]: r for r in doc["results"]}
    assert set(by_mode) == {"native", "plain", "attested"}
    for r in by_mode.values():
        assert r["ok"], r
        assert r["examples_per_s"] > 0 and r["first_step_s"] > 0
        assert all(v > 50 * 2**20 for v in r["peak_rss_bytes"].values())  # TF is in every process
        assert r["steps"] >= 8
    assert set(by_mode["attested"]["peak_rss_bytes"]) == {"media.trainer", "shop.trainer"}
    # Same model and data: the federated runs move the same activations and gradients.
    assert by_mode["plain"]["wire_bytes"] > 0
    assert by_mode["plain"]["wire_bytes"] == by_mode["attested"]["wire_bytes"]
    assert doc["summary"]["attested"]["vs_native"] > 0

    run_root = doc_path.parent
    plain_log = (run_root / "rep0-plain" / "logs" / "shop.trainer.log").read_text()
    attested_log = (run_root / "rep0-attested" / "logs" / "shop.trainer.log").read_text()
    assert "INSECURE BENCH MODE" in plain_log
    assert "INSECURE BENCH MODE" not in attested_log
    assert "NOT ATTESTED" not in attested_log


def _bench_node(tmp_path: Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLDSL_BENCH")}
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-m", "fldsl.bench.node", "--mode", "plain", "--report",
         str(tmp_path / "reports" / "x.json"), "--", "--build", "b", "--node", "n"],
        capture_output=True, text=True, env=env, timeout=60)


def test_plain_mode_refused_outside_the_harness(tmp_path: Path) -> None:
    res = _bench_node(tmp_path, {})
    assert res.returncode == 2
    assert "started by `fldsl bench` only" in res.stderr
    assert "INSECURE" not in res.stderr


def test_plain_mode_refused_with_a_wrong_secret_or_parent(tmp_path: Path) -> None:
    secret = tmp_path / "reports" / ".bench-token"
    secret.parent.mkdir()
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"right")
    os.close(fd)
    wrong = _bench_node(tmp_path, {"FLDSL_BENCH_TOKEN": "wrong", "FLDSL_BENCH_HARNESS_PID": str(os.getpid())})
    assert wrong.returncode == 2 and "secret does not match" in wrong.stderr
    # The right secret, but this test process is not the parent named: a process that merely copied the
    # environment of a bench child cannot start a plain node either.
    other = _bench_node(tmp_path, {"FLDSL_BENCH_TOKEN": "right", "FLDSL_BENCH_HARNESS_PID": "1"})
    assert other.returncode == 2 and "not the bench harness" in other.stderr
    # A secret others can read is not accepted.
    secret.chmod(0o644)
    loose = _bench_node(tmp_path, {"FLDSL_BENCH_TOKEN": "right", "FLDSL_BENCH_HARNESS_PID": str(os.getpid())})
    assert loose.returncode == 2 and "secret does not match" in loose.stderr


def test_fldsl_run_never_starts_the_bench_node(tmp_path: Path) -> None:
    from fldsl.runtime.launcher import node_command

    cmd = node_command(tmp_path, "a.b", tmp_path / "addresses.json", tmp_path, tmp_path)
    assert cmd[1:4] == ["-I", "-m", "fldsl.runtime.node"]


def test_ratios_are_paired_per_rep_and_failed_reps_left_out() -> None:
    from fldsl.bench.harness import ModeResult, summarise

    def r(mode: str, rep: int, exs: float, rss: dict[str, int], ok: bool = True) -> ModeResult:
        return ModeResult(mode=mode, rep=rep, ok=ok, examples_per_s=exs, first_step_s=1.0, peak_rss_bytes=rss)

    results = [
        # rep 0: a slow machine for everybody; rep 1: fast; rep 2: attested failed
        r("native", 0, 100.0, {"native": 10}), r("plain", 0, 80.0, {"a": 11}),
        r("attested", 0, 60.0, {"a": 12}),
        r("native", 1, 300.0, {"native": 10}), r("plain", 1, 240.0, {"a": 11}),
        r("attested", 1, 180.0, {"a": 9, "b": 13}),
        r("native", 2, 200.0, {"native": 10}), r("plain", 2, 150.0, {"a": 11}),
        r("attested", 2, 0.0, {}, ok=False),
    ]
    s = summarise(results, 3)
    # Unpaired medians would give 180/200 = 0.9; the per-rep ratios are 0.6 and 0.6.
    assert s["attested"]["vs_native"] == pytest.approx(0.6)
    assert s["attested"]["vs_plain"] == pytest.approx(0.75)
    assert s["plain"]["vs_native"] == pytest.approx(0.8)
    assert s["attested"]["ok_reps"] == 2
    assert s["attested"]["rss_vs_native"] == pytest.approx(1.25)  # the largest process per rep: 12, 13
