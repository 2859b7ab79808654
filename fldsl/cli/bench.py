"""``fldsl bench FILE.flp``: the command line of the bench (``fldsl.bench.harness`` does the measuring)."""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path

import click

from fldsl.cli import EXIT_ENV, EXIT_INPUT, EXIT_OK, EXIT_RUN_FAILED, output, parse_sets


@click.command("bench")
@click.argument("flp", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="override a pipeline parameter")
@click.option("--json", "as_json", is_flag=True, help=output.JSON_HELP)
@click.option("--reps", type=click.IntRange(1, 50), default=3, show_default=True,
              help="repetitions; the modes are interleaved within each")
@click.option("--steps", type=click.IntRange(1), default=200, show_default=True,
              help="train at least this many steps (more epochs of the same data when needed)")
@click.option("--modes", default="native,plain,attested,flower", show_default=True,
              help="subset of native,plain,attested,flower (flower: FedAvg pipelines, needs flwr)")
@click.option("--out", "out_root", type=click.Path(path_type=Path), default=Path("runs/bench"),
              show_default=True, help="where builds, node logs and results.json go")
@click.option("--trust-dir", type=click.Path(path_type=Path), default=Path(".fldsl/trust"), show_default=True,
              help="simulated trust material (created on first use)")
@click.option("--profile", is_flag=True,
              help="cProfile each process' main thread (<out>/.../reports/*.prof.txt); slows every mode")
@click.option("--xla", is_flag=True,
              help="experiment: compile every tf.function with XLA in all three modes alike")
def command(flp: Path, sets: tuple[str, ...], as_json: bool, reps: int, steps: int, modes: str,
            out_root: Path, trust_dir: Path, profile: bool, xla: bool) -> None:
    """Benchmark a pipeline: native (central TF) vs federated plain vs federated attested (vs Flower)."""
    from rich.console import Console

    from fldsl.bench import harness
    from fldsl.diagnostics import FldslError
    from fldsl.runtime.launcher import LaunchError

    chosen = [m.strip() for m in modes.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in harness.MODES]
    if unknown or not chosen:
        raise click.UsageError(f"--modes: unknown {', '.join(unknown) or '(none)'}; "
                               f"choose from {', '.join(harness.MODES)}")
    console = Console(stderr=as_json)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    root = (out_root / flp.stem / f"{stamp}-{os.getpid()}").resolve()

    def say(text: str) -> None:
        console.print(text, highlight=False, markup=False, style="dim")

    try:
        doc, failures = harness.run_bench(flp, parse_sets(sets), reps=reps, steps=steps, modes=chosen,
                                          root=root, trust_dir=trust_dir, profile=profile, xla=xla, say=say)
    except FldslError as e:
        output.fail_diagnostics(e, EXIT_INPUT)
    except LaunchError as e:
        output.fail(e.exit_code, str(e))
    except OSError as e:
        output.fail(EXIT_ENV, str(e))
    code = EXIT_RUN_FAILED if failures else EXIT_OK
    if as_json:
        output.emit(code, **{k: v for k, v in doc.items() if k != "modes"})
    else:
        harness.print_table(console, f"fldsl bench {flp.name} — {reps} rep(s), results in {root}",
                            doc["summary"], failures, doc["modes"])
    sys.exit(code)
