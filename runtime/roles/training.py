"""What training roles share around the model: TensorFlow set-up, input specs, the shared batch order,
the examples-per-second meter, holdout metrics and the per-epoch report (progress event, TensorBoard)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fldsl.artifacts import Plan, Policy, TensorSpec
from fldsl.runtime.roles.errors import RoleError

if TYPE_CHECKING:
    from fldsl.runtime.roles.context import RoleContext

log = logging.getLogger("fldsl.node")


def configure_tf(intra: int = 1, inter: int = 2) -> None:
    """Few threads per node: several nodes share the machine's cores (inter-op >= 2 avoids deadlocks)."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError:
        pass  # already initialised (tests running several roles in one process)


def input_specs(plan: Plan, policy: Policy) -> dict[str, TensorSpec]:
    """Specs of everything the node's model reads: its data fields and the tensors it receives."""
    specs: dict[str, TensorSpec] = {}
    for ds in plan.data:
        for name, spec in ds.fields.items():
            specs[f"{ds.name}.{name}"] = spec
    produced = {op.output for op in plan.model}
    for op in plan.model:
        for ref in op.inputs:
            if ref in specs or ref in produced:
                continue
            for f in policy.flows:
                if f.dst == plan.node and f.tensor == ref and f.spec is not None:
                    specs[ref] = f.spec
                    break
            else:
                raise RoleError(f"{plan.node}: the model reads `{ref}`, which is neither a data field of "
                                "this node nor a tensor it receives")
    return specs


def build_model(plan: Plan, policy: Policy):
    from fldsl.stdlib.tf import build_segment

    return build_segment(plan.model, input_specs(plan, policy), seed=plan.train.seed)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of one epoch: identical on every node (and in the central reference)."""
    from fldsl.stdlib.tf.batching import epoch_permutation

    return epoch_permutation(n, seed, epoch)


def epoch_batch(n: int, seed: int, epoch: int, j: int, batch_size: int) -> np.ndarray:
    """Batch j of one epoch's shared row order (a view; the order itself is computed once per epoch)."""
    return epoch_order(n, seed, epoch)[j * batch_size:(j + 1) * batch_size]


def batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def cyclic_batch(order: np.ndarray, j: int, batch_size: int) -> np.ndarray:
    """Batch j of an order that wraps around (workers with fewer rows than the largest one)."""
    n = len(order)
    if n == 0:
        raise RoleError("no training rows")
    idx = (np.arange(batch_size) + j * batch_size) % n
    return order[idx]


def field_inputs(plan: Plan, tables: dict[str, Any], rows: np.ndarray | None) -> dict[str, np.ndarray]:
    """``{"<dataset>.<field>": array}`` for the given rows (all rows when None)."""
    out = {}
    for ds in plan.data:
        table = tables[ds.name]
        for name in ds.fields:
            arr = table.fields[name]
            out[f"{ds.name}.{name}"] = arr if rows is None else arr[rows]
    return out


def label_ref(plan: Plan) -> tuple[str, str]:
    if plan.loss is None:
        raise RoleError(f"{plan.node}: the plan has no loss")
    ds, _, fld = plan.loss.label.partition(".")
    return ds, fld


class Meter:
    """Examples per second over the training loop (excluding set-up)."""

    def __init__(self) -> None:
        self.examples = 0
        self.seconds = 0.0
        self._t: float | None = None

    def start(self) -> None:
        self._t = time.perf_counter()

    def stop(self, examples: int) -> None:
        if self._t is not None:
            self.seconds += time.perf_counter() - self._t
            self._t = None
        self.examples += examples

    @property
    def rate(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0


def score_metrics(loss_op: str, wanted: Sequence[str], logits: np.ndarray,
                  labels: np.ndarray) -> dict[str, float]:
    """Holdout (or test) metrics of predictions, computed by whoever holds the labels: ``loss`` is the
    pipeline's loss on these rows, plus ``auc`` / ``accuracy`` where asked (stdlib ``evaluate_logits``)."""
    from fldsl.stdlib.tf import metrics as M

    return M.evaluate_logits(loss_op, list(wanted), logits, labels)


def report_epoch(ctx: RoleContext, epoch: int, metrics: dict[str, Any]) -> None:
    """An epoch's metrics: the progress event (metrics.jsonl, the summary) and TensorBoard scalars under
    ``<run-dir>/tensorboard/<node>/`` (``tensorboard --logdir runs/`` shows every node of every run). The
    event files are plain, as metrics.jsonl is: they hold the same numbers, not model or data."""
    ctx.progress.emit("epoch", epoch=epoch, metrics=metrics)
    # tf.summary.scalar is the tensorboard package's (not installed with tensorflow-cpu here); the writer
    # and write ops it wraps are TensorFlow's own. The "scalars" plugin tag is what makes TensorBoard plot
    # a tensor summary as a scalar curve, exactly as tf.summary.scalar marks it.
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2
    from tensorflow.python.ops import summary_ops_v2

    writer = ctx.cache.get("tensorboard")
    if writer is False:  # could not write before: said once, training goes on
        return
    # A copy of numbers the progress events already carry: a folder the node cannot write (a read-only
    # run folder, an enclave's manifest without it) costs the curves, never the run.
    try:
        if writer is None:  # one writer per process, kept across role re-runs (a new one opens a new file)
            logdir = ctx.run_dir / "tensorboard" / ctx.node
            logdir.mkdir(parents=True, exist_ok=True)
            writer = ctx.cache["tensorboard"] = summary_ops_v2.create_file_writer_v2(str(logdir))
        scalar = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
        with writer.as_default():
            for name, value in sorted(metrics.items()):
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    summary_ops_v2.write(name, tf.constant(float(value), tf.float32), step=epoch,
                                         metadata=scalar)
        writer.flush()  # visible while the run lasts, and complete if the node is killed
    except (OSError, tf.errors.OpError) as e:
        ctx.cache["tensorboard"] = False
        log.warning("TensorBoard curves are not written (%s: %s); the metrics are in metrics.jsonl",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
