"""``fldsl graph`` on a build directory / pipeline.json (and on .flp pipelines once the compiler is there)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from drawfixture import FLOWS, MEASUREMENTS, build_graph

from fldsl.artifacts import GraphEdge, GraphNode, NodeSummary, PipelineFile, dump_json
from fldsl.cli import main

REPO = Path(__file__).resolve().parents[2]
needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="Graphviz `dot` is not installed (apt-get install graphviz)")


@pytest.fixture
def build_dir(tmp_path: Path) -> Path:
    g = build_graph()
    pf = PipelineFile(
        pipeline="vertical_demo", digest="0" * 64, source="vertical_demo.flp", params={}, scenario="vertical",
        parties={"media": ["media.trainer"], "shop": ["shop.trainer"]},
        nodes=[NodeSummary(id=n, party=n.split(".")[0], role=r, measurement=MEASUREMENTS[n], files={})
               for n, r in (("media.trainer", "vertical.passive"), ("shop.trainer", "vertical.active"))],
        flows=FLOWS,
        graph_nodes=[GraphNode.model_validate(g.nodes[n]) for n in g.nodes],
        graph_edges=[GraphEdge(src=u, dst=v, **g.edges[u, v]) for u, v in g.edges],
        ir={},
    )
    d = tmp_path / "build" / "vertical_demo"
    d.mkdir(parents=True)
    (d / "pipeline.json").write_text(dump_json(pf))
    return d


def _run(*args: str):
    return CliRunner().invoke(main, ["graph", *args])


def test_dot_to_stdout_from_build_dir(build_dir):
    r = _run(str(build_dir))
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith('digraph "vertical_demo"')
    assert 'label="party media"' in r.stdout
    assert "mr 0a1b2c3d4e5f (sim)" in r.stdout
    assert "allow media -> shop: act1" in r.stdout


def test_pipeline_json_and_build_dir_give_identical_output(build_dir):
    a = _run(str(build_dir), "--format", "mermaid")
    b = _run(str(build_dir / "pipeline.json"), "--format", "mermaid")
    assert a.exit_code == b.exit_code == 0
    assert a.stdout == b.stdout and a.stdout.startswith('---\ntitle: "pipeline vertical_demo"')


def test_format_from_output_suffix(build_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("fldsl.compiler.draw.shutil.which", lambda name: None)  # offline HTML path
    out = tmp_path / "g.html"
    r = _run(str(build_dir), "-o", str(out))
    assert r.exit_code == 0, r.output
    assert f"wrote {out} (html: 2 parties, 2 enclaves, 2 flows)" in r.stderr
    page = out.read_text()
    assert page.startswith("<!doctype html>") and '<pre class="mermaid">' in page


def test_svg_without_dot_exits_4_with_advice(build_dir, monkeypatch):
    monkeypatch.setattr("fldsl.compiler.draw.shutil.which", lambda name: None)
    r = _run(str(build_dir), "--format", "svg")
    assert r.exit_code == 4
    assert "Graphviz `dot` is not installed" in r.stderr and "--format dot" in r.stderr
    assert "Traceback" not in r.output


@needs_dot
def test_svg_file(build_dir, tmp_path):
    out = tmp_path / "g.svg"
    r = _run(str(build_dir), "-o", str(out))
    assert r.exit_code == 0, r.output
    svg = out.read_text()
    assert "<svg" in svg and "enclave shop.trainer" in svg


def test_broken_pipeline_json_is_an_input_error(tmp_path):
    bad = tmp_path / "pipeline.json"
    bad.write_text('{"format": "fldsl.pipeline/1"}')
    r = _run(str(bad))
    assert r.exit_code == 2
    assert "not a valid PipelineFile" in r.stderr and "Traceback" not in r.output


def test_set_is_refused_for_a_build(build_dir):
    r = _run(str(build_dir), "--set", "a=1")
    assert r.exit_code == 2 and "--set only applies" in r.output


needs_compiler = pytest.mark.skipif(
    importlib.util.find_spec("fldsl.api") is None
    or not (REPO / "pipelines" / "vertical_wide_deep.flp").exists(),
    reason="the compiler (fldsl.api) or the demo pipeline is not in this checkout yet",
)


@needs_compiler
def test_flp_pipeline_draws_with_measurements():
    r = _run(str(REPO / "pipelines" / "vertical_wide_deep.flp"), "--format", "mermaid")
    assert r.exit_code == 0, r.output
    assert "party media" in r.stdout and "party shop" in r.stdout
    assert "(sim)" in r.stdout and "act1" in r.stdout


@needs_compiler
def test_invalid_pipeline_prints_diagnostics_and_exits_2(tmp_path):
    bad = tmp_path / "bad.flp"
    bad.write_text("pipeline oops {\n  party media {\n")
    r = _run(str(bad))
    assert r.exit_code == 2
    assert "bad.flp:" in r.stderr and "error" in r.stderr and "Traceback" not in r.output
    assert r.stdout == ""


@needs_compiler
def test_partial_program_with_violations_is_drawn_in_red(tmp_path, monkeypatch):
    # When the compiler's error carries the partial program and the refused flows, they are drawn.
    from fldsl import api
    from fldsl.compiler import draw
    from fldsl.diagnostics import Diagnostic, FldslError

    class Partial:
        name = "leaky"
        flows = FLOWS

    msg = "shop.conversions.label -> media (no allow rule)"
    err = FldslError([Diagnostic("error", msg, "leaky.flp", 9, 3)])
    err.program = Partial()  # type: ignore[attr-defined]
    leak = {"src": "shop.trainer", "dst": "media.trainer", "tensor": "labels", "message": msg}
    err.violations = [leak]  # type: ignore[attr-defined]

    def fail(*_a, **_k):
        raise err

    monkeypatch.setattr(api, "compile_pipeline", fail)
    monkeypatch.setattr(api, "task_graph", lambda program: build_graph())
    src = tmp_path / "leaky.flp"
    src.write_text("# drawn from the partial program\n")
    out = tmp_path / "leaky.dot"
    r = _run(str(src), "-o", str(out))
    assert r.exit_code == 2
    assert "leaky.flp:9:3: error: shop.conversions.label -> media" in r.stderr
    assert "1 violation(s) in red" in r.stderr
    dot = out.read_text()
    assert '"enclave:shop.trainer" -> "enclave:media.trainer"' in dot and draw.RED in dot


@needs_compiler
def test_pipeline_failing_after_check_is_drawn_without_measurements(monkeypatch):
    from fldsl import api
    from fldsl.diagnostics import Diagnostic, FldslError

    def fail(path, *_a, **_k):
        msg = "manifest of node `media.trainer`: ... [enclave-size]"
        raise FldslError([Diagnostic("error", msg, str(path))])

    monkeypatch.setattr(api, "compile_pipeline", fail)
    r = _run(str(REPO / "pipelines" / "vertical_wide_deep.flp"), "--format", "dot")
    assert r.exit_code == 2 and "[enclave-size]" in r.stderr
    assert 'label="party media"' in r.stdout and "allow media -> shop: act1" in r.stdout
    assert "(sim)" not in r.stdout  # no measurements: the build was not emitted


@needs_dot
def test_the_demo_graph_fits_a_laptop_screen_with_every_name_readable(tmp_path: Path) -> None:
    """Drawn left to right the demo was 3,488 pt wide: in a 1400×1000 window no party or enclave name was
    on screen. Top to bottom, with flow rules on hover, it fits the window's width at its natural size."""
    import re

    demo = Path(__file__).resolve().parents[2] / "pipelines" / "vertical_wide_deep.flp"
    out = tmp_path / "demo.svg"
    res = CliRunner().invoke(main, ["graph", str(demo), "--format", "svg", "-o", str(out)])
    assert res.exit_code == 0, res.output
    svg = out.read_text()
    size = re.search(r'<svg width="([\d.]+)pt" height="([\d.]+)pt"', svg)
    assert size is not None
    width_pt, height_pt = float(size[1]), float(size[2])
    assert width_pt * 4 / 3 <= 1300  # px at 96 dpi: no horizontal scrolling, no shrinking
    assert height_pt * 4 / 3 <= 1100  # a screen and a bit: scaled at most to ~90% in the HTML view
    for name in ("party shop", "party media", "enclave shop.trainer", "enclave media.trainer"):
        assert f">{name}</text>" in svg, name
    # The rule allowing a flow is detail on demand (the tooltip), not a label that widens the picture.
    assert "allowed by: allow media &#45;&gt; shop: act1" in svg
