"""A vertical node's training step as its plan lowers it (compiler/lower.py ``_vertical``): which tasks run
every step and in what order, and what each send and receive carries.

The roles execute this and nothing else: a cut tensor is sent because the plan has a ``send`` task for its
flow, a gradient goes back only where the plan has one, and the optimiser is applied where the ``apply`` task
stands in the list. Protocol messages (PSI, the holdout positions, control) are set-up, not step tasks.
Everything is checked against the node's policy here, before any data moves: a plan that names a flow its
policy does not allow, or a gradient of a tensor the node does not exchange, is refused (fail closed).
"""

from __future__ import annotations

from dataclasses import dataclass

from fldsl.artifacts import Flow, Plan, Policy, Task
from fldsl.runtime.roles.common import RoleError

# Flow kinds whose sends and receives happen once per training step (and per holdout batch for the cuts).
STEP_FLOW_KINDS = ("activation", "data", "gradient")
STEP_KINDS = ("forward", "send", "recv", "loss", "backward", "apply")


@dataclass(frozen=True)
class Wire:
    """One per-step ``send`` or ``recv`` task: the flow, the peer, and the tensor it carries."""

    task: Task
    flow: Flow
    peer: str

    @property
    def tensor(self) -> str:
        return self.flow.tensor


@dataclass(frozen=True)
class SplitSchedule:
    step: tuple[Task, ...]  # every training step runs these, in this order
    cuts_out: tuple[Wire, ...]  # cut tensors (activations, raw fields) this node sends
    cuts_in: tuple[Wire, ...]  # cut tensors this node receives (the label owner)
    grads_out: tuple[Wire, ...]  # gradients this node sends back
    grads_in: tuple[Wire, ...]  # gradients this node receives
    wrt: dict[str, str]  # gradient tensor -> the cut tensor it is the gradient of (the backward task's)
    evaluates: bool  # an ``evaluate`` task: holdout metrics at every epoch end
    exports: bool

    @property
    def trains(self) -> bool:
        return any(t.kind == "apply" for t in self.step)

    @property
    def lead(self) -> int:
        """How many step tasks come before the step's first receive: what a pipelined node may run for
        step s+1 before it finishes step s (a passive's forward and sends; nothing on the label owner)."""
        for k, t in enumerate(self.step):
            if t.kind == "recv":
                return k
        return len(self.step)

    def wire(self, task: Task) -> Wire:
        for w in (*self.cuts_out, *self.cuts_in, *self.grads_out, *self.grads_in):
            if w.task.id == task.id:
                return w
        raise RoleError(f"task {task.id} is not a send or receive of this step")


def _flow_of(plan: Plan, policy: Policy, task: Task) -> Flow:
    fid = task.params.get("flow")
    listed = plan.sends if task.kind == "send" else plan.receives
    flow = next((f for f in policy.flows if f.id == fid), None)
    if not isinstance(fid, str) or fid not in listed or flow is None:
        raise RoleError(f"{plan.node}: task {task.id} uses flow {fid!r}, which the plan does not list or the "
                        "policy does not allow; recompile the pipeline (`fldsl compile`)")
    mine = flow.src if task.kind == "send" else flow.dst
    if mine != plan.node:
        raise RoleError(f"{plan.node}: task {task.id} would {task.kind} on flow {fid}, which is not this "
                        "node's to " + task.kind)
    return flow


def _is_step(plan: Plan, policy: Policy, task: Task) -> bool:
    if task.kind not in STEP_KINDS:
        return False
    if task.kind in ("send", "recv"):
        return _flow_of(plan, policy, task).kind in STEP_FLOW_KINDS
    return True


def _wrt(plan: Plan, step: list[Task]) -> dict[str, str]:
    back = [t for t in step if t.kind == "backward"]
    if len(back) > 1:
        raise RoleError(f"{plan.node}: the plan has {len(back)} backward tasks in one step")
    raw = back[0].params.get("wrt", {}) if back else {}
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise RoleError(f"{plan.node}: the backward task's `wrt` is not a map of tensor names")
    return dict(raw)


def split_schedule(plan: Plan, policy: Policy) -> SplitSchedule:
    """The node's step from its plan's task list, checked against the policy (see the module doc)."""
    step = [t for t in plan.tasks if _is_step(plan, policy, t)]
    wires: dict[str, list[Wire]] = {"out": [], "in": [], "gout": [], "gin": []}
    for t in step:
        if t.kind not in ("send", "recv"):
            continue
        f = _flow_of(plan, policy, t)
        grad = f.kind == "gradient"
        where = ("gout" if grad else "out") if t.kind == "send" else ("gin" if grad else "in")
        wires[where].append(Wire(task=t, flow=f, peer=f.dst if t.kind == "send" else f.src))
    wrt = _wrt(plan, step)
    cuts = {w.tensor for w in (*wires["out"], *wires["in"])}
    for w in (*wires["gout"], *wires["gin"]):
        if wrt.get(w.tensor) not in cuts:
            raise RoleError(f"{plan.node}: the plan exchanges gradient `{w.tensor}` on {w.flow.id}, but its "
                            "backward task does not name a cut tensor this node exchanges for it")
    produced = {op.output for op in plan.model}
    first_forward = next((k for k, t in enumerate(step) if t.kind == "forward"), len(step))
    for w in wires["out"]:
        if w.tensor in produced and step.index(w.task) < first_forward:
            raise RoleError(f"{plan.node}: the plan sends `{w.tensor}` ({w.task.id}) before the forward "
                            "that computes it; recompile the pipeline")
    if wires["gin"] and not any(t.kind == "backward" for t in step):
        raise RoleError(f"{plan.node}: the plan receives gradients but has no backward task")
    return SplitSchedule(
        step=tuple(step),
        cuts_out=tuple(wires["out"]), cuts_in=tuple(wires["in"]),
        grads_out=tuple(wires["gout"]), grads_in=tuple(wires["gin"]),
        wrt=wrt,
        evaluates=any(t.kind == "evaluate" for t in plan.tasks),
        exports=any(t.kind == "export" for t in plan.tasks),
    )
