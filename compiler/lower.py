"""Lowering: checked IR -> per-node plans and policies, and the networkx task graph.

Each node gets an ordered task list (read, align, shard, forward, send, recv, loss, backward, apply,
aggregate, checkpoint, export, evaluate); the task graph is the union of every node's tasks, with edges for
values inside a node (by name) and one edge per cross-node flow from the sender's ``send`` task to the
receiver's ``recv`` task (carrying the flow id, tensor and spec).
"""

from __future__ import annotations

from typing import Any

import networkx as nx

from fldsl.artifacts import (
    AttestationRequirement,
    Flow,
    GraphEdge,
    GraphNode,
    LossSpec,
    PeerRef,
    Plan,
    Policy,
    Task,
)
from fldsl.compiler.ir import IRNode, Program

MAX_MESSAGE_BYTES = 4 * 1024 * 1024

# Who opens the connection between two nodes: the lower rank dials (clients dial servers).
_DIAL_RANK = {
    "vertical.passive": 0,
    "vertical.active": 1,
    "horizontal.worker": 0,
    "horizontal.server": 1,
    "distributed.chief": 0,
    "distributed.worker": 1,
    "distributed.server": 2,
}


class _Tasks:
    def __init__(self, node: str, flows: list[Flow]):
        self.node = node
        self.tasks: list[Task] = []
        self.flows = flows

    def add(
        self,
        kind: str,
        name: str,
        inputs: list[str] | None = None,
        outputs: list[str] | None = None,
        **params: Any,
    ) -> None:
        self.tasks.append(
            Task(
                id=f"{self.node}/{kind}:{name}",
                kind=kind,  # type: ignore[arg-type]
                inputs=inputs or [],
                outputs=outputs or [],
                params=params,
            )
        )

    def _name(self, f: Flow, peer: str) -> str:
        same = [
            g
            for g in self.flows
            if g.tensor == f.tensor
            and self.node in (g.src, g.dst)
            and (g.src == self.node) == (f.src == self.node)
        ]
        return f.tensor if len(same) == 1 else f"{f.tensor}@{peer}"

    def send(self, f: Flow, inputs: list[str]) -> None:
        self.add("send", self._name(f, f.dst), inputs, [], flow=f.id, to=f.dst)

    def recv(self, f: Flow, outputs: list[str], **params: Any) -> None:
        self.add("recv", self._name(f, f.src), [], outputs, flow=f.id, **{"from": f.src}, **params)


def _flows(
    p: Program,
    *,
    src: str | None = None,
    dst: str | None = None,
    tensor: str | None = None,
    kind: str | None = None,
) -> list[Flow]:
    return [
        f
        for f in p.flows
        if (src is None or f.src == src)
        and (dst is None or f.dst == dst)
        and (tensor is None or f.tensor == tensor)
        and (kind is None or f.kind == kind)
    ]


def _read(t: _Tasks, p: Program, n: IRNode) -> None:
    for ds in n.data:
        spec = next(d.spec for d in p.datasets if d.party == n.party and d.spec.name == ds)
        outs = [f"{ds}.ids", *(f"{ds}.{k}" for k in sorted(spec.fields))]
        t.add("read", ds, [], outs, reader=spec.reader)


def _forward(t: _Tasks, p: Program, n: IRNode) -> None:
    for op in p.ops:
        if op.output in n.ops:
            t.add("forward", op.output, list(op.inputs), [op.output], op=op.op)


def _finish(t: _Tasks, p: Program, n: IRNode, export: bool) -> None:
    every = p.train.checkpoint_every_steps
    t.add("checkpoint", "state", ["weights"], [], every_steps=every, sealed=p.trust.at_rest == "encrypted")
    if export:
        t.add("export", "model", ["weights"], [f"{n.id}/model"], sealed=p.trust.at_rest == "encrypted")


def _vertical(t: _Tasks, p: Program, n: IRNode) -> None:
    _read(t, p, n)
    al = p.alignment
    if al is not None:
        t.add(
            "align",
            al.method,
            [f"{d}.ids" for d in n.data],
            ["aligned_ids"],
            key=al.key,
            leader=al.parties[0],
        )
    active = n.role == "vertical.active"
    hold = _flows(p, tensor="holdout", src=n.id) if active else _flows(p, tensor="holdout", dst=n.id)
    for f in hold:
        (t.send(f, ["holdout"]) if active else t.recv(f, ["holdout"]))
    if active:
        for f in _flows(p, dst=n.id, kind="activation") + _flows(p, dst=n.id, kind="data"):
            t.recv(f, [f.tensor])
    _forward(t, p, n)
    has_weights = any(p.param_counts.get(o, 0) for o in n.ops)
    if not active:
        cuts = _flows(p, src=n.id, kind="activation") + _flows(p, src=n.id, kind="data")
        for f in cuts:
            t.send(f, [f.tensor])
        grads = _flows(p, dst=n.id, kind="gradient")
        for f in grads:
            t.recv(f, [f.tensor])
        # A part nothing flows back to (raw fields, untrained cuts) has no backward and no apply: it only
        # sends. ``wrt`` names, per received gradient, the cut tensor it is the gradient of.
        if grads and has_weights:
            wrt = _wrt(grads, cuts)
            t.add("backward", "bottom", [*wrt.values(), *wrt], ["grads"], wrt=wrt)
            t.add("apply", p.train.optimizer.name, ["grads"], ["weights"])
    else:
        loss = p.loss
        t.add("loss", loss.op, [loss.logits, loss.label], ["loss"])
        grads = _flows(p, src=n.id, kind="gradient")
        cuts = _flows(p, dst=n.id, kind="activation") + _flows(p, dst=n.id, kind="data")
        wrt = _wrt(grads, cuts)
        t.add("backward", "top", ["loss", *wrt.values()], ["grads", *wrt], wrt=wrt)
        # The gradients go back before this node applies its own update: the passive parties' backward
        # then overlaps the apply (the two touch disjoint weights, so the order does not change the math).
        for f in grads:
            t.send(f, [f.tensor])
        if has_weights:
            t.add("apply", p.train.optimizer.name, ["grads"], ["weights"])
    if active and (
        p.train.validation.fraction > 0 or "auc" in p.train.metrics or "accuracy" in p.train.metrics
    ):
        t.add(
            "evaluate",
            "holdout",
            ["loss"],
            ["metrics"],
            metrics=list(p.train.metrics),
            fraction=p.train.validation.fraction,
        )
    _finish(t, p, n, export=has_weights)


def _wrt(grads: list[Flow], cuts: list[Flow]) -> dict[str, str]:
    """gradient tensor -> the cut tensor it differentiates: the gradient flow of a cut runs the other way
    between the same two nodes and is named ``grad(<cut>)`` by fldsl.compiler.flows."""
    out = {}
    for g in grads:
        cut = next((f for f in cuts if (f.src, f.dst) == (g.dst, g.src) and g.tensor == f"grad({f.tensor})"),
                   None)
        if cut is None:
            raise ValueError(f"gradient flow {g.id} matches no cut tensor sent the other way")
        out[g.tensor] = cut.tensor
    return out


def _worker(t: _Tasks, p: Program, n: IRNode) -> None:
    agg = p.aggregation
    assert agg is not None
    if n.role == "distributed.worker":
        for f in _flows(p, dst=n.id, tensor="shard"):
            # The shard carries the chief's data set fields; the worker has no DataSpec of its own.
            fields = {k: v.model_dump(mode="json") for k, v in n.input_specs.items()}
            t.recv(f, sorted(n.input_specs), fields=fields)
    else:
        _read(t, p, n)
        _pooled_fit(t, p, n, agg.server)
    _forward(t, p, n)
    t.add("loss", p.loss.op, [p.loss.logits, p.loss.label], ["loss"])
    fedavg = agg.mode == "fedavg"
    t.add("backward", "model", ["loss"], ["gradients"])
    if fedavg:
        t.add(
            "apply",
            p.train.optimizer.name,
            ["gradients"],
            ["local_weights"],
            local=True,
            every_steps=agg.every_steps,
            every_epoch=agg.every_epoch,
        )
    for f in _flows(p, src=n.id, dst=agg.server, kind="weights" if fedavg else "gradients"):
        t.send(f, ["local_weights" if fedavg else "gradients"])
    for f in _flows(p, src=agg.server, dst=n.id, tensor="weights"):
        t.recv(f, ["weights"])
    test = p.train.validation.test_data
    if (test and test in n.data) or p.train.validation.fraction > 0:
        t.add(
            "evaluate",
            test or "holdout",
            ["weights"],
            ["metrics"],
            metrics=list(p.train.metrics),
            test_data=test,
            fraction=p.train.validation.fraction,
        )
    for f in _flows(p, src=n.id, tensor="metrics"):
        t.send(f, ["metrics"])
    _finish(t, p, n, export=False)


def _pooled_fit(t: _Tasks, p: Program, n: IRNode, server: str) -> None:
    """Horizontal preprocessing with pooled statistics (flows._stats_flows): send this worker's, receive
    the merge, fit. Nothing when the pipeline pools none."""
    up = _flows(p, src=n.id, dst=server, kind="stats")
    if not up:
        return
    features = f"{p.loss.label.split('.')[0]}.features"  # the training set's (the label's data set)
    t.send(up[0], [features])
    for f in _flows(p, src=server, dst=n.id, kind="stats"):
        t.recv(f, ["pooled_stats"])
    t.add("fit", "preprocessing", ["pooled_stats", features], [features], pooled=True)


def _server(t: _Tasks, p: Program, n: IRNode) -> None:
    agg = p.aggregation
    assert agg is not None
    stats = []
    for f in _flows(p, dst=n.id, kind="stats"):
        t.recv(f, [f"stats@{f.src}"])
        stats.append(f"stats@{f.src}")
    if stats:
        t.add("aggregate", "stats", stats, ["pooled_stats"], merge="count-mean-m2")
        for f in _flows(p, src=n.id, kind="stats"):
            t.send(f, ["pooled_stats"])
    up = "weights" if agg.mode == "fedavg" else "gradients"
    ins = []
    for f in _flows(p, dst=n.id, tensor=up):
        name = f"{up}@{f.src}"
        t.recv(f, [name])
        ins.append(name)
    t.add(
        "aggregate",
        agg.mode,
        ins,
        ["aggregated"],
        weighting=agg.weighting,
        workers=list(agg.workers),
        input_specs={k: v.model_dump(mode="json") for k, v in n.input_specs.items()},
    )
    if agg.mode == "sync":
        t.add("apply", p.train.optimizer.name, ["aggregated"], ["weights"])
    for f in _flows(p, src=n.id, tensor="weights"):
        t.send(f, ["weights" if agg.mode == "sync" else "aggregated"])
    for f in _flows(p, dst=n.id, tensor="metrics"):
        t.recv(f, [f"metrics@{f.src}"])
    _finish(t, p, n, export=True)


def _chief(t: _Tasks, p: Program, n: IRNode) -> None:
    sh = p.sharding
    assert sh is not None
    _read(t, p, n)
    t.add(
        "shard",
        sh.strategy,
        [f"{d}.{k}" for d in n.data for k in _fields(p, n, d)],
        [f"shard@{w}" for w in sh.workers],
        strategy=sh.strategy,
        workers=list(sh.workers),
    )
    for f in _flows(p, src=n.id, tensor="shard"):
        t.send(f, [f"shard@{f.dst}"])


def _fields(p: Program, n: IRNode, ds: str) -> list[str]:
    spec = next(d.spec for d in p.datasets if d.party == n.party and d.spec.name == ds)
    return sorted(spec.fields)


def node_tasks(p: Program, n: IRNode) -> list[Task]:
    t = _Tasks(n.id, p.flows)
    if n.role.startswith("vertical."):
        _vertical(t, p, n)
    elif n.role in ("horizontal.worker", "distributed.worker"):
        _worker(t, p, n)
    elif n.role.endswith(".server"):
        _server(t, p, n)
    else:
        _chief(t, p, n)
    return t.tasks


def peers_of(p: Program, n: IRNode) -> list[PeerRef]:
    role = {x.id: x.role for x in p.nodes}
    ids = sorted({f.dst for f in p.flows if f.src == n.id} | {f.src for f in p.flows if f.dst == n.id})
    out = []
    for other in ids:
        mine, theirs = _DIAL_RANK[n.role], _DIAL_RANK[role[other]]
        dial = mine < theirs or (mine == theirs and n.id < other)
        out.append(PeerRef(id=other, party=other.split(".")[0], dial=dial))
    return out


def exporting_parties(p: Program) -> dict[str, list[str]]:
    """party -> its nodes that export a model (the nodes an owner key applies to)."""
    out: dict[str, list[str]] = {}
    for n in p.nodes:
        if any(t.kind == "export" for t in node_tasks(p, n)):
            out.setdefault(n.party, []).append(n.id)
    return out


def plan_for(p: Program, n: IRNode) -> Plan:
    ops = [op.model_copy(update={"party": n.party}) for op in p.ops if op.output in n.ops]
    loss: LossSpec | None = p.loss.model_copy(update={"party": n.party}) if n.has_loss else None
    data = [d.spec for d in p.datasets if d.party == n.party and d.spec.name in n.data]
    exports = any(t.kind == "export" for t in node_tasks(p, n))
    return Plan(
        pipeline=p.pipeline,
        node=n.id,
        party=n.party,
        role=n.role,
        peers=peers_of(p, n),
        data=sorted(data, key=lambda d: d.name),
        alignment=p.alignment if n.role.startswith("vertical.") else None,
        model=ops,
        loss=loss,
        train=p.train,
        aggregation=p.aggregation
        if p.aggregation and (n.id == p.aggregation.server or n.id in p.aggregation.workers)
        else None,
        sharding=p.sharding
        if p.sharding and (n.id == p.sharding.chief or n.id in p.sharding.workers)
        else None,
        sends=sorted(f.id for f in p.flows if f.src == n.id),
        receives=sorted(f.id for f in p.flows if f.dst == n.id),
        tasks=node_tasks(p, n),
        export=f"{n.id}/model" if exports else None,
        export_recipient=p.owner_keys.get(n.party) if exports else None,
    )


def policy_for(p: Program, n: IRNode) -> Policy:
    flows = [f for f in p.flows if n.id in (f.src, f.dst)]
    return Policy(
        pipeline=p.pipeline,
        node=n.id,
        attestation=AttestationRequirement(mode=p.trust.attestation, allow_debug=p.trust.debug),
        accept_peers=sorted(({f.src for f in flows} | {f.dst for f in flows}) - {n.id}),
        flows=flows,
        max_message_bytes=MAX_MESSAGE_BYTES,
        at_rest=p.trust.at_rest,
    )


def task_graph(p: Program) -> nx.DiGraph:
    """Every node's tasks as graph nodes (attrs = GraphNode fields) and their dependencies as edges
    (attrs = GraphEdge fields; cross-node edges carry the flow)."""
    g = nx.DiGraph()
    send_of: dict[str, str] = {}
    recv_of: dict[str, str] = {}
    align_of: dict[str, str] = {}
    for n in p.nodes:
        produced: dict[str, str] = {}
        for task in node_tasks(p, n):
            label = task.id.split("/", 1)[1]
            g.add_node(
                task.id,
                **GraphNode(
                    id=task.id, kind=task.kind, node=n.id, party=n.party, label=label, params=task.params
                ).model_dump(mode="json"),
            )
            for name in task.inputs:
                src = produced.get(name)
                if src is not None and src != task.id:
                    g.add_edge(
                        src, task.id, **GraphEdge(src=src, dst=task.id, tensor=name).model_dump(mode="json")
                    )
            for name in task.outputs:
                produced[name] = task.id
            if task.kind == "send":
                send_of[task.params["flow"]] = task.id
            elif task.kind == "recv":
                recv_of[task.params["flow"]] = task.id
            elif task.kind == "align":
                align_of[n.id] = task.id
    for f in p.flows:
        s, d = send_of.get(f.id), recv_of.get(f.id)
        if f.kind == "psi":  # the PSI exchange runs inside the two align tasks
            s, d = align_of.get(f.src), align_of.get(f.dst)
        if s and d:
            g.add_edge(
                s,
                d,
                **GraphEdge(src=s, dst=d, flow=f.id, tensor=f.tensor, spec=f.spec).model_dump(mode="json"),
            )
    return g


def graph_lists(g: nx.DiGraph) -> tuple[list[GraphNode], list[GraphEdge]]:
    nodes = [GraphNode(**g.nodes[n]) for n in sorted(g.nodes)]
    edges = [GraphEdge(**g.edges[e]) for e in sorted(g.edges)]
    return nodes, edges
