"""A horizontal worker's training without any transport: its rows, model, local steps and evaluation.

Shared by ``horizontal.worker`` (which adds the exchange with the server, checkpoints and progress) and by the
Flower bench's clients (``fldsl.bench.flower``), so that the bench compares Flower with exactly the training
an fldsl worker does: the same stratified holdout, model (same seed), optimiser, batch order and evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fldsl.artifacts import Plan, TensorSpec
from fldsl.runtime.roles.common import (
    RoleError,
    cyclic_batch,
    epoch_batch,
    epoch_order,
    label_ref,
    score_metrics,
)


@dataclass
class WorkerData:
    """The worker's training table, its training and holdout rows, and an optional separate test table."""

    plan: Plan
    tables: dict[str, Any]
    train_ds: str
    table: Any
    test_table: Any | None
    label_field: str
    train_rows: np.ndarray
    hold_rows: np.ndarray

    @classmethod
    def load(cls, plan: Plan, tables: dict[str, Any]) -> WorkerData:
        train_ds, label_field = label_ref(plan)
        if train_ds not in tables:
            label = plan.loss.label if plan.loss is not None else "a label"
            raise RoleError(f"{plan.node}: the loss reads `{label}` but this node holds "
                            f"{', '.join(sorted(tables)) or 'no data'}")
        test_name = plan.train.validation.test_data
        table = tables[train_ds]
        test_table = tables.get(test_name) if test_name else None
        n_all = len(table.ids)
        train_rows = np.arange(n_all, dtype=np.int64)
        hold_rows = np.zeros(0, dtype=np.int64)
        frac = plan.train.validation.fraction
        if frac > 0 and test_table is None:  # a local stratified holdout (a test set replaces it)
            from fldsl.runtime.data import stratified_split

            ids = np.asarray(table.ids)
            tr, ho = stratified_split(ids, table.fields[label_field], frac, plan.train.validation.seed)
            pos = {str(i): k for k, i in enumerate(ids.tolist())}
            train_rows = np.array([pos[str(i)] for i in tr], dtype=np.int64)
            hold_rows = np.array([pos[str(i)] for i in ho], dtype=np.int64)
        return cls(plan, tables, train_ds, table, test_table, label_field, train_rows, hold_rows)

    @property
    def labels(self) -> np.ndarray:
        return self.table.fields[self.label_field]

    def preprocessing_rows(self) -> tuple[dict[str, np.ndarray], dict[str, str] | None]:
        """(rows to fit each data set's preprocessing on, data sets transformed with another's fit): the
        training rows only; a test set is transformed with the training set's statistics."""
        test_name = self.plan.train.validation.test_data
        apply_to = {test_name: self.train_ds} if self.test_table is not None and test_name else None
        return {self.train_ds: self.train_rows}, apply_to

    def model_specs(self, specs: dict[str, TensorSpec]) -> dict[str, TensorSpec]:
        """The specs of the training data set's fields the model reads (what the server builds from)."""
        refs = {r for op in self.plan.model for r in op.inputs if r.startswith(f"{self.train_ds}.")}
        return {k: v for k, v in specs.items() if k in refs}


class WorkerCore:
    """The model of a worker and its steps. ``local_optimizer``: FedAvg (the worker applies its own
    optimiser, whose slots carry over between rounds); else sync (the worker only computes gradients).

    ``losses`` holds the training batch losses since the last epoch end (``end_epoch`` takes them);
    ``local_cursor`` counts FedAvg local steps and drives their batch order across rounds."""

    def __init__(self, data: WorkerData, specs: dict[str, TensorSpec], *, local_optimizer: bool) -> None:
        import tensorflow as tf

        from fldsl.stdlib.tf import build_segment, loss_fn, make_optimizer
        from fldsl.stdlib.tf.optim import unique_rows

        plan = data.plan
        if plan.loss is None:  # the compiler gives every worker the loss: a plan without one is no worker's
            raise RoleError(f"{plan.node}: a worker's plan has no loss; recompile the pipeline")
        self.data, self.plan = data, plan
        self.model = model = build_segment(plan.model, specs, seed=plan.train.seed)
        self.variables = variables = list(model.trainable_variables)
        self.opt = opt = make_optimizer(plan.train.optimizer) if local_optimizer else None
        loss, logits_ref = loss_fn(plan.loss), plan.loss.logits
        self.losses: list[float] = []
        self.local_cursor = 0

        @tf.function(reduce_retracing=True)
        def grad_step(inputs, labels):
            with tf.GradientTape() as tape:
                value = loss(model(inputs, training=True)[logits_ref], labels)
            grads = tape.gradient(value, variables)
            # Embedding tables: (indices, rows summed per index); everything else dense.
            return value, [unique_rows(g) if isinstance(g, tf.IndexedSlices) else tf.convert_to_tensor(g)
                           for g in grads]

        @tf.function(reduce_retracing=True)
        def local_step(inputs, labels):
            assert opt is not None  # FedAvg (local_optimizer) only
            with tf.GradientTape() as tape:
                value = loss(model(inputs, training=True)[logits_ref], labels)
            opt.apply(tape.gradient(value, variables), variables)
            return value

        @tf.function(reduce_retracing=True)
        def predict(inputs):
            return model(inputs, training=False)[logits_ref]

        self._grad_step, self._local_step, self._predict = grad_step, local_step, predict

    def inputs(self, table: Any, rows: np.ndarray | None) -> dict[str, np.ndarray]:
        out = {}
        for ref in self.model.input_refs:
            arr = table.fields[ref.split(".", 1)[1]]
            out[ref] = arr if rows is None else arr[rows]
        return out

    def sync_gradients(self, r: int, steps_per_epoch: int) -> tuple[list[Any], int]:
        """Sync step ``r``: the gradients of this worker's batch (workers with fewer rows than the largest
        one wrap around within an epoch) and its row count."""
        d, b = self.data, self.plan.train.batch_size
        e, j = divmod(r, steps_per_epoch)
        rows = d.train_rows[cyclic_batch(epoch_order(len(d.train_rows), self.plan.train.seed, e), j, b)]
        value, grads = self._grad_step(self.inputs(d.table, rows), d.labels[rows])
        self.losses.append(float(value))
        return grads, len(rows)

    def local_steps(self, count: int) -> int:
        """FedAvg: ``count`` local optimiser steps in this worker's own epoch order; returns the rows seen."""
        d, b = self.data, self.plan.train.batch_size
        n = len(d.train_rows)
        local_spe = max(1, math.ceil(n / b))
        seen = 0
        for _ in range(count):
            e, j = divmod(self.local_cursor, local_spe)
            rows = d.train_rows[epoch_batch(n, self.plan.train.seed, e, j, b)]
            self.losses.append(float(self._local_step(self.inputs(d.table, rows), d.labels[rows])))
            seen += len(rows)
            self.local_cursor += 1
        return seen

    def holdout(self) -> tuple[np.ndarray | None, np.ndarray]:
        """(the model's logits, the labels) of the test set, else of the holdout rows; logits None when
        there are none. In evaluation batches."""
        d = self.data
        if d.test_table is not None:
            labels = d.test_table.fields[d.label_field]
            inputs = self.inputs(d.test_table, None)
        elif len(d.hold_rows):
            labels, inputs = d.labels[d.hold_rows], self.inputs(d.table, d.hold_rows)
        else:
            return None, d.labels[:0]
        b = max(self.plan.train.batch_size, 1024)
        logits = [self._predict({k: v[i:i + b] for k, v in inputs.items()}).numpy()
                  for i in range(0, len(labels), b)]
        return (np.concatenate(logits) if logits else None), labels

    def end_epoch(self) -> tuple[dict[str, Any], np.ndarray | None, np.ndarray, list[float]]:
        """The epoch-end evaluation: (metrics: train_loss, the mean training loss since the last epoch end,
        and the holdout's loss, auc, ...; holdout logits; labels; the epoch's batch losses)."""
        assert self.plan.loss is not None
        epoch_losses, self.losses = self.losses, []
        metrics: dict[str, Any] = {"train_loss": float(np.mean(epoch_losses))} if epoch_losses else {}
        logits, labels = self.holdout()
        if logits is not None:
            wanted = list[str](self.plan.train.metrics)
            metrics.update(score_metrics(self.plan.loss.op, wanted, logits, labels))
        return metrics, logits, labels, epoch_losses
