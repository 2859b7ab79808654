"""``fldsl predict``: score new rows with the exported SavedModels of a run.

Vertical builds: split over the attested channel by default (every party's node on this machine, each with
its own model and data, as ``fldsl run`` starts them; ``--node`` runs one party's node for a deployment across
organisations), or ``--local``: the owner-side path, every part in this process. Horizontal and distributed
builds: the aggregator's model, locally."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from fldsl.cli import EXIT_INPUT


@click.command(name="predict")
@click.argument("build", type=click.Path(path_type=Path))
@click.option("--model", "models", multiple=True, required=True, type=click.Path(path_type=Path),
              help="A run folder (its models/*.savedmodel.sealed, each opened with its party's sealing key) "
              "or a folder `fldsl model decrypt` wrote; repeatable (vertical: every part). With --node: this "
              "node's sealed pack, its run folder, or its decrypted folder.")
@click.option("--data", "data", multiple=True, metavar="PARTY.DATASET[=PATH]",
              help="The rows to score: a csv with the data set's columns (the label may be absent). Without "
              "=PATH, the plan's own data. Vertical: every party's data set defaults to the plan's; "
              "horizontal: exactly one. With --node: NAME=PATH or PARTY.DATASET=PATH of this node.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Write the `id,score` csv here (default: stdout).")
@click.option("--trust-dir", type=click.Path(path_type=Path), default=Path(".fldsl/trust"),
              show_default=True,
              help="The trust root holding each party's folder (PARTY/sealing.key, PARTY/ for a node); with "
              "--node, the root holding this node's party folder (fldsl trust init --party).")
@click.option("--local", is_flag=True,
              help="Vertical: the owner-side path, every part's model in this process (no nodes, no "
              "channel).")
@click.option("--node", "only", metavar="PARTY.NODE",
              help="Vertical, across organisations: run this one node's prediction in the foreground, with "
              "its own model, against its peers' nodes started the same way (--addresses, --run-dir).")
@click.option("--run-dir", type=click.Path(path_type=Path), default=None,
              help="Where the nodes' logs and addresses go (default runs/<pipeline>/predict/<time>/).")
@click.option("--addresses", type=click.Path(path_type=Path), default=None,
              help="--node: addresses.json (default <run-dir>/addresses.json)")
@click.option("--listen", default=None, metavar="HOST", help="--node: the address the node listens on")
@click.option("--connect-timeout", type=float, default=None, help="--node: how long to wait for the peers")
def command(build: Path, models: tuple[Path, ...], data: tuple[str, ...], output: Path | None,
            trust_dir: Path, local: bool, only: str | None, run_dir: Path | None, addresses: Path | None,
            listen: str | None, connect_timeout: float | None) -> None:
    """Score rows with the SavedModels BUILD's run exported; writes `id,score` (`id,score_0,...` for more
    than two classes).

    Horizontal and distributed: the aggregator's model scores one data set, locally. Vertical: split over
    the attested channel, as `fldsl run` runs the pipeline (PSI aligns the parties' ids, each passive sends
    its activations for the aligned rows, the label owner writes the scores), or with --local every part's
    model in this process."""
    from fldsl.runtime.predict import PredictError, load_plans, predict, predict_split, write_scores

    if only is None and (addresses is not None or listen is not None or connect_timeout is not None):
        raise click.UsageError("--addresses, --listen and --connect-timeout go with --node")
    try:
        plans = load_plans(build)
        vertical = any(p.role.startswith("vertical.") for p in plans.values())
        if only is not None:
            if local:
                raise click.UsageError("--node runs one node of the split path; --local runs every part here")
            _run_one(build, only, models, data, output, trust_dir, run_dir, addresses, listen,
                     connect_timeout)
        if vertical and not local:
            split = predict_split(build, list(models), list(data), out=output, trust_dir=trust_dir,
                                  run_dir=run_dir)
            if output is None:
                click.echo(split.scores.read_text(), nl=False)
            click.echo(f"scored {split.rows:,} rows with {', '.join(split.nodes)} (vertical, split over the "
                       f"attested channel; logs: {split.run_dir / 'logs'})"
                       + (f" -> {output}" if output is not None else ""), err=True)
            return
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


def _run_one(build: Path, only: str, models: tuple[Path, ...], data: tuple[str, ...], output: Path | None,
             trust_dir: Path, run_dir: Path | None, addresses: Path | None, listen: str | None,
             connect_timeout: float | None) -> None:
    """Replace this process with the node (``python -I -m fldsl.runtime.node ... --predict MODEL``), as
    ``fldsl run --node`` does."""
    from fldsl.runtime import launcher as L
    from fldsl.runtime.predict import PredictError, load_plans

    plans = load_plans(build)
    plan = plans.get(only)
    if plan is None:
        raise PredictError(f"{build}: no node `{only}` (nodes: {', '.join(plans)})")
    if len(models) != 1:
        raise PredictError(f"--node {only} takes one --model: its sealed pack, run folder or decrypted "
                           "folder")
    if run_dir is None:
        raise PredictError("--node needs --run-dir (where its log goes and, by default, addresses.json)")
    addresses = addresses or run_dir / "addresses.json"
    if not addresses.exists():
        raise PredictError(f"{addresses}: missing; write one ({{node: {{host, port, bootstrap_port}}}}) or "
                           "pass --addresses")
    flags = ["--predict", str(models[0].resolve())]
    for item in data:
        key, sep, path = item.partition("=")
        name = key.split(".", 1)[1] if key.startswith(f"{plan.party}.") else key
        if not sep or not path:
            raise PredictError(f"--data expects NAME=PATH with --node, got `{item}`")
        flags += ["--data", f"{name}={Path(path).resolve()}"]
    if output is not None:
        if plan.role != "vertical.active":
            raise PredictError(f"-o: {only} is not the label owner; only the label owner's node writes "
                               "scores")
        flags += ["--predict-out", str(output.resolve())]
    if listen is not None:
        flags += ["--listen", listen]
    if connect_timeout is not None:
        flags += ["--connect-timeout", str(connect_timeout)]
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = L.node_command(build.resolve(), only, addresses.resolve(), run_dir.resolve(), trust_dir.resolve(),
                         flags)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, L.node_env())
