"""``fldsl bench``'s flower mode: the round-overhead arithmetic (shared with fldsl's FedAvg modes), the skip
paths (no flwr, not FedAvg), and, where flwr is installed (the ``bench`` extra), one real Flower run next to
an attested fldsl run of the same pipeline, which must end with the same model."""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fldsl.bench.flower import (
    examples_after,
    fedavg_workers,
    local_steps_per_round,
    schedule,
    train_rows,
)
from fldsl.bench.harness import (
    ModeResult,
    fedavg_rounds,
    flower_result,
    flower_unavailable,
    round_overhead,
    summarise,
)
from fldsl.cli import main

REPO = Path(__file__).resolve().parents[2]
FEDAVG = REPO / "bench" / "pipelines" / "horizontal_fedavg_wd.flp"
VERTICAL = REPO / "pipelines" / "vertical_wide_deep.flp"
SMALL = ["--set", "rows=300", "--set", "buckets=1000", "--set", "batch=64"]


def test_round_overhead_is_the_median_round_less_the_slowest_workers_busy_time() -> None:
    # walls of three rounds; worker busy means 1.0 and 1.5 s: the slowest worker bounds the round
    assert round_overhead([2.0, 2.4, 2.2], [1.0, 1.5]) == pytest.approx((2.2, 0.7))
    assert round_overhead([], [1.0]) == (None, None)
    assert round_overhead([2.0], []) == (None, None)


def test_examples_after_counts_each_epochs_partial_last_batch() -> None:
    # 7,200 rows at batch 1,024: 8 steps per epoch, the 8th has 32 rows
    assert examples_after(3, 7200, 1024) == 3 * 1024
    assert examples_after(8, 7200, 1024) == 7200
    assert examples_after(9, 7200, 1024) == 7200 + 1024
    assert examples_after(16, 7200, 1024) == 14400


@pytest.fixture(scope="module")
def small_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fldsl.bench.harness import compile_for_bench

    return compile_for_bench(FEDAVG, {"rows": "300", "buckets": "1000", "batch": "64"},
                             tmp_path_factory.mktemp("build"), None)


def test_fedavg_schedule_and_worker_busy_from_step_events(small_build: Path) -> None:
    workers = fedavg_workers(small_build)
    assert [w.node for w in workers] == ["bank1.worker", "bank2.worker"]
    assert schedule(workers) == (3, 1)  # every epoch: one round per epoch
    plan = workers[0]
    n = train_rows(plan)
    assert n == 270  # 300 rows less the 10 % holdout
    per_round = local_steps_per_round(plan, n)
    assert per_round == math.ceil(270 / 64)
    # A worker whose rounds take 3.0 s (first: tracing) then 1.0, 1.2 s of busy time, each round 0.5 s more
    # on the wall. Its step events carry the meter's cumulative rate, as horizontal.worker emits it.
    busy = [3.0, 1.0, 1.2]
    t, cum, steps, rates = 10.0, 0.0, [], []
    for r, b in enumerate(busy, start=1):
        t += b + 0.5
        cum += b
        steps.append((t, r))
        rates.append(examples_after(r * per_round, n, 64) / cum)
    walls, got = fedavg_rounds(plan, steps, rates)
    assert walls == pytest.approx([1.5, 1.7])
    assert got == pytest.approx([1.0, 1.2])  # the tracing round is left out; partial batches counted right


def test_flower_result_uses_the_same_rounds_for_walls_and_busy_time() -> None:
    server = {"rounds": [
        {"round": 1, "start": 99.0, "end": 104.0,
         "clients": {"a": {"busy_s": 4.0, "examples": 100}, "b": {"busy_s": 4.5, "examples": 80}}},
        {"round": 2, "start": 104.1, "end": 107.0,
         "clients": {"a": {"busy_s": 1.0, "examples": 100}, "b": {"busy_s": 1.4, "examples": 80}}},
        {"round": 3, "start": 107.1, "end": 110.2,
         "clients": {"a": {"busy_s": 1.2, "examples": 100}, "b": {"busy_s": 1.2, "examples": 80}}},
    ], "final": {"a": {"auc": 0.7}}}
    res = ModeResult(mode="flower", rep=0, ok=True)
    flower_result(res, server, spawned_at=100.0)
    assert res.round_s == pytest.approx((3.0 + 3.2) / 2)
    assert res.round_overhead_s == pytest.approx(3.1 - 1.3)  # b is the slowest: (1.4 + 1.2) / 2
    assert res.examples_per_s == pytest.approx(360 / 6.2)
    assert res.first_step_s == pytest.approx(4.0)
    assert res.steps == 3 and res.metrics == {"a": {"auc": 0.7}}


def test_flower_overhead_ratios_are_paired_per_rep() -> None:
    def r(mode: str, rep: int, overhead: float | None, ok: bool = True) -> ModeResult:
        return ModeResult(mode=mode, rep=rep, ok=ok, round_s=2.0, round_overhead_s=overhead)

    results = [r("attested", 0, 1.0), r("flower", 0, 4.0), r("attested", 1, 2.0), r("flower", 1, 5.0),
               r("attested", 2, 1.0), r("flower", 2, 9.0, ok=False), r("plain", 0, 0.5)]
    s = summarise(results, 3)
    assert s["flower"]["overhead_vs_attested"] == pytest.approx((4.0 + 2.5) / 2)
    assert s["flower"]["overhead_vs_plain"] == pytest.approx(8.0)
    assert s["flower"]["ok_reps"] == 2


def _fake_flwr(tmp_path: Path, error: str) -> dict[str, str]:
    pkg = tmp_path / "shadow" / "flwr"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"raise {error}\n")
    return {"PYTHONPATH": str(pkg.parent), "PATH": "/usr/bin:/bin"}


def test_flower_unavailable_says_why_in_one_line(tmp_path: Path) -> None:
    missing = flower_unavailable(sys.executable, _fake_flwr(tmp_path / "a", "ModuleNotFoundError(\"No module "
                                                                                 "named 'flwr'\")"))
    assert missing is not None and "flwr is not installed" in missing and "fldsl[bench]" in missing
    broken = flower_unavailable(sys.executable, _fake_flwr(tmp_path / "b", "ImportError('protobuf too new')"))
    assert broken is not None and "flwr does not import" in broken and "protobuf too new" in broken
    assert "\n" not in missing + broken


def test_flower_mode_skipped_with_a_reason_when_flwr_is_missing(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fldsl.bench.harness.flower_unavailable", lambda **_: "flwr is not installed (test)")
    res = CliRunner().invoke(main, ["bench", str(FEDAVG), *SMALL, "--modes", "flower", "--reps", "1",
                                    "--out", str(tmp_path / "out"), "--trust-dir", str(tmp_path / "trust")],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "flower: skipped — flwr is not installed (test)" in res.output
    (doc,) = (tmp_path / "out").glob("*/*/results.json")
    assert json.loads(doc.read_text())["skipped"] == {"flower": "flwr is not installed (test)"}


def test_flower_mode_skipped_for_a_pipeline_that_is_not_fedavg(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["bench", str(VERTICAL), "--set", "rows=300", "--modes", "flower",
                                    "--reps", "1", "--out", str(tmp_path / "out"),
                                    "--trust-dir", str(tmp_path / "trust")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "flower: skipped — the pipeline is not horizontal FedAvg" in res.output


@pytest.mark.e2e
@pytest.mark.slow
def test_flower_trains_the_same_model_as_fldsl(tmp_path: Path) -> None:
    pytest.importorskip("flwr", reason="flwr is not installed (the `bench` extra): flower mode skipped")
    out = tmp_path / "out"
    args = ["bench", str(FEDAVG), *SMALL, "--modes", "attested,flower", "--reps", "1", "--steps", "8",
            "--out", str(out), "--trust-dir", str(tmp_path / "trust")]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rows = [line.split("│")[1].strip() for line in res.output.splitlines() if line.startswith("│")]
    assert rows == ["attested", "flower"], res.output
    assert "flower / fldsl round overhead (paired)" in res.output
    (doc_path,) = out.glob("horizontal_fedavg_wd/*/results.json")
    doc = json.loads(doc_path.read_text())
    by_mode = {r["mode"]: r for r in doc["results"]}
    flower, attested = by_mode["flower"], by_mode["attested"]
    assert flower["ok"], flower["error"]
    assert flower["steps"] == attested["steps"] == 3
    assert flower["round_s"] > 0 and flower["round_overhead_s"] is not None
    assert set(flower["peak_rss_bytes"]) == {"flower.server", "bank1.worker", "bank2.worker"}
    assert doc["summary"]["flower"]["overhead_vs_attested"] is not None or \
        attested["round_overhead_s"] <= 0  # no ratio to a (noisy) non-positive overhead
    # Same data, model, seed, optimiser and schedule: the final models score the same on each holdout.
    assert set(flower["metrics"]) == set(attested["metrics"]) == {"bank1.worker", "bank2.worker"}
    for node, m in attested["metrics"].items():
        for key in ("loss", "auc"):
            assert flower["metrics"][node][key] == pytest.approx(m[key], rel=1e-4), (node, key)
    # every round of the Flower server's report had both clients
    (server,) = (out / "horizontal_fedavg_wd").glob("*/rep0-flower/reports/flower.server.json")
    rounds = json.loads(server.read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(set(r["clients"]) == {"bank1.worker", "bank2.worker"} for r in rounds)
    assert all(b["end"] > a["end"] for a, b in itertools.pairwise(rounds))
