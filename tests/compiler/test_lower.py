"""Lowering: roles, plans, policies, flows and the task graph of the three scenarios."""

from __future__ import annotations

from pathlib import Path

import networkx as nx

from fldsl.api import check, check_source, task_graph
from fldsl.artifacts import GraphEdge, GraphNode
from fldsl.compiler import lower

from ._base import BASE, mutate

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"


def test_vertical_plans() -> None:
    p = check_source(BASE, "demo.flp")
    roles = {n.id: n.role for n in p.nodes}
    assert roles == {"media.trainer": "vertical.passive", "shop.trainer": "vertical.active"}
    assert p.alignment is not None
    assert (p.alignment.method, p.alignment.key, p.alignment.parties) == (
        "psi_ecdh",
        "example_id",
        ["shop.trainer", "media.trainer"],
    )
    media = lower.plan_for(p, p.node("media.trainer"))
    shop = lower.plan_for(p, p.node("shop.trainer"))
    assert [op.output for op in media.model] == ["act1/embed", "act1"]
    assert [op.output for op in shop.model] == ["act2/embed", "act2", "logits/concat", "logits"]
    assert media.loss is None and shop.loss is not None and shop.loss.label == "conversions.label"
    assert [d.name for d in media.data] == ["impressions"] and [d.name for d in shop.data] == ["conversions"]
    assert media.peers[0].id == "shop.trainer" and media.peers[0].dial and not shop.peers[0].dial
    kinds = [t.kind for t in media.tasks]
    assert kinds.index("forward") < kinds.index("send") < kinds.index("recv", kinds.index("send"))
    assert kinds[-2:] == ["checkpoint", "export"]
    assert media.export == "media.trainer/model"
    assert "media.trainer->shop.trainer:act1" in media.sends
    assert "shop.trainer->media.trainer:grad(act1)" in media.receives
    policy = lower.policy_for(p, p.node("media.trainer"))
    assert policy.accept_peers == ["shop.trainer"]
    assert policy.attestation.mode == "sim" and policy.max_message_bytes == 4 * 1024 * 1024
    assert {f.id for f in policy.flows} == set(media.sends) | set(media.receives)


def test_vertical_embed_shape_and_param_counts() -> None:
    p = check_source(BASE, "demo.flp")
    ops = {op.output: op for op in p.ops}
    assert ops["act1/embed"].spec.shape == [None, 8 * 4]
    assert p.param_counts["act1/embed"] == 8 * 101 * 4
    assert p.param_counts["act1"] == 32 * 16 + 16
    assert ops["logits/concat"].spec.shape == [None, 32]
    assert p.param_counts["logits"] == (32 * 8 + 8) + (8 * 2 + 2)


def test_task_graph_attrs_and_flow_edges() -> None:
    p = check_source(BASE, "demo.flp")
    g = task_graph(p)
    assert isinstance(g, nx.DiGraph)
    for n, attrs in g.nodes(data=True):
        GraphNode(**attrs)
        assert attrs["id"] == n and attrs["node"] in ("media.trainer", "shop.trainer")
    flow_edges = {}
    for s, d, attrs in g.edges(data=True):
        e = GraphEdge(**attrs)
        if e.flow:
            flow_edges[e.flow] = (s, d)
    assert flow_edges["media.trainer->shop.trainer:act1"] == (
        "media.trainer/send:act1",
        "shop.trainer/recv:act1",
    )
    assert flow_edges["shop.trainer->media.trainer:grad(act1)"] == (
        "shop.trainer/send:grad(act1)",
        "media.trainer/recv:grad(act1)",
    )
    # Within a node, values connect producer and consumer tasks.
    assert g.has_edge("shop.trainer/recv:act1", "shop.trainer/forward:logits/concat")
    assert g.has_edge("shop.trainer/loss:softmax_cross_entropy", "shop.trainer/backward:top")


def test_horizontal_sync_and_fedavg(tmp_path: Path) -> None:
    p = check(PIPELINES / "horizontal_dlrm.flp")
    assert p.aggregation is not None and p.aggregation.mode == "sync"
    assert p.aggregation.workers == [f"bank{i}.worker" for i in range(1, 5)]
    ups = [f for f in p.flows if f.tensor == "gradients"]
    assert len(ups) == 4 and all(f.dst == "hub.ps" for f in ups)
    total = sum(p.param_counts.values())
    assert ups[0].max_bytes >= 4 * total
    worker = lower.plan_for(p, p.node("bank2.worker"))
    assert worker.data[0].params["part"] == 1 and worker.data[0].params["parts"] == 4
    assert worker.loss is not None and worker.loss.party == "bank2"
    server = lower.plan_for(p, p.node("hub.ps"))
    assert server.data == [] and server.export == "hub.ps/model"
    assert [t.kind for t in server.tasks].count("recv") == 8  # gradients + metrics from 4 workers

    src = (PIPELINES / "horizontal_dlrm.flp").read_text().replace("every step", "every 10 steps with mean")
    f = tmp_path / "fedavg.flp"
    f.write_text(src.replace("allow bank -> hub: gradients", "allow bank -> hub: weights"))
    q = check(f)
    assert q.aggregation is not None
    assert (q.aggregation.mode, q.aggregation.every_steps, q.aggregation.weighting) == ("fedavg", 10, "mean")
    assert {fl.tensor for fl in q.flows if fl.dst == "hub.ps"} == {"weights", "control", "metrics"}


def test_distributed_roles_and_shards() -> None:
    p = check(PIPELINES / "distributed_dlrm.flp")
    roles = {n.id: n.role for n in p.nodes}
    assert roles == {
        "owner.chief": "distributed.chief",
        "cloud.worker1": "distributed.worker",
        "cloud.worker2": "distributed.worker",
        "cloud.ps": "distributed.server",
    }
    assert p.sharding is not None and p.sharding.strategy == "round_robin"
    shards = [f for f in p.flows if f.tensor == "shard"]
    assert [(f.src, f.dst, f.kind) for f in shards] == [
        ("owner.chief", "cloud.worker1", "data"),
        ("owner.chief", "cloud.worker2", "data"),
    ]
    # 1000 rows per worker of 13 float32 + 26 int64 + label int64 (+ id allowance).
    assert shards[0].max_bytes >= 1000 * (13 * 4 + 26 * 8 + 8)
    intra = [f for f in p.flows if f.tensor == "gradients"]
    assert all(f.rule == "(intra-party cloud)" for f in intra)
    chief = lower.plan_for(p, p.node("owner.chief"))
    assert chief.model == [] and [t.kind for t in chief.tasks] == ["read", "shard", "send", "send"]
    worker = lower.plan_for(p, p.node("cloud.worker1"))
    recv = worker.tasks[0]
    assert recv.kind == "recv" and set(recv.params["fields"]) == {
        "clicks.dense",
        "clicks.label",
        "clicks.sparse",
    }


def test_partition_rule_errors() -> None:
    from fldsl.diagnostics import FldslError

    def first_error(src: str) -> str:
        try:
            check_source(src, "x.flp")
        except FldslError as e:
            return e.errors[0].message
        raise AssertionError("no error")

    two_nodes = mutate(
        "  node trainer\n  data impressions", "  node trainer\n  node extra\n  data impressions"
    )
    assert first_error(two_nodes) == (
        "party `media` runs one node in a vertical pipeline; it declares 2 (trainer, extra)"
    )
    idle = mutate("partition vertical", "party idle { node n }\n\npartition vertical")
    assert first_error(idle) == "party `idle` takes no part in the model"
    horizontal = (PIPELINES / "horizontal_dlrm.flp").read_text()
    at_in_h = horizontal.replace("  logits = dlrm(", "  at bank1: logits = dlrm(")
    assert (
        first_error(at_in_h)
        == "in a horizontal pipeline every worker runs the whole model; remove `at bank1:`"
    )
    srv_is_worker = horizontal.replace("aggregate at hub.ps", "aggregate at bank1.worker")
    assert first_error(srv_is_worker) == "the aggregator `bank1.worker` must not be one of the workers"
