"""FedAvg / sync parameter server: the server's float32 streaming average, resume with weight-free worker
checkpoints (the server sends the agreed step's weights), optimiser state carried by worker checkpoints."""

from __future__ import annotations

import io
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import buildkit
import memlink

from fldsl.runtime.checkpoint import RollbackDetected
from fldsl.runtime.roles import hwire
from fldsl.runtime.roles.aggregate import Average
from fldsl.runtime.roles.common import Interrupted


def _uploads(rng: np.random.Generator, n: int) -> list[list[np.ndarray]]:
    shapes = [(300, 7), (5,), (70001,), ()]  # 70001: more than one block would be with a small BLOCK
    out = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(n)]
    for up in out:
        for a in up:
            a.setflags(write=False)  # as received: read-only views of transport buffers
    return out


def _reference(ups: list[list[np.ndarray]], weights: list[float]) -> list[np.ndarray]:
    coef = np.asarray(weights, np.float64) / sum(weights)
    return [sum(c * u[i].astype(np.float64) for c, u in zip(coef, ups, strict=True))
            for i in range(len(ups[0]))]


@pytest.mark.parametrize("block", [Average.BLOCK, 1000])
def test_average_is_the_weighted_mean_in_float32(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Average, "BLOCK", block)
    rng = np.random.default_rng(0)
    avg = Average()
    for rnd in range(2):  # the accumulator is reused: the second round must not see the first
        ups = _uploads(rng, 3)
        counts = [7200.0, 800.0, 3.0] if rnd == 0 else [1.0, 1.0, 1.0]
        avg.reset()
        kept = [a for a in avg.acc]
        for u, c in zip(ups, counts, strict=True):
            avg.fold(u, c)
        if rnd == 1:
            assert all(a is b for a, b in zip(avg.acc, kept, strict=True)), "accumulator reallocated"
        for got, want in zip(avg.acc, _reference(ups, counts), strict=True):
            assert got.dtype == np.float32
            # float32 running mean vs float64 weighted sum: a few float32 ulps of the values (|x| ~ 1),
            # not bit-equal (the earlier server averaged in float64).
            np.testing.assert_allclose(got, want, rtol=0, atol=4 * np.finfo(np.float32).eps * 4)


def test_average_zero_weights_fall_back_to_the_plain_mean() -> None:
    rng = np.random.default_rng(1)
    ups = _uploads(rng, 3)
    avg = Average()
    for u in ups:
        avg.fold(u, 0.0)
    for got, want in zip(avg.acc, _reference(ups, [1.0, 1.0, 1.0]), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # An empty first worker contributes nothing once another has examples.
    avg.reset()
    for u, c in zip(ups, [0.0, 3.0, 1.0], strict=True):
        avg.fold(u, c)
    for got, want in zip(avg.acc, _reference(ups[1:], [3.0, 1.0]), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def _weights(run_dir: Path) -> list[np.ndarray]:
    from fldsl.runtime import sealing

    name = "hub.ps/model"
    data = sealing.unseal_file(run_dir / "models" / "hub.ps_model.sealed", key=memlink.KEY, node_id="hub.ps",
                               name=name)
    with np.load(io.BytesIO(data)) as npz:
        return [npz[k] for k in sorted(npz.files)]


def _set_optimizer(build: Path, name: str) -> None:
    for plan_file in (build / "nodes").glob("*/plan.json"):
        doc = json.loads(plan_file.read_text())
        doc["train"]["optimizer"] = {"name": name, "params": {"learning_rate": 0.01}}
        plan_file.write_text(json.dumps(doc))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fedavg_resume_matches_uninterrupted(tmp_path: Path, optimizer: str) -> None:
    # 2 x 200 rows, 160 for training, batch 32: 5 local steps an epoch, a round every 2 -> 5 rounds;
    # checkpoints every round. Adam: the workers' local slots must survive the restart (worker checkpoints).
    build = buildkit.horizontal_build(tmp_path, mode="fedavg", epochs=2, rows=400, every_steps=2,
                                      checkpoint_every=1)
    _set_optimizer(build, optimizer)
    full = memlink.run_in_threads(build, tmp_path / "full")
    assert all(not isinstance(r, BaseException) for r in full.values()), full
    part = memlink.run_in_threads(build, tmp_path / "part", stop_after={"hub.ps": 2})
    assert any(isinstance(r, Interrupted) for r in part.values()), part
    # Worker checkpoints hold the optimiser state and the cursor, never the (server's) weights.
    for w in ("bank1.worker", "bank2.worker"):
        store = memlink.store_of(build, tmp_path / "part", w)
        assert store.steps()
        arrays = store.load(store.latest()).arrays
        assert not [k for k in arrays if k.startswith("w")]
        # SGD: its step counter only; Adam: the counter and two slots per variable.
        assert (len(arrays) > 1) == (optimizer == "adam"), sorted(arrays)
    resumed = memlink.run_in_threads(build, tmp_path / "part")
    assert all(not isinstance(r, BaseException) for r in resumed.values()), resumed
    assert resumed["hub.ps"]["steps"] == 5
    for x, y in zip(_weights(tmp_path / "full"), _weights(tmp_path / "part"), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert resumed["bank1.worker"]["metrics"]["auc"] == pytest.approx(full["bank1.worker"]["metrics"]["auc"],
                                                                     abs=1e-6)


def test_fedavg_resume_after_the_server_lost_its_newest_checkpoint(tmp_path: Path) -> None:
    """The server's newest checkpoint is deleted: the resume is refused as a rollback; allowed explicitly,
    all roll back to the newest step the server still has (the workers' weight-free checkpoints there are
    completed by the weights the server sends)."""
    build = buildkit.horizontal_build(tmp_path, mode="fedavg", epochs=2, rows=400, every_steps=2,
                                      checkpoint_every=1)
    full = memlink.run_in_threads(build, tmp_path / "full")
    assert all(not isinstance(r, BaseException) for r in full.values()), full
    part = memlink.run_in_threads(build, tmp_path / "part", stop_after={"hub.ps": 3})
    assert any(isinstance(r, Interrupted) for r in part.values())
    hub = memlink.store_of(build, tmp_path / "part", "hub.ps")
    steps = hub.steps()
    assert len(steps) == 2, steps
    hub.path(steps[-1]).unlink()
    refused = memlink.run_in_threads(build, tmp_path / "part")
    assert isinstance(refused["hub.ps"], RollbackDetected), refused
    assert f"checkpoint of step {steps[-1]}" in str(refused["hub.ps"])
    resumed = memlink.run_in_threads(build, tmp_path / "part", allow_rollback=True)
    assert all(not isinstance(r, BaseException) for r in resumed.values()), resumed
    for x, y in zip(_weights(tmp_path / "full"), _weights(tmp_path / "part"), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_piece_layout_covers_every_row_once_within_the_limit() -> None:
    shapes = [(1000, 16), (7,), (), (3, 5), (100_000,), (1, 4096)]
    limit = 4096
    layout = hwire.piece_layout(shapes, [4] * len(shapes), limit)
    seen: dict[int, list[tuple[int, int]]] = {}
    for piece in layout:
        size = 0
        for seg in piece:
            shape = shapes[seg.var]
            lo, hi = seg.rows if seg.rows is not None else (0, shape[0] if shape else 1)
            seen.setdefault(seg.var, []).append((lo, hi))
            size += (hi - lo) * int(np.prod(shape[1:])) * 4
        # Only a variable that cannot be cut (a scalar, or one row) may exceed the limit, alone.
        alone = shapes[piece[0].var] if len(piece) == 1 else None
        assert size <= limit or (alone is not None and (not alone or alone[0] < 2))
    for i, shape in enumerate(shapes):
        ranges = seen[i]
        assert ranges[0][0] == 0 and ranges[-1][1] == (shape[0] if shape else 1)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges)), ranges
    assert [s.var for p in layout for s in p] == sorted(s.var for p in layout for s in p)
    assert hwire.piece_layout([], []) == [[]]  # nothing to average: one piece carries the count


def test_fedavg_in_small_pieces_equals_whole_messages(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Cutting the weights into many row-range pieces (the server folds and returns each as it arrives)
    gives bit-identical weights and metrics to moving each variable whole."""
    build = buildkit.horizontal_build(tmp_path, mode="fedavg", epochs=2, rows=400, every_steps=2)
    monkeypatch.setattr(hwire, "PIECE_BYTES", 1 << 30)
    whole = memlink.run_in_threads(build, tmp_path / "whole")
    monkeypatch.setattr(hwire, "PIECE_BYTES", 72)
    cut = memlink.run_in_threads(build, tmp_path / "cut")
    for res in (whole, cut):
        assert all(not isinstance(r, BaseException) for r in res.values()), res
    shapes = [tuple(a.shape) for a in _weights(tmp_path / "whole")]
    layout = hwire.piece_layout(shapes, [4] * len(shapes), 72)
    assert len(layout) > len(shapes) + 4 and any(len(p) > 1 for p in layout)  # cut and grouped
    for x, y in zip(_weights(tmp_path / "whole"), _weights(tmp_path / "cut"), strict=True):
        np.testing.assert_array_equal(x, y)
    assert cut["bank1.worker"]["history"] == whole["bank1.worker"]["history"]


@pytest.mark.parametrize("every_steps", [None, 3])
def test_the_flower_bench_schedule_is_the_servers(tmp_path: Path, every_steps: int | None) -> None:
    """The Flower bench computes fldsl's FedAvg schedule without running the server (rounds, rounds per
    epoch, each worker's local steps): it must be what ``horizontal.server`` decides from the same rows."""
    from fldsl.bench.flower import fedavg_workers, local_steps_per_round, schedule, train_rows
    from fldsl.runtime.roles import horizontal

    build = buildkit.horizontal_build(tmp_path, mode="fedavg", epochs=2, rows=300, every_steps=every_steps)
    workers = fedavg_workers(build)
    rows = [train_rows(w) for w in workers]
    server = horizontal.schedule(workers[0], rows)
    assert schedule(workers) == (server.rounds, server.rounds_per_epoch)
    assert [local_steps_per_round(w, n) for w, n in zip(workers, rows, strict=True)] == server.local_steps
    assert server.rounds == (2 if every_steps is None else math.ceil(server.steps_per_epoch * 2 / 3))
