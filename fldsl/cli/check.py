"""``fldsl check FILE [--set k=v]...``: parse and check a pipeline; print a summary or the diagnostics."""

from __future__ import annotations

import sys

import click

from fldsl.cli import EXIT_INPUT, parse_sets
from fldsl.diagnostics import FldslError, render


def print_diagnostics(e: FldslError) -> None:
    click.echo(render(e.diagnostics, e.sources, color=sys.stderr.isatty()), err=True)


def print_warnings(warnings: list, sources: dict[str, str]) -> None:
    if warnings:
        click.echo(render(warnings, sources, color=sys.stderr.isatty()), err=True)


@click.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE", help="Override a pipeline parameter.")
def command(file: str, sets: tuple[str, ...]) -> None:
    """Check a .flp pipeline: syntax, names, shapes, partition rules and information flow."""
    from fldsl.api import check

    try:
        program = check(file, parse_sets(sets))
    except FldslError as e:
        print_diagnostics(e)
        sys.exit(EXIT_INPUT)
    from pathlib import Path

    print_warnings(program.warnings, {file: Path(file).read_text(encoding="utf-8")})
    n_nodes = len(program.nodes)
    cross = [f for f in program.flows if f.src.split(".")[0] != f.dst.split(".")[0]]
    click.echo(
        f"ok: {program.pipeline} — {len(program.parties)} parties, {n_nodes} nodes, "
        f"{len(program.flows)} flows ({len(cross)} cross-party), scenario {program.scenario}"
    )
