"""``fldsl trust init [DIR]``: create (or reuse) a deployment's SIMULATED trust material."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fldsl.cli import EXIT_ENV, EXIT_INPUT


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


@command.command(name="owner-key")
@click.argument("private_out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--public", "public_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where the public key goes (default: PRIVATE_OUT with the suffix .pub.pem).")
@click.option("--type", "kind", type=click.Choice(["x25519", "p256", "p384", "rsa3072"]), default="x25519",
              show_default=True, help="Key type.")
def owner_key(private_out: Path, public_out: Path | None, kind: str) -> None:
    """Make a model owner's key pair: PRIVATE_OUT (0600) stays with the owner, the public key goes to
    `fldsl compile --owner-key PARTY=PUBLIC.pem`. Never overwrites, never follows a symlink."""
    from fldsl.runtime.attestation._crypto import write_public, write_secret
    from fldsl.runtime.owner_export import generate_owner_key

    public_out = public_out or private_out.with_suffix(".pub.pem")
    if public_out == private_out:
        raise click.UsageError("--public must differ from PRIVATE_OUT")
    for path in (private_out, public_out):
        if path.exists() or path.is_symlink():
            click.echo(f"error: {path} already exists; refusing to overwrite a key", err=True)
            sys.exit(EXIT_INPUT)
    private, public = generate_owner_key(kind)  # type: ignore[arg-type]
    try:
        write_secret(private_out, private)  # O_CREAT|O_EXCL: also refuses a symlink planted meanwhile
        write_public(public_out, public)
    except OSError as e:
        click.echo(f"error: cannot write the key pair: {e}", err=True)
        sys.exit(EXIT_INPUT)
    click.echo(f"owner key ({kind}): private {private_out} (0600, keep it), public {public_out}")
    click.echo(f"compile with: fldsl compile FILE --owner-key PARTY={public_out}")
