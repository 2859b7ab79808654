"""A hand-built vertical split-learning task graph, shaped like ``fldsl.api.task_graph`` output.

(A plain module, not conftest.py: other test folders have a conftest of their own.)
"""

from __future__ import annotations

import networkx as nx

from fldsl.artifacts import Flow, GraphEdge, GraphNode, TensorSpec

ACT = TensorSpec(shape=[None, 64], dtype="float32")
MEASUREMENTS = {"media.trainer": "0a1b2c3d4e5f" + "7" * 52, "shop.trainer": "fedcba987654" + "3" * 52}

FLOWS = [
    Flow(id="media.trainer->shop.trainer:act1", tensor="act1", kind="activation", src="media.trainer",
         dst="shop.trainer", spec=ACT, max_bytes=20000, rule="allow media -> shop: act1"),
    Flow(id="shop.trainer->media.trainer:grad(act1)", tensor="grad(act1)", kind="gradient",
         src="shop.trainer", dst="media.trainer", spec=ACT, max_bytes=20000,
         rule="allow shop -> media: grad(act1)"),
]


def _task(g: nx.DiGraph, node: str, kind: str, label: str) -> str:
    tid = f"{node}/{kind}:{label.split()[-1]}"
    task = GraphNode(id=tid, kind=kind, node=node, party=node.split(".")[0], label=label)
    g.add_node(tid, **task.model_dump())
    return tid


def _edge(g: nx.DiGraph, a: str, b: str, **kw: object) -> None:
    g.add_edge(a, b, **{k: v for k, v in GraphEdge(src=a, dst=b, **kw).model_dump().items()
                        if k not in ("src", "dst")})


def build_graph(reverse: bool = False) -> nx.DiGraph:
    """The demo's graph. ``reverse`` inserts the same nodes and edges in the opposite order."""
    g: nx.DiGraph = nx.DiGraph()
    m, s = "media.trainer", "shop.trainer"
    spec = [
        (m, "read", "read impressions"), (m, "forward", "forward act1"), (m, "send", "send act1"),
        (m, "recv", "recv grad_act1"), (m, "backward", "backward act1"),
        (s, "read", "read conversions"), (s, "recv", "recv act1"), (s, "forward", "forward logits"),
        (s, "loss", "loss softmax"), (s, "backward", "backward logits"), (s, "send", "send grad_act1"),
    ]
    for node, kind, label in (reversed(spec) if reverse else spec):
        _task(g, node, kind, label)
    act = {"tensor": "act1", "spec": ACT}
    edges: list[tuple[str, str, dict[str, object]]] = [
        (f"{m}/read:impressions", f"{m}/forward:act1", {}),
        (f"{m}/forward:act1", f"{m}/send:act1", {}),
        (f"{m}/send:act1", f"{s}/recv:act1", {"flow": FLOWS[0].id, **act}),
        (f"{s}/read:conversions", f"{s}/forward:logits", {}),
        (f"{s}/recv:act1", f"{s}/forward:logits", {}),
        (f"{s}/forward:logits", f"{s}/loss:softmax", {}),
        (f"{s}/loss:softmax", f"{s}/backward:logits", {}),
        (f"{s}/backward:logits", f"{s}/send:grad_act1", {}),
        (f"{s}/send:grad_act1", f"{m}/recv:grad_act1",
         {"flow": FLOWS[1].id, "tensor": "grad(act1)", "spec": ACT}),
        (f"{m}/recv:grad_act1", f"{m}/backward:act1", {}),
    ]
    for a, b, kw in (reversed(edges) if reverse else edges):
        _edge(g, a, b, **kw)  # type: ignore[arg-type]
    return g
