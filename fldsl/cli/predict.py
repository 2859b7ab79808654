"""``fldsl predict``: score new rows with the exported SavedModels of a run (the model owner's side)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fldsl.cli import EXIT_INPUT


@click.command(name="predict")
@click.argument("build", type=click.Path(path_type=Path))
@click.option("--model", "models", multiple=True, required=True, type=click.Path(path_type=Path),
              help="A run folder (its models/*.savedmodel.sealed, opened with each party's sealing key in "
              "--trust-dir) or a folder `fldsl model decrypt` wrote; repeatable (vertical: every part).")
@click.option("--data", "data", multiple=True, metavar="PARTY.DATASET[=PATH]",
              help="The rows to score: a csv with the data set's columns (the label may be absent). Without "
              "=PATH, the plan's own data. Vertical: every party's data set defaults to the plan's; "
              "horizontal: exactly one.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Write the `id,score` csv here (default: stdout).")
@click.option("--trust-dir", type=click.Path(path_type=Path), default=Path(".fldsl/trust"),
              show_default=True,
              help="Where each party's sealing key is (PARTY/sealing.key), for a run folder's sealed models.")
def command(build: Path, models: tuple[Path, ...], data: tuple[str, ...], output: Path | None,
            trust_dir: Path) -> None:
    """Score rows with the SavedModels BUILD's run exported; writes `id,score` (`id,score_0,...` for more
    than two classes).

    Horizontal and distributed: the aggregator's model scores one data set. Vertical: every part's model
    runs in this process (the owner-side path: the model owner holds all parts), on the ids all parties'
    files share, in the label owner's row order."""
    from fldsl.runtime.predict import PredictError, predict, write_scores

    try:
        pred = predict(build, list(models), list(data), trust_dir=trust_dir)
        text = write_scores(pred, output)
    except PredictError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except OSError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_INPUT)
    if output is None:
        click.echo(text, nl=False)
    how = "owner-side: every part in this process" if pred.scenario == "vertical" else "local"
    click.echo(f"scored {len(pred.ids):,} rows with {', '.join(pred.nodes)} ({pred.scenario}, {how})"
               + (f" -> {output}" if output is not None else ""), err=True)
