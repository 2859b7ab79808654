"""Vertical prediction split over the attested channel (``fldsl predict``; a node started with ``--predict``).

Every party's node runs on its own new rows with its own part of the trained model (its SavedModel pack,
unsealed with its own sealing key, or a folder ``fldsl model decrypt`` wrote), over the same attested links
and the same declared flows as training, and nothing else:

1. ``control``: each side says it is predicting (a peer still training would wait for a resume agreement
   instead; this turns that into a clear error rather than two nodes waiting on each other);
2. ``psi``: the label owner (PSI leader) aligns its ids with each passive's, exactly as training does; it
   keeps the ids every party has, in its own row order;
3. ``holdout`` (the flow that carries row positions in training): the label owner sends each passive the
   positions of those ids in that pair's PSI output (with one passive, simply 0..n-1);
4. the activation flows: each passive computes its cut-layer tensors for those rows, ``batch_size`` rows per
   message as in training, and sends them; the label owner computes the scores with its part and writes
   ``id,score`` (``id,score_0,...`` for more than two classes) to its ``--predict-out`` file.

No labels are read or sent, no gradient flows, no checkpoint is written.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from fldsl.runtime.bundle import limit_for
from fldsl.runtime.roles.common import (
    PeerLimitExceeded,
    RoleContext,
    RoleError,
    batches,
    configure_tf,
    pack_arrays,
    recv_chunked,
    send_chunked,
    unpack_arrays,
)
from fldsl.runtime.roles.split import rows_of as _rows_of
from fldsl.runtime.roles.vertical import _align_peer, align_all
from fldsl.runtime.transport import keys

CTRL_PREDICT = keys.control(keys.Control.PREDICT)  # both ways: "this node is predicting"
ALIGN_KEY = keys.control(keys.Control.ALIGN)  # active -> passive: the rows to score (vertical's _align_peer)
HELLO = {"mode": "predict"}


def run(ctx: RoleContext) -> dict[str, Any]:
    """The node's prediction; ``ctx.cache["predict"]`` holds ``part`` (the opened model, a
    ``fldsl.runtime.predict.Part``) and ``out`` (the label owner's output file)."""
    configure_tf()
    family, _, kind = ctx.plan.role.partition(".")
    if family != "vertical":
        raise RoleError(f"{ctx.node}: split prediction is for vertical pipelines; a {family} model scores "
                        "locally (fldsl predict BUILD --model ... --data ..., without --node)")
    return _active(ctx) if kind == "active" else _passive(ctx)


def _hello(ctx: RoleContext, peer: str) -> None:
    ctx.send_json(peer, CTRL_PREDICT, HELLO)
    try:
        got = ctx.recv_json(peer, CTRL_PREDICT)
    except RoleError as e:
        raise RoleError(f"{e} (is {peer} running in predict mode too? every node of the pipeline must be "
                        "started with its model: fldsl predict)") from None
    if got != HELLO:
        raise RoleError(f"{peer} answered {got!r} instead of starting prediction")


def _table(ctx: RoleContext) -> tuple[str, Any]:
    from fldsl.runtime.predict import PredictError, read_table

    if len(ctx.plan.data) != 1:
        raise RoleError(f"{ctx.node}: vertical prediction expects one data set per node, the plan has "
                        f"{len(ctx.plan.data)}")
    spec = ctx.plan.data[0]
    try:
        return spec.name, read_table(spec, None)
    except PredictError as e:
        from fldsl.runtime.data import DataError

        raise DataError(str(e)) from None


def _active(ctx: RoleContext) -> dict[str, Any]:
    from fldsl.runtime import savedmodel as sm
    from fldsl.runtime.predict import _feeds

    plan, part = ctx.plan, ctx.cache["predict"]["part"]
    passives = [p.id for p in plan.peers]
    for p in passives:
        _hello(ctx, p)
    ds_name, table = _table(ctx)
    ids, row_of, pairwise, common = align_all(ctx, table, passives)
    final = [i for i in ids if i in common]  # the label owner's row order
    for p in passives:
        where = {i: k for k, i in enumerate(pairwise[p])}
        positions = np.array([where[i] for i in final], dtype=np.int64)
        send_chunked(ctx, p, ctx.holdout_flow(plan.node, p), ALIGN_KEY, pack_arrays({"rows": positions}))
    ctx.progress.emit("aligned", rows=len(final), train=0, holdout=len(final))
    if not final:
        raise RoleError(f"{ctx.node}: the parties' rows have no id in common: nothing to score")

    recv_flows = [(p, f) for p in passives for f in ctx.policy.flows
                  if f.src == p and f.dst == plan.node and f.kind == "activation"]
    wanted = {inp["ref"] for inp in part.inputs().values() if inp["source"] != "data"}
    missing = sorted(wanted - {f.tensor for _, f in recv_flows})
    if missing:
        raise RoleError(f"{ctx.node}: its model reads {', '.join(missing)}, which no activation flow of the "
                        "policy brings")
    rows = np.array([row_of[i] for i in final], dtype=np.int64)
    own = _feeds(part, table, rows, ds_name)
    scores = []
    for k, idx in enumerate(batches(np.arange(len(final)), plan.train.batch_size)):
        ctx.check_stop()
        feeds = {key: v[idx] for key, v in own.items()}
        for p, f in recv_flows:
            got = ctx.wait(partial(ctx.links[p].recv, f.id, k), p)
            feeds[sm.input_key(f.tensor)] = _rows_of(p, f.id, f"the activations of batch {k}", got, len(idx))
        scores.append(part(feeds)["scores"])
        ctx.progress.emit("step", step=k + 1, total=-(-len(final) // plan.train.batch_size))
    out = Path(ctx.cache["predict"]["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    text = sm.scores_csv(final, np.concatenate(scores))
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # scores derive from the labels
    with os.fdopen(fd, "w", encoding="utf-8") as scores_file:
        scores_file.write(text)
    ctx.progress.emit("predicted", rows=len(final), path=str(out))
    return {"metrics": {}, "predicted": {"rows": len(final), "path": str(out)}, "steps": len(scores)}


def _passive(ctx: RoleContext) -> dict[str, Any]:
    from fldsl.runtime.predict import _feeds

    plan, part = ctx.plan, ctx.cache["predict"]["part"]
    actives = [p.id for p in plan.peers]
    if len(actives) != 1:
        raise RoleError(f"{ctx.node}: a passive party talks to exactly one active party, the plan lists "
                        f"{len(actives)} peers")
    active = actives[0]
    _hello(ctx, active)
    ds_name, table = _table(ctx)
    ctx.progress.emit("phase", name="align", detail=plan.alignment.method if plan.alignment else "join")
    ids = [str(i) for i in table.ids.tolist()]
    pair = _align_peer(ctx, active, ids, leader=False)
    what = "the rows to score"
    limit = limit_for(1, 8 * len(pair))
    bundle = unpack_arrays(recv_chunked(ctx, active, ctx.holdout_flow(active, ctx.node), ALIGN_KEY, limit,
                                        what), active, limit=limit, what=what)
    positions = bundle.get("rows")
    if (sorted(bundle) != ["rows"] or positions is None or positions.ndim != 1
            or positions.dtype.kind not in "iu"):
        raise RoleError(f"{active} sent {what} as {sorted(bundle)}, not one integer array `rows`")
    if len(positions) > len(pair):
        raise PeerLimitExceeded(f"{active} asks for {len(positions):,} rows, more than the {len(pair):,} "
                                "this node aligned with it: refusing", peer=active)
    if len(positions) and (positions.min() < 0 or positions.max() >= len(pair)
                           or len(np.unique(positions)) != len(positions)):
        raise RoleError(f"{active} sent row positions that do not fit the PSI result: they must be distinct "
                        f"and within 0..{len(pair) - 1}")
    ctx.progress.emit("aligned", rows=len(pair), train=0, holdout=len(positions))
    row_of = {i: r for r, i in enumerate(ids)}
    rows = np.array([row_of[pair[int(k)]] for k in positions.tolist()], dtype=np.int64)
    send_flows = [f for f in ctx.policy.flows
                  if f.src == plan.node and f.dst == active and f.kind == "activation"]
    outputs = set(part.card["signature"]["outputs"])
    missing = [f.tensor for f in send_flows if f.tensor not in outputs]
    if not send_flows or missing:
        raise RoleError(f"{ctx.node}: its model does not output {', '.join(missing) or 'activations'} "
                        f"that the policy sends to {active}")
    link = ctx.links[active]
    b = plan.train.batch_size
    total = -(-len(rows) // b)
    feeds = _feeds(part, table, rows, ds_name)
    for k, idx in enumerate(batches(np.arange(len(rows)), b)):
        ctx.check_stop()
        acts = part({key: v[idx] for key, v in feeds.items()})
        for f in send_flows:
            link.send(f.id, k, np.ascontiguousarray(acts[f.tensor]))
        ctx.progress.emit("step", step=k + 1, total=total)
    return {"metrics": {}, "predicted": {"rows": len(rows)}, "steps": total}
