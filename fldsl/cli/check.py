"""``fldsl check FILE [--set k=v]...``: parse and check a pipeline; print a summary or the diagnostics."""

from __future__ import annotations

import sys

import click

from fldsl.cli import EXIT_INPUT, EXIT_OK, output, parse_sets
from fldsl.diagnostics import Diagnostic, FldslError, render


def print_warnings(warnings: list[Diagnostic], sources: dict[str, str]) -> None:
    # Under --json the warnings are objects of the command's document instead (warnings_json).
    if warnings and not output.is_json():
        click.echo(render(warnings, sources, color=sys.stderr.isatty()), err=True)


def warnings_json(warnings: list[Diagnostic]) -> list[dict[str, object]]:
    return [output.diagnostic_json(w) for w in warnings]


@click.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE", help="Override a pipeline parameter.")
@click.option("--json", "as_json", is_flag=True, help=output.JSON_HELP)
def command(file: str, sets: tuple[str, ...], as_json: bool) -> None:
    """Check a .flp pipeline: syntax, names, shapes, partition rules and information flow."""
    from fldsl.api import check

    try:
        program = check(file, parse_sets(sets))
    except FldslError as e:
        output.fail_diagnostics(e, EXIT_INPUT)
    from pathlib import Path

    print_warnings(program.warnings, {file: Path(file).read_text(encoding="utf-8")})
    n_nodes = len(program.nodes)
    cross = [f for f in program.flows if f.src.split(".")[0] != f.dst.split(".")[0]]
    if as_json:
        output.emit(EXIT_OK, pipeline=program.pipeline, scenario=program.scenario,
                    parties=[p.name for p in program.parties],
                    nodes=[n.id for n in program.nodes], flows=len(program.flows),
                    cross_party_flows=len(cross), warnings=warnings_json(program.warnings), diagnostics=[])
        return
    click.echo(
        f"ok: {program.pipeline} — {len(program.parties)} parties, {n_nodes} nodes, "
        f"{len(program.flows)} flows ({len(cross)} cross-party), scenario {program.scenario}"
    )
