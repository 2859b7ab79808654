"""compiler/draw.py on a hand-built vertical graph: clusters, flow labels, red violations, determinism."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from drawfixture import FLOWS, MEASUREMENTS, build_graph

from fldsl.compiler import draw
from fldsl.compiler.draw import Violation, build_scene, render, to_dot, to_mermaid

needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="Graphviz `dot` is not installed (apt-get install graphviz)")

@pytest.fixture
def graph():
    return build_graph()


LABEL_LEAK = Violation(src="shop.trainer", dst="media.trainer", tensor="labels",
                       message="shop.conversions.label -> media (no allow rule)")


def _scene(graph, violations=()):
    return build_scene(graph, FLOWS, MEASUREMENTS, violations=violations, title="vertical_demo")


def test_dot_has_party_and_enclave_clusters_with_measurements(graph):
    dot = to_dot(_scene(graph))
    assert dot.startswith('digraph "vertical_demo" {')
    assert re.search(r'subgraph cluster_p0 \{\n    label="party media"', dot)
    assert re.search(r'subgraph cluster_p1 \{\n    label="party shop"', dot)
    assert 'label="enclave media.trainer\\nmr 0a1b2c3d4e5f (sim)"' in dot
    assert 'label="enclave shop.trainer\\nmr fedcba987654 (sim)"' in dot
    # Tasks sit inside their enclave's cluster.
    media = dot.split("subgraph cluster_p0_n0 {")[1].split("}")[0]
    assert '"media.trainer/forward:act1"' in media and "shop.trainer/" not in media


def test_dot_labels_cross_enclave_flows_with_tensor_and_shape_and_the_rule_on_hover(graph):
    dot = to_dot(_scene(graph))
    assert ('"media.trainer/send:act1" -> "shop.trainer/recv:act1" [label="act1\\nfloat32[B,64]", '
            'tooltip="act1\\nfloat32[B,64]\\nallowed by: allow media -> shop: act1"') in dot
    assert ('label="grad(act1)\\nfloat32[B,64]", '
            'tooltip="grad(act1)\\nfloat32[B,64]\\nallowed by: allow shop -> media: grad(act1)"') in dot
    assert draw.RED not in dot  # no violations, nothing red


def test_loose_violation_is_a_red_edge_between_enclave_clusters(graph):
    dot = to_dot(_scene(graph, [LABEL_LEAK]))
    anchor = '"enclave:shop.trainer" -> "enclave:media.trainer"'
    edge = next(line for line in dot.splitlines() if anchor in line)
    assert f'color="{draw.RED}"' in edge
    assert "VIOLATION: shop.conversions.label -> media (no allow rule)" in edge
    assert "ltail=cluster_p1_n0" in edge and "lhead=cluster_p0_n0" in edge
    assert "1 flow violation (red)" in dot


def test_violation_on_an_existing_flow_colours_that_edge(graph):
    v = Violation(src="media.trainer", dst="shop.trainer", tensor="act1", message="declared float32[B,32]")
    dot = to_dot(_scene(graph, [v]))
    edge = next(line for line in dot.splitlines() if '"media.trainer/send:act1" ->' in line)
    assert f'color="{draw.RED}"' in edge and "VIOLATION: declared float32[B,32]" in edge
    assert "allow media -> shop" not in edge
    assert '"enclave:' not in dot  # no extra anchor edge


def test_violation_for_an_enclave_missing_from_the_graph_still_draws(graph):
    v = Violation(src="bank.ps", dst="media.trainer", tensor="weights", message="no allow rule")
    dot = to_dot(_scene(graph, [v]))
    assert 'label="party bank"' in dot and '"enclave:bank.ps" -> "enclave:media.trainer"' in dot


def test_dot_is_deterministic_whatever_the_insertion_order(graph):
    a = to_dot(_scene(graph, [LABEL_LEAK]))
    b = to_dot(build_scene(build_graph(reverse=True), list(reversed(FLOWS)), MEASUREMENTS,
                           violations=[LABEL_LEAK], title="vertical_demo"))
    assert a == b


def test_mermaid_has_subgraphs_flow_labels_and_red_link_styles(graph):
    mm = to_mermaid(_scene(graph, [LABEL_LEAK]))
    assert "flowchart LR" in mm
    assert mm.startswith('---\ntitle: "pipeline vertical_demo: 1 flow violation (red)"\n---\n')
    assert 'subgraph P0["party media"]' in mm
    assert 'subgraph P0N0["enclave media.trainer<br/>mr 0a1b2c3d4e5f (sim)"]' in mm
    assert '-- "act1<br/>float32[B,64]<br/>allow media -#gt; shop: act1" -->' in mm
    links = [ln for ln in mm.splitlines() if re.match(r"\s+\w+ (--|-\.)", ln)]
    red_idx = next(i for i, ln in enumerate(links) if "VIOLATION" in ln)
    style = next(ln for ln in mm.splitlines() if "linkStyle" in ln and draw.RED in ln)
    assert str(red_idx) in style.split()[1].split(",")
    assert "P1N0 -. " in links[red_idx] and links[red_idx].endswith("P0N0")
    assert mm == to_mermaid(_scene(build_graph(reverse=True), [LABEL_LEAK]))


def test_mermaid_escapes_quotes_and_angle_brackets():
    import networkx as nx

    g = nx.DiGraph()
    g.add_node("a.b/read:x", id="a.b/read:x", kind="read", node="a.b", party="a", label='say "hi" <b>')
    mm = to_mermaid(build_scene(g))
    assert '["say #quot;hi#quot; #lt;b#gt;"]' in mm


@needs_dot
def test_dot_output_is_valid_graphviz(graph):
    dot = to_dot(_scene(graph, [LABEL_LEAK]))
    out = subprocess.run(["dot", "-Tjson"], input=dot, capture_output=True, text=True, check=True).stdout
    doc = json.loads(out)
    names = {o.get("name") for o in doc.get("objects", [])}
    assert {"cluster_p0", "cluster_p1", "cluster_p0_n0", "cluster_p1_n0"} <= names


@needs_dot
def test_svg_renders_with_graphviz(graph):
    svg = render(_scene(graph, [LABEL_LEAK]), "svg")
    assert "<svg" in svg and "party media" in svg and "enclave media.trainer" in svg
    assert draw.RED in svg


@needs_dot
def test_html_embeds_the_svg_when_dot_is_present(graph):
    page = render(_scene(graph, [LABEL_LEAK]), "html")
    assert page.startswith("<!doctype html>") and "<svg" in page
    assert "<script" not in page and "http" not in page.split("<svg")[0]
    assert 'class="violation"' in page


def test_html_without_dot_shows_mermaid_source_and_a_note(graph, monkeypatch):
    monkeypatch.setattr(draw.shutil, "which", lambda name: None)
    page = render(_scene(graph), "html")
    assert "<svg" not in page and '<pre class="mermaid">' in page
    assert "Graphviz <code>dot</code> was not found" in page
    assert "flowchart LR" in page and "&quot;party media&quot;" in page
    # Flows and measurements are listed as tables too.
    assert "allow media -&gt; shop: act1" in page and MEASUREMENTS["media.trainer"] in page


def test_svg_without_dot_raises_a_clear_error(graph, monkeypatch):
    monkeypatch.setattr(draw.shutil, "which", lambda name: None)
    with pytest.raises(draw.GraphvizMissing, match="--format dot"):
        render(_scene(graph), "svg")


def test_unknown_format_is_refused(graph):
    with pytest.raises(draw.DrawError, match="unknown format"):
        render(_scene(graph), "png")


def test_cyclic_graph_still_draws():
    import networkx as nx

    g = nx.DiGraph()
    for t in ("a.x/forward:1", "a.x/forward:2"):
        g.add_node(t, id=t, kind="forward", node="a.x", party="a", label=t)
    g.add_edge("a.x/forward:1", "a.x/forward:2")
    g.add_edge("a.x/forward:2", "a.x/forward:1")
    assert to_dot(build_scene(g)).count("->") == 2


def test_extra_attributes_are_ignored_and_enclaves_without_tasks_are_shown(graph):
    graph.nodes["media.trainer/read:impressions"]["color"] = "green"
    graph.edges["media.trainer/read:impressions", "media.trainer/forward:act1"]["weight"] = 3
    scene = build_scene(graph, FLOWS, {**MEASUREMENTS, "hub.ps": "ab" * 32}, title="t")
    dot = to_dot(scene)
    assert '"enclave:hub.ps" [label="(no tasks)"' in dot and 'label="party hub"' in dot
    assert "color=green" not in dot.replace(" ", "")


def test_malformed_edge_attributes_are_a_draw_error(graph):
    graph.edges["media.trainer/read:impressions", "media.trainer/forward:act1"]["spec"] = {"shape": "x"}
    with pytest.raises(draw.DrawError, match="malformed attributes"):
        build_scene(graph)
