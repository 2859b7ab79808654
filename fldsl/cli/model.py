"""``fldsl model decrypt``: the model owner opens an exported (sealed) model."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fldsl.cli import EXIT_INPUT, EXIT_TRUST


@click.group(name="model")
def command() -> None:
    """Exported models."""


@command.command(name="decrypt")
@click.argument("sealed", type=click.Path(path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), required=True, help="Where to write the plaintext."
)
@click.option(
    "--key-file",
    type=click.Path(path_type=Path),
    default=Path(".fldsl/trust/sealing.key"),
    show_default=True,
    help="The deployment's sealing key (sim: sealing.key from `fldsl trust init`).",
)
@click.option("--node", "node_id", required=True, help="Node id that sealed the model, e.g. media.trainer.")
@click.option("--name", required=True, help="Logical name of the export, e.g. media.trainer/model.")
@click.option("--min-version", type=int, default=None, help="Refuse versions older than this (rollback).")
def decrypt(
    sealed: Path, output: Path, key_file: Path, node_id: str, name: str, min_version: int | None
) -> None:
    """Authenticate and decrypt SEALED into OUTPUT (written only if every chunk authenticates)."""
    from fldsl.runtime.sealing import SealError, unseal_file

    try:
        key = key_file.read_bytes()
    except OSError as e:
        click.echo(f"error: cannot read key file {key_file}: {e.strerror}", err=True)
        sys.exit(EXIT_INPUT)
    if not sealed.is_file():
        click.echo(f"error: {sealed}: no such file", err=True)
        sys.exit(EXIT_INPUT)
    try:
        header = unseal_file(sealed, output, key=key, node_id=node_id, name=name, min_version=min_version)
    except SealError as e:
        click.echo(f"error: {sealed}: {e}", err=True)
        sys.exit(EXIT_INPUT if e.reason in {"bad-key", "not-sealed", "format"} else EXIT_TRUST)
    except OSError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_INPUT)
    total = getattr(header, "total_length", None)
    click.echo(f"decrypted {sealed} -> {output} ({total} bytes, version {getattr(header, 'version', '?')})")
