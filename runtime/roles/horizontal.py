"""Horizontal federated learning: workers train the same model on their own rows, a server aggregates.

``sync`` (parameter server, every step): each worker computes the gradients of one batch and sends them with
its example count; the server averages them (weighted by examples), applies its optimiser and sends the new
weights back. ``fedavg``: each worker trains locally for N steps (or one local epoch) from the global weights,
sends its weights and example count; the server sends back the weighted average.

Set-up: resume agreement (the server coordinates), then each worker tells the server its row count and the
specs of its model inputs (the server has no data; it builds the same model from the same seed, so all start
from identical weights), and the server answers with the schedule (steps per epoch, total steps / rounds).
Workers with fewer rows than the largest one wrap around within an epoch so every step has all workers.

This module is the two roles' rounds; the parts live in modules of their own:

* :mod:`~fldsl.runtime.roles.aggregate`: the aggregation rules (:class:`SyncMean`, :class:`FedAvgMean`)
  and the float32 running mean they fold with;
* :mod:`~fldsl.runtime.roles.hwire`: the wire format (sparse sync uploads, FedAvg pieces);
* :mod:`~fldsl.runtime.roles.worker_core`: a worker's rows, model, steps and evaluation (also the Flower
  bench's clients);
* :mod:`~fldsl.runtime.roles.hresume`: checkpoints and resume;
* :mod:`~fldsl.runtime.roles.hsummary`: pooled preprocessing statistics and the combined holdout metrics.

Sync: embedding tables' gradients (``IndexedSlices`` from the lookups' gathers) travel sparse whenever that
is smaller than the dense table; the server applies them row-wise only where the optimiser's row-wise update
is exactly its dense update (plain SGD, Adagrad: :meth:`Optimizer.sparse_is_exact`); Adam and momentum SGD
get the dense average, so the math does not change with the encoding.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, NamedTuple

import numpy as np

from fldsl.artifacts import AggregationSpec, Plan, TensorSpec
from fldsl.runtime.roles import hsummary
from fldsl.runtime.roles.aggregate import Aggregator, FedAvgMean, Links, SyncMean, send_all
from fldsl.runtime.roles.common import (
    CheckpointWriter,
    Meter,
    PeerLimitExceeded,
    RoleContext,
    RoleError,
    announce_training,
    configure_tf,
    export_model,
    fit_preprocessing,
    input_specs,
    load_tables,
    report_epoch,
    with_checkpoint_writer,
)
from fldsl.runtime.roles.hresume import HorizontalCheckpoints
from fldsl.runtime.roles.hwire import Seg, encode_grads, parse_piece, piece_keys, piece_layout, seg_view
from fldsl.runtime.roles.worker_core import WorkerCore, WorkerData
from fldsl.runtime.transport import keys

INFO_KEY = keys.control(keys.Control.INFO)  # worker -> server: its rows and input specs
SCHEDULE_KEY = keys.control(keys.Control.SCHEDULE)  # server -> worker: steps per epoch, rounds


def run(ctx: RoleContext) -> dict[str, Any]:
    configure_tf()
    if ctx.plan.role.endswith(".server"):
        return server(ctx)
    return worker(ctx, load_tables(ctx.plan))


def _agg(plan: Plan) -> AggregationSpec:
    if plan.aggregation is None:
        raise RoleError(f"{plan.node}: the plan has no aggregation section")
    return plan.aggregation


class Schedule(NamedTuple):
    """The rounds the server decides from the workers' row counts (what each worker is told)."""

    steps_per_epoch: int  # of the largest worker
    rounds: int
    local_steps: list[int]  # per worker: its local steps per round (sync: 1)
    rounds_per_epoch: int


def schedule(plan: Plan, rows: list[int]) -> Schedule:
    """Sync: one round per step of the largest worker. FedAvg: one round per epoch (each worker a local
    epoch of its own rows), or every ``every_steps`` local steps."""
    agg = _agg(plan)
    b = plan.train.batch_size
    spe = max(1, math.ceil(max(rows) / b))
    if agg.mode == "sync":
        rounds, local = spe * plan.train.epochs, [1] * len(rows)
    elif agg.every_epoch or not agg.every_steps:
        rounds = plan.train.epochs
        local = [max(1, math.ceil(n / b)) for n in rows]
    else:
        rounds = math.ceil(spe * plan.train.epochs / agg.every_steps)
        local = [agg.every_steps] * len(rows)
    rounds_per_epoch = spe if agg.mode == "sync" else max(1, rounds // plan.train.epochs)
    return Schedule(spe, rounds, local, rounds_per_epoch)


# ---------------------------------------------------------------------------------------------------------
# server
# ---------------------------------------------------------------------------------------------------------


def _worker_info(ctx: RoleContext, w: str) -> tuple[int, dict[str, TensorSpec]]:
    """A worker's row count and input specs, checked. The server builds its model from these specs, so where
    the plan names the inputs (the compiler's aggregate task), a worker cannot widen them: a wider input
    would make every weight matrix it feeds, and the server's memory, grow with the announcement."""
    info = ctx.recv_json(w, INFO_KEY)
    try:
        rows, raw = info["rows"], info["specs"]
        if type(rows) is not int or rows < 0 or not isinstance(raw, dict):
            raise TypeError("rows must be a count and specs an object")
        specs = {str(k): TensorSpec.model_validate(v) for k, v in raw.items()}
    except (KeyError, TypeError, ValueError) as e:
        raise RoleError(f"{w} sent a malformed schedule request: {e}") from None
    planned = _planned_specs(ctx.plan)
    if planned is not None:
        for ref, spec in specs.items():
            want = planned.get(ref)
            if want is None or want.shape != spec.shape:
                allowed = want.text() if want is not None else "not an input of the plan"
                raise PeerLimitExceeded(f"{w} announces input {ref} as {spec.text()}, but the "
                                        f"plan allows {allowed}: refusing", peer=w)
    return rows, specs


def _planned_specs(plan: Plan) -> dict[str, TensorSpec] | None:
    """The input specs the compiler wrote into the server's aggregate task (None: a plan without them)."""
    for task in plan.tasks:
        raw = task.params.get("input_specs") if task.kind == "aggregate" else None
        if isinstance(raw, dict):
            return {str(k): TensorSpec.model_validate(v) for k, v in raw.items()}
    return None



def _server_setup(ctx: RoleContext, workers: list[str]) -> tuple[dict[str, TensorSpec], Schedule]:
    """Pool the statistics, take every worker's rows and specs (the same schema everywhere), send each
    its schedule."""
    hsummary.merge_stats(ctx, workers)
    infos = {w: _worker_info(ctx, w) for w in workers}
    specs = infos[workers[0]][1]
    for w in workers[1:]:
        if infos[w][1] != specs:
            raise RoleError(f"workers {workers[0]} and {w} have different input schemas; horizontal "
                            "partitioning needs the same columns everywhere")
    sched = schedule(ctx.plan, [infos[w][0] for w in workers])
    for w, n_local in zip(workers, sched.local_steps, strict=True):
        ctx.send_json(w, SCHEDULE_KEY, {"steps_per_epoch": sched.steps_per_epoch, "rounds": sched.rounds,
                                         "local_steps": n_local, "rounds_per_epoch": sched.rounds_per_epoch})
    return specs, sched


def server(ctx: RoleContext) -> dict[str, Any]:
    pool = ThreadPoolExecutor(max_workers=max(1, len(_agg(ctx.plan).workers) - 1),
                              thread_name_prefix=f"{ctx.node}-send")
    try:
        return with_checkpoint_writer(ctx, lambda writer: _server(ctx, writer, pool))
    finally:
        pool.shutdown(wait=False)


def _make_aggregator(ctx: RoleContext, specs: dict[str, TensorSpec], pool: ThreadPoolExecutor,
                     ckpts: HorizontalCheckpoints) -> tuple[Aggregator, list[dict[str, Any]], int]:
    """The server's model (same seed as the workers': identical initial weights), resumed where agreed,
    behind its aggregation rule. Returns (aggregator, metrics history, first round)."""
    from fldsl.stdlib.tf import build_segment, make_optimizer

    plan = ctx.plan
    agg = _agg(plan)
    workers = list(agg.workers)
    links = Links({w: ctx.flow(w, plan.node, ("gradients", "weights")).id for w in workers},
                  {w: ctx.flow(plan.node, w, ("weights",)).id for w in workers})
    model = build_segment(plan.model, specs, seed=plan.train.seed)
    opt = make_optimizer(plan.train.optimizer) if agg.mode == "sync" else None

    def to_workers(key: int, arrays: list[np.ndarray]) -> None:
        send_all(pool, [partial(ctx.links[w].send_arrays, links.down[w], key, arrays) for w in workers])

    state = ckpts.restore_server(model, opt, list(model.trainable_variables), to_workers)
    by_examples = agg.weighting == "examples"
    if opt is not None:
        return SyncMean(ctx, links, pool, by_examples, model, opt), state.history, state.start
    # FedAvg keeps the weights as numpy only (the average itself): the model is dropped here.
    fedavg = FedAvgMean(ctx, links, pool, by_examples, model.get_weights(), model.weight_names)
    ctx.step_keys = piece_keys(len(fedavg.layout))
    return fedavg, state.history, state.start


def _server(ctx: RoleContext, writer: CheckpointWriter, pool: ThreadPoolExecutor) -> dict[str, Any]:
    plan = ctx.plan
    workers = list(_agg(plan).workers)
    ctx.progress.emit("phase", name="resume")
    resume = ctx.agree_resume(plan.node, workers)
    specs, sched = _server_setup(ctx, workers)
    rounds, rpe = sched.rounds, sched.rounds_per_epoch
    ckpts = HorizontalCheckpoints(ctx, resume, rpe)
    found = [hsummary.summary_flow(ctx, w, plan.node) for w in workers]
    summary_flows = [f for f in found if f is not None] if all(found) else []
    aggregator, history, start = _make_aggregator(ctx, specs, pool, ckpts)
    announce_training(ctx, rounds, rpe, ckpts.resumed_from)
    meter = Meter()
    last_emit = 0.0

    def first_arrival() -> None:
        meter.start()
        # Writes into the weights wait for the last round's checkpoint, which may still be reading them
        # (measured: a second, alternating buffer instead of waiting saved no time on 2 cores and cost
        # 94 MB more at the hub).
        writer.wait()

    for r in range(start, rounds):
        ctx.check_stop()
        ctx.last_step = max(ctx.last_step, r)
        meter.stop(aggregator.round(r, first_arrival))
        now = time.monotonic()
        if now - last_emit > 0.25 or r + 1 == rounds:
            ctx.progress.emit("step", step=r + 1, total=rounds, examples_per_s=meter.rate)
            last_emit = now
        if summary_flows and ((r + 1) % rpe == 0 or r + 1 == rounds):
            # The workers send their summaries right after this round's weights (before they checkpoint),
            # so waiting here holds nobody up, and this epoch's metrics are in the checkpoint below.
            epoch = (r + 1 + rpe - 1) // rpe
            metrics = hsummary.combined_metrics(ctx, summary_flows, r)
            history.append({"epoch": epoch, **metrics})
            report_epoch(ctx, epoch, metrics)
        if ckpts.due(r + 1):
            ckpts.save_server(writer, r + 1, aggregator.checkpoint_arrays(), history)
    writer.wait()
    last = history[-1] if history else {}
    # The server's model inputs are the workers' specs; its card carries the combined metrics.
    export_model(ctx, aggregator.weights(), aggregator.names, specs=specs, metrics=last, history=history)
    return {"metrics": last, "history": history, "examples_per_s": meter.rate, "steps": rounds}


# ---------------------------------------------------------------------------------------------------------
# worker
# ---------------------------------------------------------------------------------------------------------


def _worker_setup(ctx: RoleContext, tables: dict[str, Any], specs: dict[str, TensorSpec] | None
                  ) -> tuple[WorkerData, dict[str, TensorSpec], dict[str, Any]]:
    """The worker's rows and preprocessing (fitted on its training rows: on its own, or, for the columns
    whose statistics the workers pool, on the aggregator's merge of everybody's), its model's input specs,
    and the server's schedule in answer to its rows and specs."""
    plan = ctx.plan
    srv = _agg(plan).server
    data = WorkerData.load(plan, tables)
    pooled = hsummary.pool_stats(ctx, srv, data.train_ds, data.table, data.train_rows)
    fit_rows, apply_to = data.preprocessing_rows()
    fit_preprocessing(ctx, tables, fit_rows, apply_to, pooled=pooled)
    if specs is None:
        specs = {k: v for k, v in input_specs(plan, ctx.policy).items() if k.startswith(f"{data.train_ds}.")}
    specs = data.model_specs(specs)
    ctx.send_json(srv, INFO_KEY, {"rows": len(data.train_rows),
                                   "specs": {k: v.model_dump(mode="json") for k, v in sorted(specs.items())}})
    return data, specs, ctx.recv_json(srv, SCHEDULE_KEY)


def worker(ctx: RoleContext, tables: dict[str, Any], specs: dict[str, TensorSpec] | None = None,
           after_setup: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train as a worker on ``tables``; ``specs`` (distributed: derived from the received shard) overrides
    the input specs of the plan's data sets."""
    plan = ctx.plan
    if plan.loss is None:  # the compiler gives every worker the loss; a plan without one is not a worker's
        raise RoleError(f"{plan.node}: a worker's plan has no loss; recompile the pipeline")
    agg = _agg(plan)
    srv = agg.server
    ctx.progress.emit("phase", name="resume")
    resume = ctx.agree_resume(srv, [])
    data, specs, sched = _worker_setup(ctx, tables, specs)
    rounds, local_steps = int(sched["rounds"]), int(sched["local_steps"])
    spe, rpe = int(sched["steps_per_epoch"]), int(sched["rounds_per_epoch"])
    if after_setup is not None:
        after_setup()

    sync = agg.mode == "sync"
    core = WorkerCore(data, specs, local_optimizer=not sync)
    send_flow = ctx.flow(plan.node, srv, ("gradients",) if sync else ("weights",)).id
    recv_flow = ctx.flow(srv, plan.node, ("weights",)).id
    summary_flow = hsummary.summary_flow(ctx, plan.node, srv)
    shapes = [tuple(v.shape) for v in core.variables]
    layout = [] if sync else piece_layout(shapes, [v.dtype.size for v in core.variables])
    if not sync:
        ctx.step_keys = piece_keys(len(layout))
    ckpts = HorizontalCheckpoints(ctx, resume, rpe)
    state = ckpts.restore_worker(core.model, core.opt, core.variables, srv, recv_flow)
    core.local_cursor, core.losses, history = state.local_cursor, state.epoch_losses, state.history
    announce_training(ctx, rounds, rpe, ckpts.resumed_from)
    meter = Meter()
    last_emit = 0.0
    for r in range(state.start, rounds):
        ctx.check_stop()
        ctx.last_step = max(ctx.last_step, r)
        meter.start()
        # The exchange is transfer, not local work: outside the meter, so the bench's round overhead (round
        # wall time minus busy time) counts it, as it counts the transfer for Flower's clients. (FedAvg
        # writes the averaged pieces into the variables as they arrive: that is inside the exchange too.)
        if sync:
            _sync_round(ctx, core, r, spe, (send_flow, recv_flow), meter)
        else:
            seen = core.local_steps(local_steps)
            meter.stop(seen)
            _exchange_pieces(ctx, r, layout, core, seen, (send_flow, recv_flow), shapes)
        now = time.monotonic()
        if now - last_emit > 0.25 or r + 1 == rounds:
            ctx.progress.emit("step", step=r + 1, total=rounds,
                              train_loss=core.losses[-1] if core.losses else None, examples_per_s=meter.rate)
            last_emit = now
        if (r + 1) % rpe == 0 or r + 1 == rounds:
            # train_loss: the mean training loss since the last epoch end; loss (and auc, ...): the holdout's.
            metrics, logits, labels, epoch_losses = core.end_epoch()
            if summary_flow is not None:  # after the round's weights, before this worker's checkpoint
                hsummary.send_summary(ctx, summary_flow, r, logits, labels, epoch_losses)
            epoch = (r + 1 + rpe - 1) // rpe
            history.append({"epoch": epoch, **metrics})
            report_epoch(ctx, epoch, metrics)
        if ckpts.due(r + 1):
            ckpts.save_worker(r + 1, core.opt, core.variables, core.local_cursor, history, core.losses)
    ctx.collect_landed()  # the server's notice of the last checkpoint (workers save in this thread)
    export_model(ctx, core.model.get_weights(), core.model.weight_names,
                 metrics=history[-1] if history else {}, history=history)
    return {"metrics": history[-1] if history else {}, "history": history, "examples_per_s": meter.rate,
            "steps": rounds}


def _sync_round(ctx: RoleContext, core: WorkerCore, r: int, spe: int, flows: tuple[str, str],
                meter: Meter) -> None:
    """A sync worker's step ``r`` (the meter running): its batch's gradients up, the new weights back."""
    send_flow, recv_flow = flows
    srv = _agg(ctx.plan).server
    link = ctx.links[srv]
    grads, seen = core.sync_gradients(r, spe)
    upload = [*encode_grads(grads, core.variables), np.array([seen], np.int64)]
    meter.stop(0)
    link.send_arrays(send_flow, r, upload)
    del upload
    weights = ctx.wait(partial(link.recv_arrays, recv_flow, r), srv)
    meter.start()
    core.model.set_weights(weights)
    del weights  # the received buffer; kept, it would stay alive through the next step
    meter.stop(seen)


def _exchange_pieces(ctx: RoleContext, r: int, layout: list[list[Seg]], core: WorkerCore, seen: int,
                     flows: tuple[str, str], shapes: list[tuple[int, ...]]) -> None:
    """A FedAvg worker's side of round ``r`` (:mod:`~fldsl.runtime.roles.hwire`): send the weights piece by
    piece, then take the server's averaged pieces as they come and write each into the variables in place.

    A variable is read once and its pieces sent as views of that read, so at most one variable's read is
    alive, not a copy of the whole model; averaged row ranges go in with ``scatter_update``,
    which writes the variable's buffer in place."""
    import tensorflow as tf

    send_flow, recv_flow = flows
    srv = _agg(ctx.plan).server
    link = ctx.links[srv]
    variables, names = core.variables, core.model.weight_names
    count = np.array([seen], np.int64)
    last_piece = {s.var: p for p, piece in enumerate(layout) for s in piece}
    held: dict[int, np.ndarray] = {}
    for p, piece in enumerate(layout):
        out = []
        for s in piece:
            if s.var not in held:
                # np.asarray of the read tensor, not .numpy(): no extra copy (2-3x faster on 94 MB). The
                # views are gone (frames are copies) before the pieces are written back, so nothing aliases
                # the variable then; if something did, TensorFlow would copy on write, not corrupt it.
                held[s.var] = np.asarray(variables[s.var].read_value())
            out.append(seg_view(held, s))
        link.send_arrays(send_flow, keys.piece(r, p), [*out, count])
        del out
        for s in piece:
            if last_piece[s.var] == p:
                del held[s.var]
    for p, piece in enumerate(layout):
        key = keys.piece(r, p)
        arrays = ctx.wait(partial(link.recv_arrays, recv_flow, key), srv)
        parts, _ = parse_piece(arrays, piece, shapes, names, srv, r, p)
        for s, a in zip(piece, parts, strict=True):
            v = variables[s.var]
            if s.rows is None:
                v.assign(a)
            else:
                v.scatter_update(tf.IndexedSlices(a, tf.range(s.rows[0], s.rows[1], dtype=tf.int64)))
        del arrays, parts  # the received buffer
