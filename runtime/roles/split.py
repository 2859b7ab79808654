"""Runs a vertical node's training steps from its plan: one kernel per task kind, applied to the step's
tasks in the order the plan lists them (fldsl.runtime.roles.split_schedule). Both roles use this loop; what
differs between the label owner and a feature holder, or between two pipelines, is only the task list.

- ``forward``: the node's segment (plan.model) on the batch. Every forward task of a step is one op of the
  same segment, so the first one computes them all. On the label owner the forward and the loss run inside
  the ``backward`` kernel instead, under the tape that differentiates them;
- ``send`` / ``recv``: one message per flow, keyed by the step (or the holdout batch), of the tensor the
  flow names: a cut tensor (an op output or a raw data field) or a gradient;
- ``backward``: the label owner differentiates the loss with respect to its weights and to the cut tensors
  the plan's ``wrt`` names (only those whose gradient goes back); a feature holder recomputes its forward
  under a tape and pulls the received gradients back through it;
- ``apply``: the optimiser on the weight gradients, where the task list puts it.

Pipelining (``train.pipeline``) is a property of the schedule: a node runs the tasks before its first
receive (``SplitSchedule.lead``) of step s+1 before the rest of step s, except before a checkpoint step (the
drain: a batch is in every node's checkpoint or in none). For a feature holder that is "send act(s+1), then
wait for grad(s)"; the label owner's step starts with a receive, so it runs unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fldsl.artifacts import Task
from fldsl.runtime.roles.common import (
    CheckpointWriter,
    Meter,
    PeerProtocolError,
    RoleContext,
    RoleError,
    epoch_batch,
    is_checkpoint_step,
)
from fldsl.runtime.roles.split_schedule import SplitSchedule, Wire
from fldsl.runtime.transport import keys


@dataclass
class StepState:
    """The values of one step (or one holdout batch) as its tasks produce them."""

    step: int
    key: int  # the message key: the step, or the holdout batch's evaluation key
    rows: int
    inputs: dict[str, np.ndarray]  # this node's data fields for the batch
    labels: np.ndarray | None = None
    out: dict[str, Any] | None = None  # forward outputs by op name
    cuts: dict[str, Any] = field(default_factory=dict)  # received cut tensors by name
    cut_grads: dict[str, Any] = field(default_factory=dict)  # received gradients, by the cut they are of
    grads_out: dict[str, Any] = field(default_factory=dict)  # gradients to send, by gradient tensor
    var_grads: Any = None
    loss: float | None = None
    done: int = 0  # step tasks run so far


def rows_of(peer: str, flow: str, what: str, got: Any, rows: int) -> Any:
    """``got``, a tensor the peer sent for ``rows`` rows. The flow's policy leaves the batch dimension free
    (``None``), so a peer could send another number of rows: refused here, naming it, instead of failing
    inside TensorFlow."""
    if got.ndim == 0 or got.shape[0] != rows:
        raise PeerProtocolError(f"{peer} sent {what} on flow {flow} as {got.dtype}{list(got.shape)}, but "
                                f"that batch has {rows} rows: refusing", flow=flow, peer=peer)
    return got


class SplitKernels:
    """The node's model, optimiser and compiled functions, and a kernel per task kind."""

    def __init__(self, ctx: RoleContext, writer: CheckpointWriter, sched: SplitSchedule, model: Any) -> None:
        import tensorflow as tf

        from fldsl.stdlib.tf import loss_fn, make_optimizer

        self.ctx, self.writer, self.sched, self.model = ctx, writer, sched, model
        plan = ctx.plan
        self.opt = make_optimizer(plan.train.optimizer) if sched.trains else None
        self.variables = list(model.trainable_variables)
        self.produced = set(model.outputs)
        self.meter = Meter()
        self.spe = 1  # steps per epoch, set by the loop (the checkpoint gate needs it)
        sent = [w.tensor for w in sched.cuts_out if w.tensor in self.produced]
        wrt_cuts = list(dict.fromkeys(sched.wrt.values()))
        variables, opt = self.variables, self.opt
        loss = loss_fn(plan.loss) if plan.loss is not None else None
        logits = plan.loss.logits if plan.loss is not None else ""

        @tf.function(reduce_retracing=True)
        def forward(inputs):
            out = model(inputs, training=True)
            return {n: out[n] for n in sent}

        @tf.function(reduce_retracing=True)
        def pull_back(inputs, out_grads, apply_now):
            # Recompute the forward under a tape (no randomness in the ops). Lock-step: the weights are those
            # of the forward whose tensors were sent, so the gradient is exact. Pipelined: they already
            # include the previous step's update (the documented one-step staleness).
            with tf.GradientTape() as tape:
                out = model(inputs, training=True)
                targets = [out[n] for n in out_grads]
            grads = tape.gradient(targets, variables, output_gradients=list(out_grads.values()))
            if apply_now:  # a Python bool: one trace with the update, one without
                assert opt is not None  # the schedule has an apply task only where the node trains
                opt.apply(grads, variables)
            return grads

        @tf.function(reduce_retracing=True)
        def loss_grads(inputs, cuts, labels):
            watched = [cuts[n] for n in wrt_cuts]
            assert loss is not None  # a loss task only where the plan has the loss
            with tf.GradientTape() as tape:
                tape.watch(watched)
                value = loss(model({**inputs, **cuts}, training=True)[logits], labels)
            grads = tape.gradient(value, [*variables, *watched])
            return value, grads[:len(variables)], dict(zip(wrt_cuts, grads[len(variables):], strict=True))

        @tf.function(reduce_retracing=True)
        def apply(grads):
            assert opt is not None  # the schedule has an apply task only where the node trains
            opt.apply(grads, variables)

        @tf.function(reduce_retracing=True)
        def predict(inputs, cuts):
            return model({**inputs, **cuts}, training=False)[logits]

        self.forward_fn, self.pull_back_fn, self.loss_grads_fn = forward, pull_back, loss_grads
        # An apply task right after the backward runs inside the backward's compiled call (one dispatch
        # instead of two per step); the order of the two is the plan's either way.
        kinds = [t.kind for t in sched.step]
        self.fused_apply = plan.loss is None and "backward" in kinds \
            and kinds[kinds.index("backward") + 1:][:1] == ["apply"]
        self.apply_fn, self.predict_fn = apply, predict
        self.kernels = {"forward": self.forward, "loss": self.loss, "send": self.send, "recv": self.recv,
                        "backward": self.backward, "apply": self.apply}

    @property
    def owns_loss(self) -> bool:
        return self.ctx.plan.loss is not None

    def run(self, st: StepState, tasks: tuple[Task, ...], upto: int) -> None:
        """Run ``tasks[st.done:upto]`` on ``st`` (compute is metered, waiting on a peer is not)."""
        while st.done < upto:
            task = tasks[st.done]
            if task.kind != "recv":
                self.meter.start()
            self.kernels[task.kind](task, st)
            if task.kind != "recv":
                self.meter.stop(0)
            st.done += 1

    # -- kernels ---------------------------------------------------------------------------------------------

    def forward(self, task: Task, st: StepState) -> None:
        if self.owns_loss:
            return  # computed under the backward kernel's tape (and by predict for the holdout)
        if st.out is None:
            st.out = self.forward_fn(st.inputs)

    def loss(self, task: Task, st: StepState) -> None:
        """Computed with the forward inside the backward kernel: the tape has to see both."""

    def send(self, task: Task, st: StepState) -> None:
        w = self.sched.wire(task)
        if w.flow.kind == "gradient":
            value = st.grads_out[w.tensor]
        elif w.tensor in self.produced:
            if st.out is None:
                raise RoleError(f"{self.ctx.node}: the plan sends `{w.tensor}` ({task.id}) before any "
                                "forward task computes it; recompile the pipeline")
            value = st.out[w.tensor]
        else:  # a raw data field the plan allows across
            value = st.inputs[w.tensor]
        if st.key == st.step and is_checkpoint_step(self.ctx.plan, st.step + 1, self.spe):
            self.writer.wait()  # the checkpoint gate: see CheckpointWriter
            if self.sched.lead == len(self.sched.step) and self.ctx.landed_steps:
                # Nothing comes back per step: wait for the peers' own landing of the last checkpoint.
                self.ctx.wait_landed(self.ctx.landed_steps[-1])
        self.ctx.links[w.peer].send(w.flow.id, st.key, np.asarray(value))

    def recv(self, task: Task, st: StepState) -> None:
        w = self.sched.wire(task)
        self.receive(w, st)

    def receive(self, w: Wire, st: StepState) -> None:
        link = self.ctx.links[w.peer]
        got = self.ctx.wait(lambda t: link.recv(w.flow.id, st.key, t), w.peer)
        what = f"{w.tensor} of " + (f"step {st.step}" if st.key == st.step else f"holdout batch {st.key}")
        got = rows_of(w.peer, w.flow.id, what, got, st.rows)
        if w.flow.kind == "gradient":
            st.cut_grads[self.sched.wrt[w.tensor]] = got
        else:
            st.cuts[w.tensor] = got

    def backward(self, task: Task, st: StepState) -> None:
        if self.owns_loss:
            value, st.var_grads, cut_grads = self.loss_grads_fn(st.inputs, st.cuts, st.labels)
            st.loss = float(value)
            st.grads_out = {g: cut_grads[c].numpy() for g, c in self.sched.wrt.items()}
        else:
            out_grads = {c: st.cut_grads[c] for c in dict.fromkeys(self.sched.wrt.values())}
            st.var_grads = self.pull_back_fn(st.inputs, out_grads, self.fused_apply)

    def apply(self, task: Task, st: StepState) -> None:
        if not self.fused_apply:
            self.apply_fn(st.var_grads)

    # -- holdout ---------------------------------------------------------------------------------------------

    def send_holdout(self, inputs: dict[str, np.ndarray], rows: int, epoch: int, k: int) -> None:
        """Send the cut tensors of holdout batch ``k``: the step's forward and cut sends, nothing else."""
        key = keys.eval_batch(epoch, k)
        st = StepState(step=-1, key=key, rows=rows, inputs=inputs)
        cut_sends = {w.task.id for w in self.sched.cuts_out}
        tasks = tuple(t for t in self.sched.step if t.kind == "forward" or t.id in cut_sends)
        self.run(st, tasks, len(tasks))

    def predict_holdout(self, inputs: dict[str, np.ndarray], rows: int, epoch: int, k: int) -> np.ndarray:
        st = StepState(step=-1, key=keys.eval_batch(epoch, k), rows=rows, inputs=inputs)
        for w in self.sched.cuts_in:
            self.receive(w, st)
        return self.predict_fn(st.inputs, st.cuts).numpy()


class SplitLoop:
    """The step loop: which step's tasks run when (lock-step or pipelined), progress events."""

    def __init__(self, kernels: SplitKernels, train_rows: np.ndarray,
                 batch_inputs: Any, labels: np.ndarray | None) -> None:
        self.k = kernels
        plan = kernels.ctx.plan
        self.train_rows, self.batch_inputs, self.labels = train_rows, batch_inputs, labels
        self.b = plan.train.batch_size
        self.spe = max(1, -(-len(train_rows) // self.b))
        self.total = self.spe * plan.train.epochs
        kernels.spe = self.spe
        self._last_emit = 0.0

    def begin(self, s: int) -> StepState:
        plan = self.k.ctx.plan
        e, j = divmod(s, self.spe)
        rows = self.train_rows[epoch_batch(len(self.train_rows), plan.train.seed, e, j, self.b)]
        self.k.ctx.last_step = max(self.k.ctx.last_step, s)
        labels = self.labels[rows] if self.labels is not None else None
        return StepState(step=s, key=s, rows=len(rows), inputs=self.batch_inputs(rows), labels=labels)

    def steps(self, start: int, after_step: Any) -> None:
        """Run steps ``start``..``total``; ``after_step(state)`` ends each (metrics, checkpoints)."""
        ctx, sched = self.k.ctx, self.k.sched
        ahead = ctx.plan.train.pipeline
        step, lead = sched.step, sched.lead
        pending: dict[int, StepState] = {}
        for s in range(start, self.total):
            ctx.check_stop()
            st = pending.pop(s, None) or self.begin(s)
            self.k.run(st, step, lead)
            if ahead and s + 1 < self.total and not is_checkpoint_step(ctx.plan, s + 1, self.spe):
                nxt = self.begin(s + 1)
                self.k.run(nxt, step, lead)
                pending[s + 1] = nxt
            self.k.run(st, step, len(step))
            self.k.meter.stop(st.rows)
            self.progress(st)
            after_step(st)

    def progress(self, st: StepState) -> None:
        now = time.monotonic()
        if now - self._last_emit > 0.25 or st.step + 1 == self.total:
            extra = {"train_loss": st.loss} if st.loss is not None else {}
            self.k.ctx.progress.emit("step", step=st.step + 1, total=self.total, **extra,
                                     examples_per_s=self.k.meter.rate)
            self._last_emit = now
