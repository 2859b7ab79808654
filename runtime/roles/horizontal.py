"""Horizontal federated learning: workers train the same model on their own rows, a server aggregates.

``sync`` (parameter server, every step): each worker computes the gradients of one batch and sends them with
its example count; the server averages them (weighted by examples), applies its optimiser and sends the new
weights back. ``fedavg``: each worker trains locally for N steps (or one local epoch) from the global weights,
sends its weights and example count; the server sends back the weighted average.

Set-up: resume agreement (the server coordinates), then each worker tells the server its row count and the
specs of its model inputs (the server has no data; it builds the same model from the same seed, so all start
from identical weights), and the server answers with the schedule (steps per epoch, total steps / rounds).
Workers with fewer rows than the largest one wrap around within an epoch so every step has all workers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from fldsl.runtime.roles.common import (
    CTRL_INFO,
    CTRL_SCHEDULE,
    Meter,
    RoleContext,
    RoleError,
    announce_training,
    configure_tf,
    cyclic_batch,
    epoch_batch,
    epoch_order,
    export_model,
    input_specs,
    is_checkpoint_step,
    label_ref,
    load_tables,
    save_checkpoint,
    score_metrics,
)
from fldsl.runtime.roles.optstate import restore_training, training_arrays

from fldsl.artifacts import Plan, TensorSpec


def run(ctx: RoleContext) -> dict[str, Any]:
    configure_tf()
    if ctx.plan.role.endswith(".server"):
        return server(ctx)
    return worker(ctx, load_tables(ctx.plan))


def _agg(plan: Plan):
    if plan.aggregation is None:
        raise RoleError(f"{plan.node}: the plan has no aggregation section")
    return plan.aggregation


# ---------------------------------------------------------------------------------------------------------
# server
# ---------------------------------------------------------------------------------------------------------


def server(ctx: RoleContext) -> dict[str, Any]:
    import tensorflow as tf
    from fldsl.stdlib.tf import build_segment, make_optimizer

    plan = ctx.plan
    agg = _agg(plan)
    workers = list(agg.workers)
    ctx.progress.emit("phase", name="resume")
    resume = ctx.agree_resume(plan.node, workers)

    infos = {w: ctx.recv_json(w, CTRL_INFO) for w in workers}
    specs = {k: TensorSpec.model_validate(v) for k, v in infos[workers[0]]["specs"].items()}
    for w in workers[1:]:
        if infos[w]["specs"] != infos[workers[0]]["specs"]:
            raise RoleError(f"workers {workers[0]} and {w} have different input schemas; horizontal "
                            "partitioning needs the same columns everywhere")
    rows = [int(infos[w]["rows"]) for w in workers]
    b = plan.train.batch_size
    spe = max(1, math.ceil(max(rows) / b))
    if agg.mode == "sync":
        rounds, local = spe * plan.train.epochs, [1] * len(workers)
    elif agg.every_epoch or not agg.every_steps:
        rounds = plan.train.epochs
        local = [max(1, math.ceil(n / b)) for n in rows]
    else:
        rounds = math.ceil(spe * plan.train.epochs / agg.every_steps)
        local = [agg.every_steps] * len(workers)
    rounds_per_epoch = spe if agg.mode == "sync" else max(1, rounds // plan.train.epochs)
    for w, n_local in zip(workers, local, strict=True):
        ctx.send_json(w, CTRL_SCHEDULE, {"steps_per_epoch": spe, "rounds": rounds, "local_steps": n_local,
                                         "rounds_per_epoch": rounds_per_epoch})

    model = build_segment(plan.model, specs, seed=plan.train.seed)
    variables = list(model.trainable_variables)
    opt = make_optimizer(plan.train.optimizer) if agg.mode == "sync" else None
    grad_in = {w: ctx.flow(w, plan.node, ("gradients", "weights")).id for w in workers}
    weights_out = {w: ctx.flow(plan.node, w, ("weights",)).id for w in workers}

    if opt is not None:
        @tf.function(reduce_retracing=True)
        def apply(grads):
            opt.apply(grads, variables)

    start = 0
    if resume is not None:
        ckpt = ctx.store.load(resume)
        restore_training(model, opt, variables, ckpt.arrays)
        start = ckpt.step
    announce_training(ctx, rounds, rounds_per_epoch, start if resume is not None else None)
    meter = Meter()
    last_emit = 0.0
    nvar = len(variables)
    for r in range(start, rounds):
        ctx.check_stop()
        ctx.last_step = max(ctx.last_step, r)
        parts, counts = [], []
        for w in workers:
            arrays = ctx.wait(lambda t, w=w, r=r: ctx.links[w].recv_arrays(grad_in[w], r, t), w)
            if len(arrays) != nvar + 1:
                raise RoleError(f"{w} sent {len(arrays)} arrays at round {r}, expected {nvar + 1}")
            parts.append(arrays[:nvar])
            counts.append(float(np.asarray(arrays[nvar]).reshape(-1)[0]))
        meter.start()
        if agg.weighting == "examples" and sum(counts) > 0:
            coef = np.asarray(counts) / sum(counts)
        else:
            coef = np.full(len(parts), 1.0 / len(parts))
        mean = [sum(c * p[i] for c, p in zip(coef, parts, strict=True)).astype(parts[0][i].dtype)
                for i in range(nvar)]
        if opt is not None:
            apply([tf.convert_to_tensor(g) for g in mean])
        else:
            model.set_weights(mean)
        weights = model.get_weights()
        for w in workers:
            ctx.links[w].send_arrays(weights_out[w], r, weights)
        meter.stop(int(sum(counts)))
        now = time.monotonic()
        if now - last_emit > 0.25 or r + 1 == rounds:
            ctx.progress.emit("step", step=r + 1, total=rounds, examples_per_s=meter.rate)
            last_emit = now
        if is_checkpoint_step(plan, r + 1, rounds_per_epoch):
            save_checkpoint(ctx, r + 1, training_arrays(weights, opt, variables), {})
    export_model(ctx, model.get_weights(), model.weight_names)
    return {"metrics": {}, "examples_per_s": meter.rate, "steps": rounds}


# ---------------------------------------------------------------------------------------------------------
# worker
# ---------------------------------------------------------------------------------------------------------


def _split_tables(plan: Plan, tables: dict[str, Any]) -> tuple[str, Any, Any | None]:
    train_ds, _ = label_ref(plan)
    if train_ds not in tables:
        raise RoleError(f"{plan.node}: the loss reads `{plan.loss.label}` but this node holds "
                        f"{', '.join(sorted(tables)) or 'no data'}")
    test_name = plan.train.validation.test_data
    return train_ds, tables[train_ds], tables.get(test_name) if test_name else None


def worker(ctx: RoleContext, tables: dict[str, Any], specs: dict[str, TensorSpec] | None = None,
           after_setup: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train as a worker on ``tables``; ``specs`` (distributed: derived from the received shard) overrides
    the input specs of the plan's data sets."""
    import tensorflow as tf
    from fldsl.stdlib.tf import build_segment, loss_fn, make_optimizer

    plan = ctx.plan
    agg = _agg(plan)
    srv = agg.server
    ctx.progress.emit("phase", name="resume")
    resume = ctx.agree_resume(srv, [])
    train_ds, table, test_table = _split_tables(plan, tables)
    _, label_field = label_ref(plan)
    labels_all = table.fields[label_field]

    # Rows used for training and (optionally) a local stratified holdout.
    n_all = len(table.ids)
    train_rows = np.arange(n_all, dtype=np.int64)
    hold_rows = np.zeros(0, dtype=np.int64)
    frac = plan.train.validation.fraction
    if frac > 0 and test_table is None:
        from fldsl.runtime.data import stratified_split

        ids = np.asarray(table.ids)
        tr, ho = stratified_split(ids, labels_all, frac, plan.train.validation.seed)
        pos = {str(i): k for k, i in enumerate(ids.tolist())}
        train_rows = np.array([pos[str(i)] for i in tr], dtype=np.int64)
        hold_rows = np.array([pos[str(i)] for i in ho], dtype=np.int64)

    if specs is None:
        specs = {k: v for k, v in input_specs(plan, ctx.policy).items() if k.startswith(f"{train_ds}.")}
    refs = {r for op in plan.model for r in op.inputs if r.startswith(f"{train_ds}.")}
    specs = {k: v for k, v in specs.items() if k in refs}
    ctx.send_json(srv, CTRL_INFO, {"rows": len(train_rows),
                                   "specs": {k: v.model_dump(mode="json") for k, v in sorted(specs.items())}})
    sched = ctx.recv_json(srv, CTRL_SCHEDULE)
    rounds, local_steps = int(sched["rounds"]), int(sched["local_steps"])
    spe, rpe = int(sched["steps_per_epoch"]), int(sched["rounds_per_epoch"])
    if after_setup is not None:
        after_setup()

    model = build_segment(plan.model, specs, seed=plan.train.seed)
    variables = list(model.trainable_variables)
    loss = loss_fn(plan.loss)
    sync = agg.mode == "sync"
    opt = None if sync else make_optimizer(plan.train.optimizer)
    send_flow = ctx.flow(plan.node, srv, ("gradients",) if sync else ("weights",)).id
    recv_flow = ctx.flow(srv, plan.node, ("weights",)).id
    link = ctx.links[srv]
    own_refs = model.input_refs

    @tf.function(reduce_retracing=True)
    def grad_step(inputs, labels):
        with tf.GradientTape() as tape:
            out = model(inputs, training=True)
            value = loss(out[plan.loss.logits], labels)
        grads = tape.gradient(value, variables)
        return value, [tf.convert_to_tensor(g) for g in grads]

    if opt is not None:
        @tf.function(reduce_retracing=True)
        def local_step(inputs, labels):
            with tf.GradientTape() as tape:
                out = model(inputs, training=True)
                value = loss(out[plan.loss.logits], labels)
            opt.apply(tape.gradient(value, variables), variables)
            return value

    @tf.function(reduce_retracing=True)
    def predict(inputs):
        return model(inputs, training=False)[plan.loss.logits]

    def inputs_for(t: Any, rows: np.ndarray | None) -> dict[str, np.ndarray]:
        out = {}
        for ref in own_refs:
            _, fld = ref.split(".", 1)
            arr = t.fields[fld]
            out[ref] = arr if rows is None else arr[rows]
        return out

    start = 0
    local_cursor = 0  # fedavg: local steps taken so far (drives the local batch order)
    history: list[dict[str, Any]] = []
    if resume is not None:
        ckpt = ctx.store.load(resume)
        restore_training(model, opt, variables, ckpt.arrays)
        start = ckpt.step
        local_cursor = int(ckpt.meta.get("local_cursor", 0))
        history = list(ckpt.meta.get("history", []))
    announce_training(ctx, rounds, rpe, start if resume is not None else None)
    b = plan.train.batch_size
    n = len(train_rows)
    local_spe = max(1, math.ceil(n / b))
    meter = Meter()
    last_emit = 0.0
    losses: list[float] = []
    for r in range(start, rounds):
        ctx.check_stop()
        ctx.last_step = max(ctx.last_step, r)
        meter.start()
        if sync:
            e, j = divmod(r, spe)
            rows = train_rows[cyclic_batch(epoch_order(n, plan.train.seed, e), j, b)]
            value, grads = grad_step(inputs_for(table, rows), labels_all[rows])
            link.send_arrays(send_flow, r, [g.numpy() for g in grads] + [np.array([len(rows)], np.int64)])
            seen = len(rows)
            losses.append(float(value))
        else:
            seen = 0
            for _ in range(local_steps):
                e, j = divmod(local_cursor, local_spe)
                rows = train_rows[epoch_batch(n, plan.train.seed, e, j, b)]
                losses.append(float(local_step(inputs_for(table, rows), labels_all[rows])))
                seen += len(rows)
                local_cursor += 1
            link.send_arrays(send_flow, r, [*model.get_weights(), np.array([seen], np.int64)])
        meter.stop(0)
        weights = ctx.wait(lambda t, r=r: link.recv_arrays(recv_flow, r, t), srv)
        meter.start()
        model.set_weights(weights)
        meter.stop(seen)
        now = time.monotonic()
        if now - last_emit > 0.25 or r + 1 == rounds:
            ctx.progress.emit("step", step=r + 1, total=rounds, loss=losses[-1] if losses else None,
                              examples_per_s=meter.rate)
            last_emit = now
        if (r + 1) % rpe == 0 or r + 1 == rounds:
            metrics: dict[str, Any] = {"loss": float(np.mean(losses))} if losses else {}
            losses = []
            if test_table is not None:
                labels = test_table.fields[label_field]
                metrics.update(_eval(plan, predict, inputs_for(test_table, None), labels))
            elif len(hold_rows):
                metrics.update(_eval(plan, predict, inputs_for(table, hold_rows), labels_all[hold_rows]))
            epoch = (r + 1 + rpe - 1) // rpe
            history.append({"epoch": epoch, **metrics})
            ctx.progress.emit("epoch", epoch=epoch, metrics=metrics)
        if is_checkpoint_step(plan, r + 1, rpe):
            save_checkpoint(ctx, r + 1, training_arrays(model.get_weights(), opt, variables),
                            {"local_cursor": local_cursor, "history": history})
    export_model(ctx, model.get_weights(), model.weight_names)
    return {"metrics": history[-1] if history else {}, "history": history, "examples_per_s": meter.rate,
            "steps": rounds}


def _eval(plan: Plan, predict, inputs: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
    b = max(plan.train.batch_size, 1024)
    n = len(labels)
    logits = [predict({k: v[i:i + b] for k, v in inputs.items()}).numpy() for i in range(0, n, b)]
    if not logits:
        return {}
    return score_metrics(plan.loss.op, plan.train.metrics, np.concatenate(logits), labels)

