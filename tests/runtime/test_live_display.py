"""`fldsl run`'s live display says SIMULATED as soon as a node reports a simulated quote (red-team finding:
only the final summary said it). Events go through the launcher as in a run: progress event -> NodeState ->
display."""

from __future__ import annotations

import io
from pathlib import Path

import buildkit
from rich.console import Console

from fldsl.cli.run import SIM_CLAIM, RichDisplay
from fldsl.runtime.launcher import Launcher

SHOP, MEDIA = "shop.trainer", "media.trainer"


def _render(display: RichDisplay) -> str:
    assert display.progress is not None
    out = io.StringIO()
    Console(file=out, width=400, color_system=None).print(display.progress.get_renderable())
    return out.getvalue()


def test_the_live_display_says_simulated_once_a_node_reports_a_simulated_quote(tmp_path: Path) -> None:
    build = buildkit.vertical_build(tmp_path, rows=50, epochs=1)
    shown = io.StringIO()
    display = RichDisplay(Console(file=shown, width=400, color_system=None))
    launcher = Launcher(build, run_dir=tmp_path / "run", trust_dir=tmp_path / "trust", display=display)
    display.begin(launcher)
    try:
        nodes = launcher.nodes
        launcher._on_event(nodes[SHOP], {"event": "started", "node": SHOP})
        launcher._on_event(nodes[MEDIA], {"event": "attested", "node": MEDIA, "backend": "gramine",
                                          "simulated": False, "runner": "gramine"})
        before = _render(display)
        assert "SIMULATED" not in before and SHOP in before  # the bars are there, no claim yet
        launcher._on_event(nodes[SHOP], {"event": "attested", "node": SHOP, "backend": "sim",
                                         "simulated": True, "runner": "native"})
        first = _render(display)
        assert f"SIMULATED attestation ({SHOP}): {SIM_CLAIM}" in first
        assert first.index("SIMULATED") < first.index(MEDIA)  # above the bars
        launcher._on_event(nodes[MEDIA], {"event": "attested", "node": MEDIA, "backend": "sim",
                                          "simulated": True, "runner": "native"})
        launcher._on_event(nodes[MEDIA], {"event": "step", "node": MEDIA, "step": 3, "total": 10})
        assert f"SIMULATED attestation ({MEDIA}, {SHOP}): {SIM_CLAIM}" in _render(display)
    finally:
        display.end()
    assert f"SIMULATED attestation ({MEDIA}, {SHOP})" in shown.getvalue()  # the last frame stays on screen
