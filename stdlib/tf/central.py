"""The central reference: the same model trained in ONE process on the joined data.

This is what quality tests and ``fldsl bench`` compare a federated run against. It uses exactly the pieces
the runtime uses (``build_segment``, ``loss_fn``, ``make_optimizer``, ``epoch_batches``,
``stratified_split``), a custom ``tf.function`` step over numpy batches (no tf.data iterator is ever
created: BENCHMARKS.md, profiles) and a fixed seed, so two calls with the same arguments give the same
result.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

from fldsl.artifacts import DType, LossSpec, OpCall, Plan, TensorSpec, TrainSpec
from fldsl.stdlib.tf.batching import epoch_batches
from fldsl.stdlib.tf.losses import loss_fn, scores
from fldsl.stdlib.tf.metrics import ScoreAccumulator
from fldsl.stdlib.tf.optim import make_optimizer
from fldsl.stdlib.tf.segment import Segment, build_segment

_NP_TO_DTYPE: dict[str, DType] = {"float32": "float32", "float64": "float64", "int32": "int32",
                                  "int64": "int64", "bool": "bool"}


@dataclass
class CentralResult:
    history: list[dict[str, float]]  # one entry per epoch: epoch, train_loss, then evaluation metrics
    metrics: dict[str, float]  # evaluation metrics after the last epoch (holdout / eval set; else train)
    examples_per_s: float  # training examples per second (forward + backward + update), evaluation and the
    # first step (tf.function tracing) excluded
    steps: int = 0
    first_step_s: float = 0.0  # the first step alone: tracing + one step
    weights: list[np.ndarray] = field(default_factory=list)
    segment: Segment | None = None


def infer_specs(data: Mapping[str, np.ndarray]) -> dict[str, TensorSpec]:
    specs = {}
    for ref, arr in data.items():
        dtype = _NP_TO_DTYPE.get(np.asarray(arr).dtype.name)
        if dtype is None:
            raise ValueError(f"input `{ref}` has dtype {arr.dtype}, which no op accepts")
        specs[ref] = TensorSpec(shape=[None, *arr.shape[1:]], dtype=dtype)
    return specs


def evaluate(segment: Segment, loss: LossSpec, data: Mapping[str, np.ndarray], labels: np.ndarray,
             names: Sequence[str], batch_size: int = 4096) -> dict[str, float]:
    """Loss and metrics of ``segment`` on the given rows (exact AUC over all of them)."""
    fn = loss_fn(loss)

    @tf.function(reduce_retracing=True)
    def predict(x: dict[str, tf.Tensor], y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        logits = segment(x, training=False)[loss.logits]
        return fn(logits, y), scores(loss, logits)

    acc = ScoreAccumulator()
    n = len(labels)
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        value, s = predict({k: v[sl] for k, v in data.items()}, labels[sl])
        acc.add(labels[sl], s.numpy(), float(value))
    return acc.result(tuple(names))


def train_central(ops: Sequence[OpCall], loss: LossSpec, train: TrainSpec, data: Mapping[str, np.ndarray],
                  labels: np.ndarray, *, ids: np.ndarray | None = None,
                  input_specs: Mapping[str, TensorSpec] | None = None,
                  eval_data: Mapping[str, np.ndarray] | None = None, eval_labels: np.ndarray | None = None,
                  keep_segment: bool = False) -> CentralResult:
    """Train ``ops`` on ``data`` (refs -> arrays, row-aligned with ``labels``) as the runtime would.

    Evaluation: ``eval_data``/``eval_labels`` if given; else, when ``train.validation.fraction > 0``, the
    stratified holdout of ``ids`` (row numbers if None) made with ``stratified_split`` — the same split the
    label owner makes in a federated run; else the training rows. Training rows are visited in the split's
    canonical order permuted per epoch by ``epoch_batches(n, batch_size, train.seed, epoch)``.
    """
    from fldsl.runtime.data import stratified_split

    labels = np.asarray(labels)
    n = len(labels)
    for ref, arr in data.items():
        if len(arr) != n:
            raise ValueError(f"input `{ref}` has {len(arr)} rows, labels have {n}")
    train_rows = np.arange(n)
    if eval_data is None and train.validation.fraction > 0:
        row_ids = np.arange(n) if ids is None else np.asarray(ids)
        train_ids, hold_ids = stratified_split(row_ids, labels, train.validation.fraction,
                                               train.validation.seed)
        pos = {str(v): i for i, v in enumerate(row_ids.tolist())}
        train_rows = np.array([pos[str(v)] for v in train_ids.tolist()], dtype=np.int64)
        hold_rows = np.array([pos[str(v)] for v in hold_ids.tolist()], dtype=np.int64)
        eval_data = {k: v[hold_rows] for k, v in data.items()}
        eval_labels = labels[hold_rows]
    elif eval_data is None:
        eval_data, eval_labels = data, labels
    assert eval_labels is not None
    x_train = {k: np.asarray(v)[train_rows] for k, v in data.items()}
    y_train = labels[train_rows]

    specs = dict(input_specs) if input_specs is not None else infer_specs(data)
    segment = build_segment(ops, specs, train.seed)
    variables = list(segment.trainable_variables)
    optimizer = make_optimizer(train.optimizer)
    optimizer.build(variables)
    fn = loss_fn(loss)

    @tf.function(reduce_retracing=True)
    def step(x: dict[str, tf.Tensor], y: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            value = fn(segment(x, training=True)[loss.logits], y)
        optimizer.apply(tape.gradient(value, variables), variables)
        return value

    names = [m for m in train.metrics]
    history: list[dict[str, float]] = []
    seen = 0
    busy = 0.0
    steps = 0
    first_step = 0.0
    for epoch in range(train.epochs):
        batches = epoch_batches(len(y_train), train.batch_size, train.seed, epoch)
        if train.steps_per_epoch is not None:
            batches = batches[: train.steps_per_epoch]
        total, count = 0.0, 0
        t0 = time.perf_counter()
        for idx in batches:
            value = float(step({k: v[idx] for k, v in x_train.items()}, y_train[idx]))
            total += value * len(idx)
            count += len(idx)
            steps += 1
            if steps == 1:  # tracing dominates the first step: keep it out of the throughput
                first_step = time.perf_counter() - t0
                t0 = time.perf_counter()
                seen -= len(idx)
        busy += time.perf_counter() - t0
        seen += count
        entry = {"epoch": float(epoch + 1), "train_loss": total / max(count, 1)}
        entry.update(evaluate(segment, loss, eval_data, eval_labels, names))
        history.append(entry)
    final = {k: v for k, v in history[-1].items() if k not in ("epoch", "train_loss")} if history else {}
    return CentralResult(history=history, metrics=final, examples_per_s=seen / busy if busy > 0 else 0.0,
                         steps=steps, first_step_s=first_step, weights=segment.get_weights(),
                         segment=segment if keep_segment else None)


def train_central_plans(plans: Sequence[Plan], base_dir: Path | str | None = None,
                        keep_segment: bool = False) -> CentralResult:
    """The central reference for a compiled pipeline: every node's data joined in one process.

    Vertical: the data sets of all nodes are inner-joined on their ids (what PSI computes), the ops of
    every party trained as one model, the holdout split made as the label owner makes it. Horizontal /
    distributed: the rows of every node's training data set are concatenated (ids made unique per node) and
    the plan's test data set, if any, is the evaluation set.
    """
    from fldsl.runtime.data import Table, load_dataset

    owners = [p for p in plans if p.loss is not None]
    if not owners:
        raise ValueError("no plan has a loss: cannot train a central reference")
    lead = owners[0]
    loss, train = lead.loss, lead.train
    assert loss is not None
    label_ds, label_field = loss.label.split(".", 1)
    tables: dict[tuple[str, str], Table] = {}
    for plan in plans:
        for spec in plan.data:
            tables[(plan.node, spec.name)] = load_dataset(spec, base_dir)

    if lead.role.startswith("vertical"):
        label_table = tables[(lead.node, label_ds)]
        keep = set(label_table.ids.tolist())
        for t in tables.values():
            keep &= set(t.ids.tolist())
        ids = np.array([i for i in label_table.ids.tolist() if i in keep])
        data: dict[str, np.ndarray] = {}
        for (_, name), t in tables.items():
            rows = t.select(ids)
            data.update({f"{name}.{f}": v for f, v in rows.fields.items() if f"{name}.{f}" != loss.label})
        labels = label_table.select(ids).fields[label_field]
        ops: list[OpCall] = []
        seen: set[str] = set()
        # Passive parties first: their outputs are inputs of the label owner's ops.
        for plan in sorted(plans, key=lambda p: p.loss is not None):
            for call in plan.model:
                if call.output not in seen:
                    ops.append(call)
                    seen.add(call.output)
        return train_central(ops, loss, train, data, labels, ids=ids, keep_segment=keep_segment)

    test_name = train.validation.test_data
    train_parts = [(node, t) for (node, name), t in sorted(tables.items()) if name == label_ds]
    if not train_parts:
        raise ValueError(f"no node holds the training data set `{label_ds}`")
    data = {f"{label_ds}.{f}": np.concatenate([t.fields[f] for _, t in train_parts])
            for f in train_parts[0][1].fields if f != label_field}
    labels = np.concatenate([t.fields[label_field] for _, t in train_parts])
    ids = np.array([f"{node}:{i}" for node, t in train_parts for i in t.ids.tolist()])
    eval_data = eval_labels = None
    if test_name:
        test = next((t for (_, name), t in sorted(tables.items()) if name == test_name), None)
        if test is None:
            raise ValueError(f"the test data set `{test_name}` is not in any plan")
        eval_data = {f"{label_ds}.{f}": v for f, v in test.fields.items() if f != label_field}
        eval_labels = test.fields[label_field]
    return train_central(lead.model, loss, train, data, labels, ids=ids, eval_data=eval_data,
                         eval_labels=eval_labels, keep_segment=keep_segment)
