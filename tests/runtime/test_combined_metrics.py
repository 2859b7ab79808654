"""The aggregator's metrics (issue #12): horizontal / distributed workers send a holdout summary per epoch
on the `metrics` flow, the server combines them into the model's loss, accuracy (exact) and AUC (binned,
within a bound it can compute), reports them, keeps them in its checkpoints, and refuses a malformed summary
naming the worker."""

from __future__ import annotations

import math
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import buildkit
import memlink

from fldsl.artifacts import Policy, load_model, node_dir
from fldsl.compiler.flows import METRIC_BINS
from fldsl.stdlib.tf import metrics as M

REPO = Path(__file__).resolve().parents[2]


def _ok(results: dict[str, Any]) -> None:
    for node, r in results.items():
        assert not isinstance(r, BaseException), f"{node}: {r!r}"


def _split(n: int, parts: int, rng: np.random.Generator) -> list[np.ndarray]:
    cuts = np.sort(rng.choice(np.arange(1, n), parts - 1, replace=False))
    return np.split(np.arange(n), cuts)


@pytest.mark.parametrize(("loss_op", "width"), [("sigmoid_cross_entropy", 1), ("softmax_cross_entropy", 2),
                                                ("softmax_cross_entropy", 3)])
def test_combined_summaries_equal_the_metrics_of_the_union(loss_op: str, width: int) -> None:
    rng = np.random.default_rng(7)
    n = 3000
    classes = max(width, 2)
    labels = rng.integers(0, classes, n)
    # Informative, overlapping logits (AUC well inside (0.5, 1)); a few exact ties across workers too.
    logits = rng.normal(size=(n, width)) + (labels[:, None] == np.arange(width)) * 0.8
    if width == 1:
        logits = rng.normal(size=(n, 1)) + labels[:, None] * 1.2
    logits[:50] = logits[50:100]
    wanted = ["loss", "auc", "accuracy"]
    k = 1 if width <= 2 else width
    shape = (1 + 2 * k, METRIC_BINS)
    parts = _split(n, 3, rng)
    train = [[0.5, 0.7], [0.6], [0.4, 0.2, 0.3]]
    summaries = [M.holdout_summary(loss_op, logits[p], labels[p], shape, t) for p, t in zip(parts, train,
                                                                                         strict=True)]
    assert all(M.summary_problem(s, shape) is None for s in summaries)
    got, bound = M.combine_summaries(wanted, summaries)
    want = M.evaluate_logits(loss_op, wanted, logits, labels)  # exact, over the union of the holdouts
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-12)
    assert got["accuracy"] == want["accuracy"]
    assert got["train_loss"] == pytest.approx(np.mean([x for t in train for x in t]), rel=1e-12)
    assert 0 < bound < 0.01  # 1000 bins: pairs sharing a bin are rare for spread scores
    assert abs(got["auc"] - want["auc"]) <= bound + 1e-12
    assert got["auc"] != want["auc"]  # binned, not exact: the check above is the bound's, not equality


def test_binned_auc_bound_is_reached_when_every_score_shares_a_bin() -> None:
    # All scores in one bin: binned AUC 1/2, bound 1/2; the exact AUC (1.0 here) is at the bound's edge.
    scores = np.array([0.1001, 0.1002, 0.1003, 0.1004])
    labels = np.array([0, 0, 1, 1])
    s = M.holdout_summary("sigmoid_cross_entropy", np.log(scores / (1 - scores))[:, None], labels,
                          (3, METRIC_BINS))
    value, bound = M.binned_auc(s[1], s[2])
    assert (value, bound) == (0.5, 0.5)
    assert M.auc(labels, scores) == pytest.approx(value + bound)
    assert all(math.isnan(x) for x in M.binned_auc(s[1], np.zeros(METRIC_BINS)))


def _good() -> np.ndarray:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 40)
    logits = rng.normal(size=(40, 1))
    return M.holdout_summary("sigmoid_cross_entropy", logits, labels, (3, METRIC_BINS), [1.0])


@pytest.mark.parametrize(("corrupt", "why"), [
    (lambda s: s[:2], "float64[3, 1000] expected"),
    (lambda s: s.astype(np.float32), "float64[3, 1000] expected"),
    (lambda s: _set(s, (1, 4), -1.0), "non-negative whole numbers"),
    (lambda s: _set(s, (2, 4), 0.5), "non-negative whole numbers"),
    (lambda s: _set(s, (1, 4), np.inf), "non-negative whole numbers"),
    (lambda s: _set(s, (0, 2), 41.0), "41 correct rows of 40"),
    (lambda s: _set(s, (0, 7), 3.0), "past its 5 used cells"),
    (lambda s: _set(s, (1, 999), s[1, 999] + 1), "class curve 0 counts 41 rows of 40"),
])
def test_malformed_summaries_are_named(corrupt: Any, why: str) -> None:
    assert M.summary_problem(_good(), (3, METRIC_BINS)) is None
    problem = M.summary_problem(corrupt(_good()), (3, METRIC_BINS))
    assert problem is not None and why in problem


def _set(s: np.ndarray, at: tuple[int, int], value: float) -> np.ndarray:
    s = s.copy()
    s[at] = value
    return s


def test_a_diverged_loss_is_reported_not_refused() -> None:
    assert M.summary_problem(_set(_good(), (0, 1), np.nan), (3, METRIC_BINS)) is None


def test_compiled_metrics_flow_is_a_sized_protocol_flow(tmp_path: Path) -> None:
    from fldsl.api import compile_pipeline
    from fldsl.runtime.transport import FlowRefused
    from fldsl.runtime.transport.guard import FlowGuard, WireSpec

    build = compile_pipeline(REPO / "pipelines" / "horizontal_dlrm.flp", out_dir=tmp_path / "b").build_dir
    policy = load_model(Policy, node_dir(build, "hub.ps") / "policy.json")
    flows = [f for f in policy.flows if f.kind == "metrics"]
    assert len(flows) == 4
    for f in flows:
        assert f.spec is not None and f.spec.shape == [3, METRIC_BINS] and f.spec.dtype == "float64"
        assert f.rule.startswith("(protocol) epoch summary of ") and "no rows or per-row labels" in f.rule
    guard = FlowGuard(policy, "hub.ps")
    f = flows[0]
    guard.check_recv(f.src, f.id, "arrays", [WireSpec("float64", (3, METRIC_BINS))], 3 * METRIC_BINS * 8)
    with pytest.raises(FlowRefused) as e:  # oversized: refused by the transport before the role sees it
        guard.check_recv(f.src, f.id, "arrays", [WireSpec("float64", (9, METRIC_BINS))], 9 * METRIC_BINS * 8)
    assert e.value.peer == f.src
    with pytest.raises(FlowRefused):
        guard.check_recv(f.src, f.id, "arrays", [WireSpec("float64", (3, 999))], 3 * 999 * 8)


class _Spy:
    """Records the (logits, labels) each worker summarised last (the holdout scores of the final model)."""

    def __init__(self) -> None:
        self.last: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._real = M.holdout_summary

    def __call__(self, loss_op: str, logits: np.ndarray, labels: np.ndarray, shape: tuple[int, int],
                 train_losses: Any = ()) -> np.ndarray:
        self.last[threading.current_thread().name] = (np.array(logits), np.array(labels))
        return self._real(loss_op, logits, labels, shape, train_losses)


@pytest.mark.parametrize("scenario", ["horizontal", "distributed"])
def test_aggregator_reports_the_union_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              scenario: str) -> None:
    spy = _Spy()
    monkeypatch.setattr(M, "holdout_summary", spy)
    if scenario == "horizontal":
        build = buildkit.horizontal_build(tmp_path, mode="sync", epochs=2, rows=600, summaries=True)
        server, workers = "hub.ps", ["bank1.worker", "bank2.worker"]
    else:
        build = buildkit.distributed_build(tmp_path, rows=600, epochs=2, summaries=True)
        server, workers = "cloud.ps", ["cloud.worker1", "cloud.worker2"]
    res = memlink.run_in_threads(build, tmp_path / "run")
    _ok(res)
    hist = res[server]["history"]
    assert [h["epoch"] for h in hist] == [1, 2]
    got = res[server]["metrics"]
    assert len(spy.last) == len(workers)
    logits = np.concatenate([x for x, _ in spy.last.values()])
    labels = np.concatenate([y for _, y in spy.last.values()])
    want = M.evaluate_logits("softmax_cross_entropy", ["loss", "auc"], logits, labels)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-9)
    summary = M.holdout_summary("softmax_cross_entropy", logits, labels, (3, METRIC_BINS))
    _, bound = M.binned_auc(summary[1], summary[2])
    assert abs(got["auc"] - want["auc"]) <= bound + 1e-12  # it can reach the bound: few same-bin pairs
    assert bound < 0.02
    # The workers still report their own holdout's metrics; the model's loss lies between theirs.
    per = [res[w]["metrics"]["loss"] for w in workers]
    assert min(per) <= got["loss"] <= max(per)
    assert (tmp_path / "run" / "tensorboard" / server).is_dir()


def test_aggregator_history_survives_a_resume(tmp_path: Path) -> None:
    build = buildkit.horizontal_build(tmp_path, mode="sync", epochs=2, rows=200, checkpoint_every=2,
                                      summaries=True)
    full = memlink.run_in_threads(build, tmp_path / "full")
    _ok(full)
    memlink.run_in_threads(build, tmp_path / "part", stop_after={"hub.ps": 4})  # in epoch 2 (3 steps each)
    resumed = memlink.run_in_threads(build, tmp_path / "part")
    _ok(resumed)
    a, b = full["hub.ps"]["history"], resumed["hub.ps"]["history"]
    assert [h["epoch"] for h in b] == [1, 2]  # epoch 1's metrics came back from the checkpoint
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (key, x, y)


def test_a_malformed_metrics_message_is_refused_naming_the_worker(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from fldsl.runtime.node import _classify
    from fldsl.runtime.roles import hsummary
    from fldsl.runtime.roles.common import PeerProtocolError

    real = hsummary.send_summary

    def lying(ctx: Any, flow: Any, r: int, logits: Any, labels: Any, losses: list[float]) -> None:
        if ctx.node != "bank2.worker":
            return real(ctx, flow, r, logits, labels, losses)
        bad = np.zeros((3, METRIC_BINS))
        bad[0, 0], bad[0, 2] = 10, 11  # more correct rows than rows
        ctx.links[flow.dst].send_arrays(flow.id, r, [bad])
        return None

    monkeypatch.setattr(hsummary, "send_summary", lying)
    build = buildkit.horizontal_build(tmp_path, mode="sync", epochs=1, rows=200, summaries=True)
    res = memlink.run_in_threads(build, tmp_path / "run", timeout=120)
    err = res["hub.ps"]
    assert isinstance(err, PeerProtocolError), err
    assert "bank2.worker sent a malformed metrics message" in str(err) and "11 correct rows of 10" in str(err)
    assert _classify(err)[0] == 3


def test_builds_without_summary_flows_still_run(tmp_path: Path) -> None:
    # A build compiled before the summaries (metrics flow without a spec, or none): no combined metrics.
    build = buildkit.horizontal_build(tmp_path, mode="fedavg", epochs=1, rows=200)
    res = memlink.run_in_threads(build, tmp_path / "run")
    _ok(res)
    assert res["hub.ps"]["metrics"] == {} and "auc" in res["bank1.worker"]["metrics"]
