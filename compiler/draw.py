"""Drawing the task graph: Graphviz DOT, SVG (through ``dot``), Mermaid and a self-contained HTML page.

What the picture says is the trust structure: every party is a dashed cluster (a trust boundary), every node
of a party is an enclave sub-cluster labelled with its (short) measurement, the node's tasks sit inside it,
and the edges that cross enclaves are the flows, labelled with tensor, shape and the ``allow`` rule that
permits them. Flows the compiler refused (information-flow violations) are drawn in red.

Input is what the compiler produces (``fldsl.api.task_graph``: node attributes = ``artifacts.GraphNode``
fields, edge attributes = ``artifacts.GraphEdge`` fields) or what ``pipeline.json`` stores; both become a
:class:`Scene` first, so the three text formats show exactly the same thing. Output is deterministic: the
same graph gives the same bytes whatever order it was built in.
"""

from __future__ import annotations

import html
import shutil
import subprocess
from collections.abc import Iterable, Mapping

import networkx as nx
from pydantic import BaseModel, Field

from fldsl.artifacts import Flow, GraphEdge, GraphNode, PipelineFile, TensorSpec

FORMATS = ("dot", "svg", "mermaid", "html")
RED = "#d62728"
_SHAPES = {
    "read": "cylinder", "align": "hexagon", "shard": "trapezium", "send": "rarrow", "recv": "larrow",
    "loss": "octagon", "aggregate": "invtrapezium", "checkpoint": "folder", "export": "folder",
    "evaluate": "note",
}


class DrawError(Exception):
    """A drawing could not be produced; the message is meant for the user."""


class GraphvizMissing(DrawError):
    """Graphviz ``dot`` is not installed (the CLI exits 4)."""


class Violation(BaseModel):
    """A flow the compiler refused: drawn as a red edge between the two enclaves."""

    src: str  # node id "party.node"
    dst: str
    tensor: str
    message: str


class Enclave(BaseModel):
    id: str
    party: str
    measurement: str | None = None
    kind: str = "simulated"
    tasks: list[GraphNode] = Field(default_factory=list)

    def caption(self) -> str:
        if not self.measurement:
            return f"enclave {self.id}"
        return f"enclave {self.id}\nmr {short_measurement(self.measurement, self.kind)}"


class SceneEdge(BaseModel):
    src: str  # task id
    dst: str
    crossing: bool  # between two enclaves: a flow
    tensor: str | None = None
    spec: TensorSpec | None = None
    rule: str | None = None
    violation: str | None = None  # set when the compiler refused this flow

    def label_lines(self) -> list[str]:
        """Everything the edge says (the Mermaid source, which has no tooltips)."""
        if not self.crossing:
            return [self.tensor] if self.tensor else []
        lines = [x for x in (self.tensor, format_spec(self.spec)) if x]
        if self.violation:
            lines.append(f"VIOLATION: {self.violation}")
        elif self.rule:
            lines.append(self.rule)
        return lines

    def short_lines(self) -> list[str]:
        """What the edge says on the drawn picture: short. The rule that allows a flow is detail on demand
        (:meth:`tooltip`, and the flows table of the HTML page); a violation is always spelled out."""
        if not self.crossing:  # inside an enclave the task names say it; the tensor is in the tooltip
            return []
        lines = [x for x in (self.tensor, format_spec(self.spec)) if x]
        if self.violation:
            lines.append(f"VIOLATION: {self.violation}")
        return lines

    def tooltip(self) -> str:
        lines = [x for x in (self.tensor, format_spec(self.spec)) if x]
        if self.violation:
            lines.append(f"VIOLATION: {self.violation}")
        elif self.rule:
            lines.append(f"allowed by: {self.rule}")
        return "\n".join(lines)


class Scene(BaseModel):
    """Everything a drawing shows, ordered deterministically."""

    title: str
    parties: dict[str, list[Enclave]]  # party -> its enclaves (both sorted by name)
    edges: list[SceneEdge]
    loose: list[Violation]  # violations with no task edge to colour: drawn enclave to enclave
    violations: list[Violation]


def short_measurement(hex_value: str, kind: str = "simulated") -> str:
    return hex_value[:12] + (" (sim)" if kind == "simulated" else "")


def format_spec(spec: TensorSpec | None) -> str | None:
    return None if spec is None else spec.text(compact=True)


def _party_of(node_id: str) -> str:
    return node_id.split(".", 1)[0]


def _task_order(graph: nx.DiGraph) -> dict[str, int]:
    try:
        order = list(nx.lexicographical_topological_sort(graph, key=str))
    except nx.NetworkXUnfeasible:  # a cyclic (invalid) graph is still drawn, in name order
        order = sorted(graph.nodes, key=str)
    return {str(n): i for i, n in enumerate(order)}


def build_scene(
    graph: nx.DiGraph,
    flows: Iterable[Flow] = (),
    measurements: Mapping[str, str] | None = None,
    measurement_kinds: Mapping[str, str] | None = None,
    violations: Iterable[Violation] = (),
    title: str = "pipeline",
) -> Scene:
    """Normalise a task graph (attributes as ``GraphNode`` / ``GraphEdge``) into a :class:`Scene`."""
    flows_by_id = {f.id: f for f in flows}
    measurements = measurements or {}
    kinds = measurement_kinds or {}
    order = _task_order(graph)

    enclaves: dict[str, Enclave] = {}

    def enclave(node_id: str, party: str | None = None) -> Enclave:
        if node_id not in enclaves:
            enclaves[node_id] = Enclave(
                id=node_id, party=party or _party_of(node_id), measurement=measurements.get(node_id),
                kind=kinds.get(node_id, "simulated"),
            )
        return enclaves[node_id]

    task_node: dict[str, str] = {}
    for tid in sorted(graph.nodes, key=lambda t: order[str(t)]):
        # Unknown attributes (tools may decorate the graph) are ignored rather than refused.
        attrs = {k: v for k, v in graph.nodes[tid].items() if k in GraphNode.model_fields}
        attrs.setdefault("id", str(tid))
        attrs.setdefault("node", "?")
        attrs.setdefault("party", _party_of(attrs["node"]))
        attrs.setdefault("kind", "task")
        attrs.setdefault("label", str(tid))
        try:
            task = GraphNode.model_validate(attrs)
        except ValueError as e:
            raise DrawError(f"task {tid!r} of the graph has malformed attributes: {e}") from e
        enclave(task.node, task.party).tasks.append(task)
        task_node[task.id] = task.node
    for node_id in measurements:
        enclave(node_id)

    pending = sorted(violations, key=lambda v: (v.src, v.dst, v.tensor, v.message))
    edges: list[SceneEdge] = []
    for u, v in sorted(graph.edges, key=lambda e: (order[str(e[0])], order[str(e[1])])):
        known = {k: x for k, x in graph.edges[u, v].items() if k in GraphEdge.model_fields}
        try:
            data = GraphEdge.model_validate({**known, "src": str(u), "dst": str(v)})
        except ValueError as e:
            raise DrawError(f"edge {u!r} -> {v!r} of the graph has malformed attributes: {e}") from e
        flow = flows_by_id.get(data.flow) if data.flow else None
        crossing = task_node.get(data.src) != task_node.get(data.dst)
        edge = SceneEdge(
            src=data.src, dst=data.dst, crossing=crossing,
            tensor=data.tensor or (flow.tensor if flow else None),
            spec=data.spec or (flow.spec if flow else None),
            rule=flow.rule if flow else None,
        )
        if crossing:
            hit = [x for x in pending if (x.src, x.dst, x.tensor)
                   == (task_node.get(data.src), task_node.get(data.dst), edge.tensor)]
            if hit:
                edge.violation = "; ".join(x.message for x in hit)
                pending = [x for x in pending if x not in hit]
        edges.append(edge)
    for x in pending:
        enclave(x.src)
        enclave(x.dst)

    parties: dict[str, list[Enclave]] = {}
    for encl in sorted(enclaves.values(), key=lambda en: (en.party, en.id)):
        parties.setdefault(encl.party, []).append(encl)
    return Scene(title=title, parties=parties, edges=edges, loose=pending,
                 violations=sorted(violations, key=lambda v: (v.src, v.dst, v.tensor, v.message)))


def scene_from_pipeline(pf: PipelineFile, violations: Iterable[Violation] = ()) -> Scene:
    """The scene of a compiled pipeline (``pipeline.json``): graph, flows and measurements."""
    g: nx.DiGraph = nx.DiGraph()
    for n in pf.graph_nodes:
        g.add_node(n.id, **n.model_dump())
    for e in pf.graph_edges:
        g.add_edge(e.src, e.dst, **{k: v for k, v in e.model_dump().items() if k not in ("src", "dst")})
    for n in g.nodes:  # edges may name tasks the node list lacks (a hand-edited file); keep them drawable
        g.nodes[n].setdefault("id", n)
    return build_scene(
        g, pf.flows,
        measurements={n.id: n.measurement for n in pf.nodes},
        measurement_kinds={n.id: n.measurement_kind for n in pf.nodes},
        violations=violations, title=pf.pipeline,
    )


# ---------------------------------------------------------------------------------------------------------
# DOT
# ---------------------------------------------------------------------------------------------------------


def _q(text: str) -> str:
    """A DOT double-quoted string; newlines become centred line breaks."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(scene: Scene) -> str:
    lines = [
        f"digraph {_q(scene.title)} {{",
        # Top to bottom: parties stand side by side and a node's task chain runs down its column, so a
        # two-party pipeline fits a laptop screen (left to right, the demo was 3,488 pt wide and no party name
        # was on screen). Cluster labels sit at their top left, where the eye starts.
        '  graph [rankdir=TB, compound=true, newrank=true, nodesep=0.25, ranksep=0.25, fontname="Helvetica", '
        "fontsize=12, labelloc=t, labeljust=l, "
        + f"label={_q(_title(scene))}{', fontcolor=' + _q(RED) if scene.violations else ''}];",
        '  node [shape=box, style="rounded,filled", fillcolor="#ffffff", fontname="Helvetica", fontsize=10, '
        'height=0.3, margin="0.08,0.03"];',
        '  edge [fontname="Helvetica", fontsize=9];',
    ]
    cluster_of: dict[str, str] = {}
    anchors = {x.src for x in scene.loose} | {x.dst for x in scene.loose}
    for pi, (party, encl) in enumerate(scene.parties.items()):
        lines.append(f"  subgraph cluster_p{pi} {{")
        lines.append(f'    label={_q("party " + party)}; style="dashed,rounded"; color="#555555"; '
                     'fontcolor="#222222"; fontsize=12;')
        for ni, e in enumerate(encl):
            name = f"cluster_p{pi}_n{ni}"
            cluster_of[e.id] = name
            lines.append(f"    subgraph {name} {{")
            lines.append(f'      label={_q(e.caption())}; style="filled,rounded"; fillcolor="#eef3fb"; '
                         'color="#3a6ea5"; fontcolor="#222222"; fontsize=10;')
            if e.id in anchors:
                lines.append(f'      {_q("enclave:" + e.id)} [shape=point, style=invis, width=0.01];')
            if not e.tasks and e.id not in anchors:  # Graphviz does not draw an empty cluster
                lines.append(f'      {_q("enclave:" + e.id)} [label="(no tasks)", shape=plaintext];')
            for t in e.tasks:
                shape = _SHAPES.get(t.kind, "box")
                lines.append(f"      {_q(t.id)} [label={_q(t.label)}, shape={shape}];")
            lines.append("    }")
        lines.append("  }")
    for edge in scene.edges:
        attrs = []
        label = "\n".join(edge.short_lines())
        if label:
            attrs.append(f"label={_q(label)}")
        tip = edge.tooltip()  # hovering an edge in the SVG / HTML view: the tensor, and the rule of a flow
        if tip:
            attrs.append(f"tooltip={_q(tip)}")
        if edge.violation:
            attrs.append(f'color="{RED}", fontcolor="{RED}", penwidth=2.5, style=bold')
        elif edge.crossing:
            attrs.append('color="#1f4e9c", penwidth=1.8')
        else:
            attrs.append('color="#777777"')
        lines.append(f"  {_q(edge.src)} -> {_q(edge.dst)} [{', '.join(attrs)}];")
    for x in scene.loose:
        label = f"{x.tensor}\nVIOLATION: {x.message}"
        lines.append(
            f"  {_q('enclave:' + x.src)} -> {_q('enclave:' + x.dst)} [label={_q(label)}, color=\"{RED}\", "
            f"fontcolor=\"{RED}\", penwidth=2.5, style=dashed, ltail={cluster_of[x.src]}, "
            f"lhead={cluster_of[x.dst]}];"
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


def _title(scene: Scene) -> str:
    n = len(scene.violations)
    if not n:
        return f"pipeline {scene.title}"
    return f"pipeline {scene.title}: {n} flow violation{'s' if n != 1 else ''} (red)"


# ---------------------------------------------------------------------------------------------------------
# Mermaid
# ---------------------------------------------------------------------------------------------------------


def _mq(text: str) -> str:
    """A Mermaid quoted label (entity codes for characters Mermaid would parse)."""
    out = (text.replace("&", "#amp;").replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")
           .replace("\n", "<br/>"))
    return f'"{out}"'


def to_mermaid(scene: Scene) -> str:
    # Front matter is YAML: the title is quoted (it contains ": " when there are violations).
    title = _title(scene).replace("\\", "\\\\").replace('"', '\\"')
    lines = ["---", f'title: "{title}"', "---", "flowchart LR"]
    ids: dict[str, str] = {}
    enclave_ids: dict[str, str] = {}
    for pi, (party, encl) in enumerate(scene.parties.items()):
        lines.append(f"  subgraph P{pi}[{_mq('party ' + party)}]")
        for ni, e in enumerate(encl):
            sid = f"P{pi}N{ni}"
            enclave_ids[e.id] = sid
            lines.append(f"    subgraph {sid}[{_mq(e.caption())}]")
            for t in e.tasks:
                tid = f"T{len(ids)}"
                ids[t.id] = tid
                lines.append(f"      {tid}[{_mq(t.label)}]")
            lines.append("    end")
            lines.append(f"    style {sid} fill:#eef3fb,stroke:#3a6ea5")
        lines.append("  end")
        lines.append(f"  style P{pi} fill:#fafafa,stroke:#555,stroke-dasharray:5 5")
    red: list[int] = []
    blue: list[int] = []
    n = 0
    for edge in scene.edges:
        label = "\n".join(edge.label_lines())
        arrow = f"-- {_mq(label)} -->" if label else "-->"
        lines.append(f"  {ids[edge.src]} {arrow} {ids[edge.dst]}")
        (red if edge.violation else blue if edge.crossing else []).append(n)
        n += 1
    for x in scene.loose:
        lines.append(f"  {enclave_ids[x.src]} -. {_mq(x.tensor + chr(10) + 'VIOLATION: ' + x.message)} .-> "
                     f"{enclave_ids[x.dst]}")
        red.append(n)
        n += 1
    if blue:
        lines.append(f"  linkStyle {','.join(map(str, blue))} stroke:#1f4e9c,stroke-width:2px")
    if red:
        lines.append(f"  linkStyle {','.join(map(str, red))} stroke:{RED},stroke-width:3px,color:{RED}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# SVG and HTML
# ---------------------------------------------------------------------------------------------------------


def dot_available() -> bool:
    return shutil.which("dot") is not None


def to_svg(dot_source: str, timeout_s: float = 60.0) -> str:
    """Run Graphviz ``dot -Tsvg``; raises :class:`GraphvizMissing` when it is not installed."""
    exe = shutil.which("dot")
    if exe is None:
        raise GraphvizMissing(
            "Graphviz `dot` is not installed, so no SVG can be drawn. Install it (Debian/Ubuntu: "
            "`apt-get install graphviz`) or use `--format dot`, `--format mermaid` or `--format html`."
        )
    try:
        proc = subprocess.run([exe, "-Tsvg"], input=dot_source, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as e:
        raise DrawError(f"Graphviz `dot` did not finish within {timeout_s:.0f} s") from e
    if proc.returncode != 0:
        raise DrawError(f"Graphviz `dot` failed: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc.stdout


def to_html(scene: Scene, svg: str | None = None) -> str:
    """A self-contained page (no network): the SVG inline, else the Mermaid source with a note."""
    e = html.escape
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>fldsl: {e(scene.title)}</title>",
        "<style>body{font-family:Helvetica,Arial,sans-serif;margin:2em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:left;font-size:13px}th{background:#f3f3f3}code{font-size:12px}"
        ".graph svg{max-width:100%;max-height:94vh;width:auto;height:auto}"
        f".violation{{color:{RED};font-weight:bold}}pre{{background:#f6f8fa;padding:1em;overflow:auto}}"
        ".note{background:#fff8e1;border:1px solid #f0c36d;padding:.5em 1em}</style>",
        "</head><body>",
        f"<h1>{e(_title(scene))}</h1>",
    ]
    if svg is not None:
        start = svg.find("<svg")
        parts.append('<div class="graph">' + (svg[start:] if start >= 0 else svg) + "</div>")
    else:
        parts.append(
            '<p class="note">Graphviz <code>dot</code> was not found, so this page shows the Mermaid source '
            "of the graph (rendering Mermaid needs a script this offline page does not load). Paste it into "
            "a Mermaid viewer, or install Graphviz and run <code>fldsl graph --format html</code> again.</p>"
        )
        parts.append(f'<pre class="mermaid">{e(to_mermaid(scene))}</pre>')
    if scene.violations:
        parts.append("<h2>Violations</h2><table><tr><th>from</th><th>to</th><th>tensor</th><th>why</th></tr>")
        for x in scene.violations:
            parts.append(f'<tr class="violation"><td>{e(x.src)}</td><td>{e(x.dst)}</td><td>{e(x.tensor)}</td>'
                         f"<td>{e(x.message)}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Enclaves</h2><table><tr><th>party</th><th>node</th><th>measurement</th>"
                 "<th>tasks</th></tr>")
    for party, encl in scene.parties.items():
        for en in encl:
            mr = (f"<code>{e(en.measurement)}</code>{' (simulated)' if en.kind == 'simulated' else ''}"
                  if en.measurement else "")
            parts.append(f"<tr><td>{e(party)}</td><td>{e(en.id)}</td><td>{mr}</td><td>{len(en.tasks)}</td></tr>")
    parts.append("</table>")
    crossing = [x for x in scene.edges if x.crossing]
    if crossing:
        parts.append("<h2>Flows</h2><table><tr><th>tensor</th><th>from</th><th>to</th><th>type</th>"
                     "<th>allowed by</th></tr>")
        for edge in crossing:
            cls = ' class="violation"' if edge.violation else ""
            rule = f"VIOLATION: {edge.violation}" if edge.violation else (edge.rule or "")
            parts.append(f"<tr{cls}><td>{e(edge.tensor or '')}</td><td>{e(edge.src)}</td>"
                         f"<td>{e(edge.dst)}</td><td>{e(format_spec(edge.spec) or '')}</td>"
                         f"<td>{e(rule)}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def render(scene: Scene, fmt: str) -> str:
    """The scene in one of :data:`FORMATS` (``html`` embeds the SVG when ``dot`` is installed)."""
    if fmt == "dot":
        return to_dot(scene)
    if fmt == "mermaid":
        return to_mermaid(scene)
    if fmt == "svg":
        return to_svg(to_dot(scene))
    if fmt == "html":
        return to_html(scene, to_svg(to_dot(scene)) if dot_available() else None)
    raise DrawError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
