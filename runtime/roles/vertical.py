"""Vertical federated learning (split learning): passive parties send activations, the active party
(label owner) runs the top model and the loss and returns the gradients of those activations.

Protocol (every message keyed by (flow, step) in the peers' mailboxes, so lock-step is by iteration id):

1. resume agreement: each passive sends the checkpoint steps it holds; the active picks the newest one all
   hold (or a fresh start) and tells everybody (``RoleContext.agree_resume``);
2. fresh start only: PSI (or a plain join) between the active party and each passive party; the active keeps
   the ids common to all, makes the stratified train/holdout split and sends each passive the positions of
   the train and holdout rows in that pair's PSI output (the passive learns nothing it did not learn from the
   PSI already);
3. per step s: passive forward -> ``act`` (s) -> active forward + loss + backward + apply
   -> ``grad(act)`` (s) -> passive backward (``tape.gradient(act, vars, output_gradients=grad)``)
   + apply. Sequential: the passive's forward of s+1 uses the weights updated by s, exactly as the
   same model trained centrally;
   With ``train.pipeline == 1`` (opt-in) a passive sends ``act`` (s+1) *before* it waits for
   ``grad(act)`` (s), then applies step s: the active party trains step s+1 while the passive applies step
   s and computes s+2, so the parties compute at the same time instead of in turn. The math changes by one
   step of staleness: act(s+1) comes from weights that have not yet seen step s's gradient, and the
   passive's backward of step s re-evaluates its Jacobian at the weights after step s-1 (not those that
   produced act(s)). The active side is unchanged: it consumes act(s) in step order;
4. at every epoch end the passives forward the holdout rows and the active computes the metrics;
5. both sides checkpoint at the same steps, so a batch is in both checkpoints or in neither; after a crash
   the agreed step rolls every node back to the same iteration. A pipelined passive drains before a
   checkpoint step (it does not send act(s+1) until step s is applied when a checkpoint follows step s),
   so a run resumed from a checkpoint computes exactly what the uninterrupted run computed, and epoch-end
   evaluation (always a checkpoint step) sees every step of the epoch applied.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import numpy as np
from fldsl.runtime.bundle import limit_for
from fldsl.runtime.roles.common import (
    CTRL_ALIGN,
    EVAL_BASE,
    EVAL_STRIDE,
    CheckpointWriter,
    Meter,
    PeerLimitExceeded,
    PeerProtocolError,
    RoleContext,
    RoleError,
    announce_training,
    batches,
    blob_channel,
    build_model,
    configure_tf,
    epoch_batch,
    export_model,
    field_inputs,
    fit_preprocessing,
    is_checkpoint_step,
    label_ref,
    load_tables,
    pack_arrays,
    recv_chunked,
    report_epoch,
    save_checkpoint,
    score_metrics,
    send_chunked,
    unpack_arrays,
    with_checkpoint_writer,
)
from fldsl.runtime.roles.optstate import restore_training, training_arrays


def run(ctx: RoleContext) -> dict[str, Any]:
    configure_tf()
    role = _active if ctx.plan.role == "vertical.active" else _passive
    return with_checkpoint_writer(ctx, lambda writer: role(ctx, writer))


def _rows_of(peer: str, flow: str, what: str, got: Any, rows: int) -> Any:
    """``got``, a tensor the peer sent for ``rows`` rows. The flow's policy leaves the batch dimension free
    (``None``), so a peer could send another number of rows: refused here, naming it, instead of failing
    inside TensorFlow."""
    if got.ndim == 0 or got.shape[0] != rows:
        raise PeerProtocolError(f"{peer} sent {what} on flow {flow} as {got.dtype}{list(got.shape)}, but "
                                f"that batch has {rows} rows: refusing", flow=flow, peer=peer)
    return got


def _single_table(ctx: RoleContext, tables: dict[str, Any]) -> tuple[str, Any]:
    if len(tables) != 1:
        raise RoleError(f"{ctx.node}: vertical training expects one aligned data set per node, "
                        f"the plan has {len(tables)}")
    return next(iter(tables.items()))


def _align_peer(ctx: RoleContext, peer: str, ids: list[str], leader: bool) -> list[str]:
    """The ids this node shares with ``peer``, in the same order on both sides."""
    method = ctx.plan.alignment.method if ctx.plan.alignment else "join"
    send, recv = blob_channel(ctx, peer, "psi")
    if method == "psi_ecdh":
        from fldsl.runtime import psi

        fn = psi.psi_leader if leader else psi.psi_follower
        # The compiler sizes the psi flow for the aligned data sets' rows; every id costs at least one
        # 32-byte point on it, so a peer announcing more ids than that is refused before any is received.
        most = ctx.flow(peer, ctx.node, ("psi",)).max_bytes // psi.POINT
        try:
            return [str(x) for x in fn(ids, send, recv, max_peer_ids=most)]
        except psi.PsiLimitExceeded as e:
            raise PeerLimitExceeded(f"{peer}: {e}: refusing", peer=peer) from None
        except psi.PsiError as e:
            raise RoleError(f"PSI with {peer} failed: {e}") from None
    # Plain join (the plan chose to reveal ids): exchange the id lists, keep the common ones sorted.
    send(json.dumps(ids).encode())
    theirs = set(json.loads(recv()))
    return sorted(set(ids) & theirs)


# ---------------------------------------------------------------------------------------------------------
# active party (label owner)
# ---------------------------------------------------------------------------------------------------------


def _active(ctx: RoleContext, writer: CheckpointWriter) -> dict[str, Any]:
    import tensorflow as tf
    from fldsl.stdlib.tf import loss_fn, make_optimizer

    plan = ctx.plan
    passives = [p.id for p in plan.peers]
    ctx.progress.emit("phase", name="resume")
    resume = ctx.agree_resume(plan.node, passives)

    tables = load_tables(plan)
    ds_name, table = _single_table(ctx, tables)
    label_ds, label_field = label_ref(plan)
    if label_ds != ds_name:
        raise RoleError(f"{ctx.node}: the loss label `{plan.loss.label}` is not in this node's data")
    row_of = {str(i): r for r, i in enumerate(table.ids.tolist())}

    ckpt = ctx.store.load(resume) if resume is not None else None
    if ckpt is not None:
        train_rows, hold_rows = ckpt.arrays["train_rows"], ckpt.arrays["hold_rows"]
    else:
        ctx.progress.emit("phase", name="align", detail=plan.alignment.method if plan.alignment else "join")
        ids = [str(i) for i in table.ids.tolist()]
        pairwise = {p: _align_peer(ctx, p, ids, leader=True) for p in passives}
        common = set(ids)
        for lst in pairwise.values():
            common &= set(lst)
        first = pairwise[passives[0]] if passives else ids
        final = [i for i in first if i in common]
        if not final:
            raise RoleError(f"{ctx.node}: the parties have no example id in common")
        rows = np.array([row_of[i] for i in final], dtype=np.int64)
        labels = table.fields[label_field][rows]
        frac = plan.train.validation.fraction
        if frac > 0:
            from fldsl.runtime.data import stratified_split

            train_ids, hold_ids = stratified_split(np.array(final), labels, frac, plan.train.validation.seed)
            pos = {i: k for k, i in enumerate(final)}
            train_pos = np.array([pos[str(i)] for i in train_ids], dtype=np.int64)
            hold_pos = np.array([pos[str(i)] for i in hold_ids], dtype=np.int64)
        else:
            train_pos = np.arange(len(final), dtype=np.int64)
            hold_pos = np.zeros(0, dtype=np.int64)
        for p in passives:
            where = {i: k for k, i in enumerate(pairwise[p])}
            in_pair = np.array([where[i] for i in final], dtype=np.int64)
            bundle = pack_arrays({"train": in_pair[train_pos], "holdout": in_pair[hold_pos]})
            send_chunked(ctx, p, ctx.holdout_flow(plan.node, p), CTRL_ALIGN, bundle)
        train_rows, hold_rows = rows[train_pos], rows[hold_pos]
        ctx.progress.emit("aligned", rows=len(final), train=len(train_rows), holdout=len(hold_rows))
    fit_preprocessing(ctx, tables, {ds_name: train_rows})  # on the training rows only, here

    model = build_model(plan, ctx.policy)
    opt = make_optimizer(plan.train.optimizer)
    loss = loss_fn(plan.loss)
    variables = list(model.trainable_variables)

    # Received activations: per passive, the flows it sends us and the gradient flow back for each.
    recv_flows = [(p, f) for p in passives for f in ctx.policy.flows
                  if f.src == p and f.dst == plan.node and f.kind == "activation"]
    if not recv_flows:
        raise RoleError(f"{ctx.node}: the policy declares no activation flow into this node")
    grad_flows = {(p, f.tensor): ctx.flow(plan.node, p, ("gradient",), f"grad({f.tensor})")
                  for p, f in recv_flows}
    act_names = [f.tensor for _, f in recv_flows]
    own_refs = [r for r in model.input_refs if r not in act_names]

    @tf.function(reduce_retracing=True)
    def train_step(inputs, acts, labels):
        with tf.GradientTape() as tape:
            tape.watch(acts)
            out = model({**inputs, **acts}, training=True)
            value = loss(out[plan.loss.logits], labels)
        grads = tape.gradient(value, [*variables, *acts.values()])
        opt.apply(grads[:len(variables)], variables)
        return value, grads[len(variables):]

    @tf.function(reduce_retracing=True)
    def predict(inputs, acts):
        return model({**inputs, **acts}, training=False)[plan.loss.logits]

    def inputs_for(rows: np.ndarray) -> dict[str, np.ndarray]:
        data = field_inputs(plan, tables, rows)
        return {k: v for k, v in data.items() if k in own_refs}

    b = plan.train.batch_size
    spe = max(1, math.ceil(len(train_rows) / b))
    total = spe * plan.train.epochs
    start = 0
    epoch_losses: list[tuple[float, int]] = []  # (batch loss, batch size) of the current epoch
    history: list[dict[str, Any]] = []
    if ckpt is not None:
        restore_training(model, opt, variables, ckpt.arrays)
        start = ckpt.step
        epoch_losses = [(float(x), int(n)) for x, n in ckpt.meta.get("epoch_losses", [])]
        history = list(ckpt.meta.get("history", []))
    announce_training(ctx, total, spe, start if ckpt is not None else None)

    meter = Meter()
    last_emit = 0.0
    # The last epoch's holdout logits (the exported weights'), for the SavedModel pack's holdout scores; None
    # when this process ran no evaluation (resumed after the last one, or no holdout).
    holdout_logits: np.ndarray | None = None
    for s in range(start, total):
        ctx.check_stop()
        ctx.last_step = max(ctx.last_step, s)
        e, j = divmod(s, spe)
        rows = train_rows[epoch_batch(len(train_rows), plan.train.seed, e, j, b)]
        acts = {}
        for p, f in recv_flows:
            got = ctx.wait(lambda t, p=p, f=f, s=s: ctx.links[p].recv(f.id, s, t), p)
            acts[f.tensor] = _rows_of(p, f.id, f"the activations of step {s}", got, len(rows))
        meter.start()
        value, grads = train_step(inputs_for(rows), acts, table.fields[label_field][rows])
        if is_checkpoint_step(plan, s + 1, spe):
            writer.wait()  # the checkpoint gate: see CheckpointWriter
        for (p, f), g in zip(recv_flows, grads, strict=True):
            ctx.links[p].send(grad_flows[(p, f.tensor)].id, s, g.numpy())
        meter.stop(len(rows))
        epoch_losses.append((float(value), len(rows)))
        now = time.monotonic()
        if now - last_emit > 0.25 or s + 1 == total:
            ctx.progress.emit("step", step=s + 1, total=total, train_loss=float(value),
                              examples_per_s=meter.rate)
            last_emit = now
        if (s + 1) % spe == 0:  # epoch end: metrics on the holdout (every node runs the same schedule)
            # train_loss: the epoch's mean training loss; loss (and auc, ...): the holdout's.
            metrics = {"train_loss": sum(v * n for v, n in epoch_losses)
                       / max(1, sum(n for _, n in epoch_losses))}
            scored, holdout_logits = _evaluate(ctx, recv_flows, hold_rows, e, predict, inputs_for,
                                               table.fields[label_field])
            metrics.update(scored)
            history.append({"epoch": e + 1, **metrics})
            report_epoch(ctx, e + 1, metrics)
            epoch_losses = []
        if is_checkpoint_step(plan, s + 1, spe):
            # A snapshot (get_weights and the optimiser slots are copies; the lists are copied), written in
            # the background while training goes on.
            arrays = {**training_arrays(model.get_weights(), opt, variables),
                      "train_rows": train_rows, "hold_rows": hold_rows}
            meta = {"epoch_losses": list(epoch_losses), "history": list(history)}
            writer.submit(lambda s=s, a=arrays, m=meta: save_checkpoint(ctx, s + 1, a, m))
            del arrays

    final = history[-1] if history else {}
    holdout = (table.ids[hold_rows], holdout_logits) if holdout_logits is not None else None
    export_model(ctx, model.get_weights(), model.weight_names, metrics=final, history=history,
                 holdout=holdout)
    return {"metrics": final, "history": history, "examples_per_s": meter.rate, "steps": total}


def _evaluate(ctx, recv_flows, hold_rows, epoch, predict, inputs_for, labels_all
              ) -> tuple[dict[str, float], np.ndarray | None]:
    """The holdout metrics and the logits they were computed from (None without holdout rows)."""
    if len(hold_rows) == 0:
        return {}, None
    b = ctx.plan.train.batch_size
    logits = []
    for k, idx in enumerate(batches(np.arange(len(hold_rows)), b)):
        key = EVAL_BASE + epoch * EVAL_STRIDE + k
        acts = {f.tensor: _rows_of(p, f.id, f"the holdout activations {k} of epoch {epoch + 1}",
                                   ctx.wait(lambda t, p=p, f=f, key=key: ctx.links[p].recv(f.id, key, t), p),
                                   len(idx))
                for p, f in recv_flows}
        logits.append(predict(inputs_for(hold_rows[idx]), acts).numpy())
    joined = np.concatenate(logits)
    return score_metrics(ctx.plan.loss.op, ctx.plan.train.metrics, joined, labels_all[hold_rows]), joined


# ---------------------------------------------------------------------------------------------------------
# passive party (features only)
# ---------------------------------------------------------------------------------------------------------


def _recv_positions(ctx: RoleContext, active: str, aligned: int) -> tuple[np.ndarray, np.ndarray]:
    """The train and holdout positions the active party chose, into this node's ``aligned`` PSI rows.

    They are distinct positions of those rows, so together at most ``aligned`` int64 values: that bounds
    the bundle on the wire and what it may expand to, before anything is expanded."""
    what = "the train/holdout positions"
    limit = limit_for(2, 8 * aligned)
    data = recv_chunked(ctx, active, ctx.holdout_flow(active, ctx.node), CTRL_ALIGN, limit, what)
    bundle = unpack_arrays(data, active, limit=limit, what=what)
    if sorted(bundle) != ["holdout", "train"]:
        raise RoleError(f"{active} sent {what} as {sorted(bundle)}, not train and holdout")
    train, hold = bundle["train"], bundle["holdout"]
    for name, a in (("train", train), ("holdout", hold)):
        if a.ndim != 1 or a.dtype.kind not in "iu":
            raise RoleError(f"{active} sent {name} positions as {a.dtype}{list(a.shape)}, not integers")
    if len(train) + len(hold) > aligned:
        raise PeerLimitExceeded(f"{active} sent {len(train) + len(hold):,} train/holdout positions, more "
                                f"than the {aligned:,} rows this node aligned with it (limit from PSI): "
                                "refusing", peer=active)
    both = np.concatenate([train, hold]).astype(np.int64)
    if len(both) and (both.min() < 0 or both.max() >= aligned or len(np.unique(both)) != len(both)):
        raise RoleError(f"{active} sent an alignment that does not fit the PSI result: positions must be "
                        f"distinct and within 0..{aligned - 1}")
    return train.astype(np.int64), hold.astype(np.int64)


def _passive(ctx: RoleContext, writer: CheckpointWriter) -> dict[str, Any]:
    import tensorflow as tf
    from fldsl.stdlib.tf import make_optimizer

    plan = ctx.plan
    actives = [p.id for p in plan.peers]
    if len(actives) != 1:
        raise RoleError(f"{ctx.node}: a passive party talks to exactly one active party, the plan lists "
                        f"{len(actives)} peers")
    active = actives[0]
    ctx.progress.emit("phase", name="resume")
    resume = ctx.agree_resume(active, [])

    tables = load_tables(plan)
    _, table = _single_table(ctx, tables)
    ckpt = ctx.store.load(resume) if resume is not None else None
    if ckpt is not None:
        train_rows, hold_rows = ckpt.arrays["train_rows"], ckpt.arrays["hold_rows"]
    else:
        ctx.progress.emit("phase", name="align", detail=plan.alignment.method if plan.alignment else "join")
        ids = [str(i) for i in table.ids.tolist()]
        pair = _align_peer(ctx, active, ids, leader=False)
        train_pos, hold_pos = _recv_positions(ctx, active, len(pair))
        row_of = {str(i): r for r, i in enumerate(table.ids.tolist())}
        pair_rows = np.array([row_of[i] for i in pair], dtype=np.int64)
        train_rows, hold_rows = pair_rows[train_pos], pair_rows[hold_pos]
        ctx.progress.emit("aligned", rows=len(pair), train=len(train_rows), holdout=len(hold_rows))
    fit_preprocessing(ctx, tables, {name: train_rows for name in tables})  # on the training rows only, here

    model = build_model(plan, ctx.policy)
    opt = make_optimizer(plan.train.optimizer)
    variables = list(model.trainable_variables)
    send_flows = [f for f in ctx.policy.flows
                  if f.src == plan.node and f.dst == active and f.kind == "activation"]
    if not send_flows:
        raise RoleError(f"{ctx.node}: the policy declares no activation flow to {active}")
    grad_flows = [ctx.flow(active, plan.node, ("gradient",), f"grad({f.tensor})") for f in send_flows]
    names = [f.tensor for f in send_flows]

    @tf.function(reduce_retracing=True)
    def forward(inputs):
        out = model(inputs, training=True)
        return [out[n] for n in names]

    @tf.function(reduce_retracing=True)
    def backward(inputs, out_grads):
        # Recompute the forward under a tape (no randomness in the ops). Lock-step: the weights are those
        # of the forward whose activations were sent, so the gradient is exact. Pipelined: they already
        # include the previous step's update (the documented one-step staleness).
        with tf.GradientTape() as tape:
            out = model(inputs, training=True)
            targets = [out[n] for n in names]
        grads = tape.gradient(targets, variables, output_gradients=out_grads)
        opt.apply(grads, variables)

    b = plan.train.batch_size
    spe = max(1, math.ceil(len(train_rows) / b))
    total = spe * plan.train.epochs
    start = 0
    if ckpt is not None:
        restore_training(model, opt, variables, ckpt.arrays)
        start = ckpt.step
    announce_training(ctx, total, spe, start if ckpt is not None else None)
    link = ctx.links[active]
    ahead = plan.train.pipeline
    meter = Meter()
    last_emit = 0.0
    # (rows, inputs) of the steps whose activations were sent and whose gradient is not applied yet (at
    # most two when pipelined: the step being applied and the one sent ahead of it).
    in_flight: dict[int, tuple[int, dict[str, np.ndarray]]] = {}

    def send_step(step: int) -> None:
        ep, j = divmod(step, spe)
        rows = train_rows[epoch_batch(len(train_rows), plan.train.seed, ep, j, b)]
        inputs = field_inputs(plan, tables, rows)
        acts = forward(inputs)
        if is_checkpoint_step(plan, step + 1, spe):
            writer.wait()  # the checkpoint gate: see CheckpointWriter
        for f, a in zip(send_flows, acts, strict=True):
            link.send(f.id, step, a.numpy())
        in_flight[step] = (len(rows), inputs)
        ctx.last_step = max(ctx.last_step, step)

    for s in range(start, total):
        ctx.check_stop()
        e = s // spe
        meter.start()
        if s not in in_flight:
            send_step(s)
        # Pipelined: step s+1 goes out with the weights as they are (step s not applied yet), so the active
        # party trains it while this node waits for and applies step s. Never past a checkpoint: the drain
        # keeps each batch in both parties' checkpoints or in neither, and resume exact.
        if ahead and s + 1 < total and not is_checkpoint_step(plan, s + 1, spe):
            send_step(s + 1)
        meter.stop(0)
        n, inputs = in_flight.pop(s)
        grads = [_rows_of(active, g.id, f"the gradients of step {s}",
                          ctx.wait(lambda t, g=g, s=s: link.recv(g.id, s, t), active), n)
                 for g in grad_flows]
        meter.start()
        backward(inputs, grads)
        meter.stop(n)
        now = time.monotonic()
        if now - last_emit > 0.25 or s + 1 == total:
            ctx.progress.emit("step", step=s + 1, total=total, examples_per_s=meter.rate)
            last_emit = now
        if (s + 1) % spe == 0 and len(hold_rows):
            for k, idx in enumerate(batches(np.arange(len(hold_rows)), b)):
                acts = forward(field_inputs(plan, tables, hold_rows[idx]))
                for f, a in zip(send_flows, acts, strict=True):
                    link.send(f.id, EVAL_BASE + e * EVAL_STRIDE + k, a.numpy())
        if is_checkpoint_step(plan, s + 1, spe):
            arrays = {**training_arrays(model.get_weights(), opt, variables),
                      "train_rows": train_rows, "hold_rows": hold_rows}
            writer.submit(lambda s=s, a=arrays: save_checkpoint(ctx, s + 1, a, {}))
            del arrays

    export_model(ctx, model.get_weights(), model.weight_names)
    return {"metrics": {}, "examples_per_s": meter.rate, "steps": total}
