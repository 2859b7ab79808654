"""What the horizontal roles exchange besides the model: pooled preprocessing statistics (the `stats` flows:
each worker's, merged by the aggregator) and each worker's holdout summary per epoch, which the aggregator
combines into the model's metrics over all the workers' holdout rows (layout: fldsl.stdlib.tf.metrics).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fldsl.artifacts import POOLED_STATS, Flow
from fldsl.runtime.roles.common import PeerLimitExceeded, PeerProtocolError, RoleContext, RoleError
from fldsl.runtime.transport import keys

# The one message of each `stats` flow (its own flow: no other message shares it). A copy a restarted
# worker's previous process left unread is the same bytes (same rows, same statistics), so taking it
# instead of the new one changes nothing.
STATS_KEY = keys.step(0)


def stats_flows(ctx: RoleContext, src: str, dst: str) -> list[Flow]:
    return [f for f in ctx.policy.flows if f.src == src and f.dst == dst and f.kind == "stats"]


def recv_stats(ctx: RoleContext, flow: Flow) -> np.ndarray:
    """A `stats` message, checked: the flow guard fixed its dtype and shape; the values must be statistics
    (finite, whole non-negative counts, min <= max where there are values) or the sender is refused."""
    x = ctx.wait(lambda t: ctx.links[flow.src].recv(flow.id, STATS_KEY, t), flow.src)
    counts = x[:, [0, 5]] if x.ndim == 2 and x.shape[1] == len(POOLED_STATS) else None
    bad = counts is None or not np.isfinite(x).all() or (counts < 0).any() \
        or (counts != np.round(counts)).any() or (x[:, 2] < 0).any() \
        or ((x[:, 0] > 0) & (x[:, 3] > x[:, 4])).any()
    if bad:
        raise PeerLimitExceeded(f"{flow.src} sent preprocessing statistics that are not statistics (a count "
                                "that is negative or not whole, a negative spread, min above max, or a value "
                                "that is not finite): refusing", peer=flow.src)
    return x


def pool_stats(ctx: RoleContext, srv: str, train_ds: str, table: Any,
                train_rows: np.ndarray) -> dict[str, np.ndarray] | None:
    """Worker: send the statistics of this worker's pooled training columns, get the merge back (None: the
    pipeline pools none)."""
    from fldsl.runtime.preprocess import local_stats

    up, down = stats_flows(ctx, ctx.node, srv), stats_flows(ctx, srv, ctx.node)
    if not up or not down:
        return None
    spec = next(d for d in ctx.plan.data if d.name == train_ds)
    ctx.progress.emit("phase", name="pool statistics")
    ctx.links[srv].send(up[0].id, STATS_KEY, local_stats(spec, table.raw, train_rows))
    return {train_ds: recv_stats(ctx, down[0])}


def merge_stats(ctx: RoleContext, workers: list[str]) -> None:
    """Server: merge the workers' statistics (in the plan's worker order: every worker gets the same
    bytes) and send the merge to each. Nothing when the pipeline pools none."""
    from fldsl.runtime import preprocess

    ups = [f for w in workers for f in stats_flows(ctx, w, ctx.node)]
    if not ups:
        return
    merged = preprocess.merge_stats([recv_stats(ctx, f) for f in ups])
    for w in workers:
        for f in stats_flows(ctx, ctx.node, w):
            ctx.links[w].send(f.id, STATS_KEY, merged)


def summary_flow(ctx: RoleContext, worker: str, server: str) -> Flow | None:
    """The worker's `metrics` flow to the aggregator when it carries holdout summaries (a float64[1 + 2K,
    bins] spec). None for a build compiled before the summaries, whose flow had no spec: then neither side
    sends or waits for one, and the aggregator reports no holdout metrics, as before."""
    for f in ctx.policy.flows:
        if f.src == worker and f.dst == server and f.kind == "metrics":
            spec = f.spec
            if spec is not None and spec.dtype == "float64" and len(spec.shape) == 2 \
                    and all(isinstance(d, int) and d > 0 for d in spec.shape):
                return f
    return None


def summary_shape(flow: Flow) -> tuple[int, int]:
    assert flow.spec is not None
    rows, bins = flow.spec.shape
    assert rows is not None and bins is not None
    return rows, bins


def send_summary(ctx: RoleContext, flow: Flow, r: int, logits: np.ndarray | None, labels: np.ndarray,
                  train_losses: list[float]) -> None:
    """A worker's epoch summary, sent under the epoch's last round ``r`` (also with no holdout rows: the
    aggregator waits for every worker's)."""
    from fldsl.stdlib.tf import metrics as M

    plan = ctx.plan
    assert plan.loss is not None
    if logits is None:
        logits, labels = np.zeros((0, 1)), labels[:0]
    try:
        summary = M.holdout_summary(plan.loss.op, logits, labels, summary_shape(flow), train_losses)
    except ValueError as e:
        raise RoleError(f"{plan.node}: {e}; recompile the pipeline (`fldsl compile`)") from None
    ctx.links[flow.dst].send_arrays(flow.id, r, [summary])


def recv_summary(ctx: RoleContext, flow: Flow, r: int) -> np.ndarray:
    """Worker ``flow.src``'s summary of the epoch ending at round ``r``, checked before it is used: a
    message that is not exactly one well-formed summary of the flow's shape is refused naming the worker
    (exit code 3), as an upload of the wrong shape is. The flow guard has already bounded its size."""
    from fldsl.stdlib.tf import metrics as M

    w = flow.src
    arrays = ctx.wait(lambda t: ctx.links[w].recv_arrays(flow.id, r, t), w)
    why = f"{len(arrays)} arrays, not one summary" if len(arrays) != 1 else \
        M.summary_problem(np.asarray(arrays[0]), summary_shape(flow))
    if why is not None:
        raise PeerProtocolError(f"{w} sent a malformed metrics message for the epoch ending at round {r}: "
                                f"{why}; refusing it")
    return np.asarray(arrays[0])


def combined_metrics(ctx: RoleContext, flows: list[Flow], r: int) -> dict[str, Any]:
    """The model's metrics over all the workers' holdout rows (docs/language.md, "Training"): loss and
    accuracy exact, auc from the binned histograms (within the bound binned_auc gives)."""
    from fldsl.stdlib.tf import metrics as M

    summaries = [recv_summary(ctx, f, r) for f in flows]
    metrics, _ = M.combine_summaries(list[str](ctx.plan.train.metrics), summaries)
    return metrics

