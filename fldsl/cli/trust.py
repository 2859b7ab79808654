"""``fldsl trust init [DIR]``: create (or reuse) a deployment's SIMULATED trust material."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fldsl.cli import EXIT_ENV


@click.group(name="trust")
def command() -> None:
    """Trust material for attestation (simulated backend)."""


@command.command(name="init")
@click.argument("directory", type=click.Path(path_type=Path), default=Path(".fldsl/trust"), required=False)
def init(directory: Path) -> None:
    """Create the simulated root CA, PCK-like cert, attestation, enclave-signing and sealing keys in DIRECTORY
    (default .fldsl/trust). Existing files are reused, never overwritten."""
    from fldsl.runtime.attestation.backend import AttestationError
    from fldsl.runtime.attestation.sim import FILES, SECRET_FILES, trust_init

    try:
        dep = trust_init(directory)
    except (AttestationError, OSError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_ENV)
    click.echo(f"SIMULATED trust material in {directory} (not Intel SGX; proves no hardware isolation):")
    for kind, name in FILES.items():
        state = "created" if name in dep.created else "reused"
        secret = "  (private, 0600)" if kind in SECRET_FILES else ""
        click.echo(f"  {state:<8} {name}{secret}")
    click.echo(f"sim MRSIGNER: {dep.mr_signer.hex()}")
    click.echo(
        "Every node of the deployment needs this directory; anyone who can read it can forge sim quotes."
    )
