"""Vertical federated learning (split learning): passive parties send activations, the active party
(label owner) runs the top model and the loss and returns the gradients of those activations.

Protocol (every message keyed by (flow, step) in the peers' mailboxes, so lock-step is by iteration id):

1. resume agreement: each passive sends the checkpoint steps it holds; the active picks the newest one all
   hold (or a fresh start) and tells everybody (``RoleContext.agree_resume``);
2. fresh start only: PSI (or a plain join) between the active party and each passive party; the active keeps
   the ids common to all, makes the stratified train/holdout split and sends each passive the positions of
   the train and holdout rows in that pair's PSI output (the passive learns nothing it did not learn from the
   PSI already);
3. per step s, each node runs the step tasks its plan lists, in order (fldsl.runtime.roles.split), e.g.
   passive forward -> ``act`` (s) -> active forward + loss + backward -> ``grad(act)`` (s) -> active apply;
   passive backward (``tape.gradient(act, vars, output_gradients=grad)``) + apply. The label owner receives
   every cut tensor its plan lists, from any number of passive parties, and sends back a gradient only for
   the flows its plan lists: a raw field allowed across gets none, and its sender only sends. Sequential:
   the passive's forward of s+1 uses the weights updated by s, exactly as the same model trained centrally;
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
from typing import Any

import numpy as np

from fldsl.runtime.bundle import limit_for
from fldsl.runtime.roles.common import (
    CheckpointWriter,
    PeerLimitExceeded,
    RoleContext,
    RoleError,
    announce_training,
    batches,
    blob_channel,
    build_model,
    configure_tf,
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
from fldsl.runtime.roles.split import SplitKernels, SplitLoop, StepState
from fldsl.runtime.roles.split_schedule import split_schedule
from fldsl.runtime.transport import keys


def run(ctx: RoleContext) -> dict[str, Any]:
    configure_tf()
    role = _active if ctx.plan.role == "vertical.active" else _passive
    return with_checkpoint_writer(ctx, lambda writer: role(ctx, writer))


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


def _checkpoint(ctx: RoleContext, writer: CheckpointWriter, k: SplitKernels, s: int,
                rows: tuple[np.ndarray, np.ndarray], meta: dict[str, Any]) -> None:
    """Checkpoint after step ``s``: a snapshot (get_weights and the optimiser slots are copies; the caller
    passes copied lists), written in the background while training goes on."""
    arrays = {**training_arrays(k.model.get_weights(), k.opt, k.variables),
              "train_rows": rows[0], "hold_rows": rows[1]}
    writer.submit(lambda: save_checkpoint(ctx, s + 1, arrays, meta))


def _kernels(ctx: RoleContext, writer: CheckpointWriter, ckpt: Any) -> SplitKernels:
    k = SplitKernels(ctx, writer, split_schedule(ctx.plan, ctx.policy), build_model(ctx.plan, ctx.policy))
    if ckpt is not None:
        restore_training(k.model, k.opt, k.variables, ckpt.arrays)
    return k


# ---------------------------------------------------------------------------------------------------------
# active party (label owner)
# ---------------------------------------------------------------------------------------------------------


def align_all(ctx: RoleContext, table: Any, passives: list[str]
              ) -> tuple[list[str], dict[str, int], dict[str, list[str]], set[str]]:
    """PSI with every passive, this node leading: its ids (as text), their rows, each passive's aligned ids,
    and the ids common to all (training and prediction both start here)."""
    plan = ctx.plan
    ctx.progress.emit("phase", name="align", detail=plan.alignment.method if plan.alignment else "join")
    ids = [str(i) for i in table.ids.tolist()]
    row_of = {i: r for r, i in enumerate(ids)}
    pairwise = {p: _align_peer(ctx, p, ids, leader=True) for p in passives}
    common = set(ids)
    for lst in pairwise.values():
        common &= set(lst)
    return ids, row_of, pairwise, common


def _active_split(ctx: RoleContext, table: Any, labels_all: np.ndarray,
                  passives: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Align with every passive, keep the ids common to all, split train/holdout and send each passive the
    positions of both in its own PSI output. Returns this node's train and holdout rows."""
    plan = ctx.plan
    ids, row_of, pairwise, common = align_all(ctx, table, passives)
    first = pairwise[passives[0]] if passives else ids
    final = [i for i in first if i in common]
    if not final:
        raise RoleError(f"{ctx.node}: the parties have no example id in common")
    rows = np.array([row_of[i] for i in final], dtype=np.int64)
    frac = plan.train.validation.fraction
    if frac > 0:
        from fldsl.runtime.data import stratified_split

        train_ids, hold_ids = stratified_split(np.array(final), labels_all[rows], frac,
                                               plan.train.validation.seed)
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
        send_chunked(ctx, p, ctx.holdout_flow(plan.node, p), keys.control(keys.Control.ALIGN), bundle)
    ctx.progress.emit("aligned", rows=len(final), train=len(train_pos), holdout=len(hold_pos))
    return rows[train_pos], rows[hold_pos]


def _active(ctx: RoleContext, writer: CheckpointWriter) -> dict[str, Any]:
    plan = ctx.plan
    passives = [p.id for p in plan.peers]
    ctx.progress.emit("phase", name="resume")
    resume = ctx.agree_resume(plan.node, passives)

    tables = load_tables(plan)
    ds_name, table = _single_table(ctx, tables)
    label_ds, label_field = label_ref(plan)
    assert plan.loss is not None  # label_ref refused a plan without one
    if label_ds != ds_name:
        raise RoleError(f"{ctx.node}: the loss label `{plan.loss.label}` is not in this node's data")
    labels_all = table.fields[label_field]
    ckpt = ctx.store.load(resume) if resume is not None and ctx.store is not None else None
    if ckpt is not None:
        train_rows, hold_rows = ckpt.arrays["train_rows"], ckpt.arrays["hold_rows"]
    else:
        train_rows, hold_rows = _active_split(ctx, table, labels_all, passives)
    fit_preprocessing(ctx, tables, {ds_name: train_rows})  # on the training rows only, here

    k = _kernels(ctx, writer, ckpt)
    if not k.sched.cuts_in:
        raise RoleError(f"{ctx.node}: the plan receives no cut tensor; recompile the pipeline")
    received = {w.tensor for w in k.sched.cuts_in}
    own_refs = [r for r in k.model.input_refs if r not in received]

    def inputs_for(rows: np.ndarray) -> dict[str, np.ndarray]:
        data = field_inputs(plan, tables, rows)
        return {name: v for name, v in data.items() if name in own_refs}

    loop = SplitLoop(k, train_rows, inputs_for, labels_all)
    epoch_losses: list[tuple[float, int]] = []  # (batch loss, batch size) of the current epoch
    history: list[dict[str, Any]] = []
    if ckpt is not None:
        epoch_losses = [(float(x), int(n)) for x, n in ckpt.meta.get("epoch_losses", [])]
        history = list(ckpt.meta.get("history", []))
    announce_training(ctx, loop.total, loop.spe, ckpt.step if ckpt is not None else None)
    # The last epoch's holdout logits (the exported weights'), for the SavedModel pack's holdout scores; None
    # when this process ran no evaluation (resumed after the last one, or no holdout).
    holdout: list[np.ndarray | None] = [None]

    def after_step(st: StepState) -> None:
        s = st.step
        epoch_losses.append((st.loss if st.loss is not None else float("nan"), st.rows))
        if (s + 1) % loop.spe == 0:  # epoch end: metrics on the holdout (every node runs the same schedule)
            # train_loss: the epoch's mean training loss; loss (and auc, ...): the holdout's.
            metrics = {"train_loss": sum(v * n for v, n in epoch_losses)
                       / max(1, sum(n for _, n in epoch_losses))}
            scored, holdout[0] = _evaluate(k, hold_rows, s // loop.spe, inputs_for, labels_all)
            metrics.update(scored)
            history.append({"epoch": s // loop.spe + 1, **metrics})
            report_epoch(ctx, s // loop.spe + 1, metrics)
            epoch_losses.clear()
        if is_checkpoint_step(plan, s + 1, loop.spe):
            meta = {"epoch_losses": list(epoch_losses), "history": list(history)}
            _checkpoint(ctx, writer, k, s, (train_rows, hold_rows), meta)

    loop.steps(ckpt.step if ckpt is not None else 0, after_step)
    final = history[-1] if history else {}
    scores = (table.ids[hold_rows], holdout[0]) if holdout[0] is not None else None
    export_model(ctx, k.model.get_weights(), k.model.weight_names, metrics=final, history=history,
                 holdout=scores)
    return {"metrics": final, "history": history, "examples_per_s": k.meter.rate, "steps": loop.total}


def _evaluate(k: SplitKernels, hold_rows: np.ndarray, epoch: int, inputs_for: Any, labels_all: np.ndarray
              ) -> tuple[dict[str, float], np.ndarray | None]:
    """The holdout metrics and the logits they were computed from (None without holdout rows)."""
    plan = k.ctx.plan
    if len(hold_rows) == 0 or not k.sched.evaluates:
        return {}, None
    logits = [k.predict_holdout(inputs_for(hold_rows[idx]), len(idx), epoch, j)
              for j, idx in enumerate(batches(np.arange(len(hold_rows)), plan.train.batch_size))]
    joined = np.concatenate(logits)
    assert plan.loss is not None  # the label owner's plan has the loss
    return score_metrics(plan.loss.op, plan.train.metrics, joined, labels_all[hold_rows]), joined


# ---------------------------------------------------------------------------------------------------------
# passive party (features only)
# ---------------------------------------------------------------------------------------------------------


def _recv_positions(ctx: RoleContext, active: str, aligned: int) -> tuple[np.ndarray, np.ndarray]:
    """The train and holdout positions the active party chose, into this node's ``aligned`` PSI rows.

    They are distinct positions of those rows, so together at most ``aligned`` int64 values: that bounds
    the bundle on the wire and what it may expand to, before anything is expanded."""
    what = "the train/holdout positions"
    limit = limit_for(2, 8 * aligned)
    data = recv_chunked(ctx, active, ctx.holdout_flow(active, ctx.node), keys.control(keys.Control.ALIGN),
                        limit, what)
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


def _passive_split(ctx: RoleContext, table: Any, active: str) -> tuple[np.ndarray, np.ndarray]:
    align = ctx.plan.alignment
    ctx.progress.emit("phase", name="align", detail=align.method if align else "join")
    ids = [str(i) for i in table.ids.tolist()]
    pair = _align_peer(ctx, active, ids, leader=False)
    train_pos, hold_pos = _recv_positions(ctx, active, len(pair))
    row_of = {i: r for r, i in enumerate(ids)}
    pair_rows = np.array([row_of[i] for i in pair], dtype=np.int64)
    ctx.progress.emit("aligned", rows=len(pair), train=len(train_pos), holdout=len(hold_pos))
    return pair_rows[train_pos], pair_rows[hold_pos]


def _passive(ctx: RoleContext, writer: CheckpointWriter) -> dict[str, Any]:
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
    ckpt = ctx.store.load(resume) if resume is not None and ctx.store is not None else None
    if ckpt is not None:
        train_rows, hold_rows = ckpt.arrays["train_rows"], ckpt.arrays["hold_rows"]
    else:
        train_rows, hold_rows = _passive_split(ctx, table, active)
    fit_preprocessing(ctx, tables, {name: train_rows for name in tables})  # on the training rows only, here

    k = _kernels(ctx, writer, ckpt)
    if not k.sched.cuts_out:
        raise RoleError(f"{ctx.node}: the plan sends no cut tensor to {active}; recompile the pipeline")
    loop = SplitLoop(k, train_rows, lambda rows: field_inputs(plan, tables, rows), None)
    announce_training(ctx, loop.total, loop.spe, ckpt.step if ckpt is not None else None)

    def after_step(st: StepState) -> None:
        s = st.step
        if (s + 1) % loop.spe == 0 and len(hold_rows):
            for j, idx in enumerate(batches(np.arange(len(hold_rows)), plan.train.batch_size)):
                k.send_holdout(field_inputs(plan, tables, hold_rows[idx]), len(idx), s // loop.spe, j)
        if is_checkpoint_step(plan, s + 1, loop.spe):
            _checkpoint(ctx, writer, k, s, (train_rows, hold_rows), {})

    loop.steps(ckpt.step if ckpt is not None else 0, after_step)
    export_model(ctx, k.model.get_weights(), k.model.weight_names)
    return {"metrics": {}, "examples_per_s": k.meter.rate, "steps": loop.total}
