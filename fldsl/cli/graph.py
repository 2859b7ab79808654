"""``fldsl graph FILE``: draw a pipeline's task graph (parties, enclaves, flows) as DOT, SVG, Mermaid or HTML.

FILE is a ``.flp`` pipeline (compiled into a temporary folder so the drawing shows real measurements), a
build directory or its ``pipeline.json``. An invalid pipeline is still drawn when the compiler's error
carries the partial program (``FldslError.program``) and the refused flows (``FldslError.violations``:
objects or dicts with src, dst, tensor, message); those flows are red. A pipeline that checks but fails
later (e.g. manifest lint) is drawn without measurements. Either way the diagnostics go to stderr and the
exit status is 2 so scripts notice.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

from fldsl.cli import EXIT_ENV, EXIT_INPUT, EXIT_OK, parse_sets

_SUFFIX_FORMAT = {".dot": "dot", ".gv": "dot", ".svg": "svg", ".mmd": "mermaid", ".mermaid": "mermaid",
                  ".html": "html", ".htm": "html"}


class _InputError(Exception):
    """Bad FILE / options: printed as one line, exit 2."""


def _violations(raw: Iterable[Any] | None) -> list[Any]:
    """The compiler's violating flows as draw.Violation (objects or dicts with src, dst, tensor, message)."""
    from fldsl.compiler.draw import Violation

    out = []
    for v in raw or ():
        fields = ("src", "dst", "tensor", "message")
        data = v if isinstance(v, dict) else {k: getattr(v, k, None) for k in fields}
        try:
            out.append(Violation.model_validate(data))
        except ValueError:
            continue  # a violation we cannot place is still in the printed diagnostics
    return out


def _scene_from_build(path: Path) -> Any:
    from fldsl.artifacts import PipelineFile, load_model
    from fldsl.compiler.draw import scene_from_pipeline

    pf = path / "pipeline.json" if path.is_dir() else path
    return scene_from_pipeline(load_model(PipelineFile, pf))


def _scene_from_source(path: Path, params: dict[str, str]) -> tuple[Any, Exception | None]:
    """(scene, None) for a valid pipeline; (partial scene or None, the FldslError) for an invalid one."""
    try:
        from fldsl import api
    except ImportError as e:
        raise _InputError(f"{path}: the compiler is not available in this build ({e}); "
                          "draw a build directory or its pipeline.json instead") from e
    from fldsl.compiler.draw import build_scene
    from fldsl.diagnostics import FldslError

    with tempfile.TemporaryDirectory(prefix="fldsl-graph-") as tmp:
        try:
            result = api.compile_pipeline(path, out_dir=Path(tmp), params=params)
        except FldslError as e:
            program = getattr(e, "program", None)
            if program is None:
                # The pipeline may check and only fail later (emit, manifest lint): draw the checked graph
                # without measurements.
                try:
                    program = api.check(path, params)
                except FldslError:
                    return None, e
            graph = api.task_graph(program)
            name = getattr(program, "pipeline", None) or getattr(program, "name", None) or path.stem
            scene = build_scene(graph, getattr(program, "flows", None) or (),
                                violations=_violations(getattr(e, "violations", None)), title=str(name))
            return scene, e
        return _scene_from_build(Path(result.build_dir)), None


def _diagnostics_text(e: Exception) -> str:
    render = getattr(e, "render", None)
    return render() if callable(render) else str(e)


@click.command("graph")
@click.argument("file", type=click.Path(exists=True, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["dot", "svg", "mermaid", "html"]), default=None,
              help="Output format (default: from -o's suffix, else dot).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write here instead of stdout.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a pipeline parameter.")
def command(file: Path, fmt: str | None, output: Path | None, sets: tuple[str, ...]) -> None:
    """Draw FILE's task graph: parties as trust boundaries, nodes as enclaves, flows with their allow rule.

    FILE is a .flp pipeline, a build directory or a pipeline.json. Refused flows of an invalid pipeline
    are drawn in red (exit status 2). SVG (and the picture in HTML) needs Graphviz `dot`.
    """
    from fldsl.artifacts import ArtifactError
    from fldsl.compiler.draw import DrawError, GraphvizMissing, render

    params = parse_sets(sets)
    if fmt is None:
        fmt = _SUFFIX_FORMAT.get(output.suffix.lower(), "dot") if output else "dot"
    failure: Exception | None = None
    try:
        if file.suffix == ".flp":
            scene, failure = _scene_from_source(file, params)
        else:
            if params:
                raise click.UsageError("--set only applies to a .flp pipeline (a build is compiled already)")
            scene = _scene_from_build(file)
        if failure is not None:
            click.echo(_diagnostics_text(failure), err=True)
            if scene is None:
                sys.exit(EXIT_INPUT)
        text = render(scene, fmt)
    except GraphvizMissing as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_ENV)
    except (DrawError, ArtifactError, _InputError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_INPUT)

    if output is None:
        click.echo(text, nl=False)
    else:
        try:
            output.write_text(text, encoding="utf-8")
        except OSError as e:
            click.echo(f"error: cannot write {output}: {e.strerror or e}", err=True)
            sys.exit(EXIT_INPUT)
        enclaves = sum(len(v) for v in scene.parties.values())
        flows = sum(1 for x in scene.edges if x.crossing)
        extra = f", {len(scene.violations)} violation(s) in red" if scene.violations else ""
        click.echo(f"wrote {output} ({fmt}: {len(scene.parties)} parties, {enclaves} enclaves, "
                   f"{flows} flows{extra})", err=True)
    sys.exit(EXIT_INPUT if failure is not None else EXIT_OK)
