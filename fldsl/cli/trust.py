"""``fldsl trust init|add-peer|show``: each party's SIMULATED trust material, and the peers it pins."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fldsl.cli import EXIT_ENV, EXIT_INPUT, EXIT_TRUST

_root = click.option("--trust-dir", "root", type=click.Path(path_type=Path), default=Path(".fldsl/trust"),
                     show_default=True, help="The trust root: one folder per party.")
_party = click.option("--party", required=True, metavar="PARTY",
                      help="The party whose folder this is (a party name of the pipeline).")


@click.group(name="trust")
def command() -> None:
    """Trust material for attestation (simulated backend): one folder per party, public identities pinned."""


@command.command(name="init")
@_party
@_root
def init(party: str, root: Path) -> None:
    """Create (or reuse) PARTY's simulated root CA, PCK-like cert, attestation, enclave-signing and sealing
    keys in TRUST_DIR/PARTY, and its public identity.json. Existing files are reused, never overwritten.

    Send identity.json to the other parties (any channel) and compare its fingerprint with them over another
    one; each runs `fldsl trust add-peer` with it. `fldsl run` of a whole pipeline on one machine makes every
    party's folder itself."""
    from fldsl.runtime.attestation.backend import AttestationError
    from fldsl.runtime.attestation.parties import IDENTITY_FILE, init_party
    from fldsl.runtime.attestation.sim import FILES, SECRET_FILES

    try:
        dep, ident = init_party(root, party)
    except (AttestationError, OSError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_ENV)
    click.echo(f"SIMULATED trust material of party {party} in {dep.dir} (not Intel SGX; proves no hardware "
               "isolation):")
    for kind, name in FILES.items():
        state = "created" if name in dep.created else "reused"
        secret = "  (private, 0600)" if kind in SECRET_FILES else ""
        click.echo(f"  {state:<8} {name}{secret}")
    state = "created" if IDENTITY_FILE in dep.created else "reused"
    click.echo(f"  {state:<8} {IDENTITY_FILE}  (public: send it to the other parties)")
    click.echo(f"fingerprint: {ident.fingerprint()}")
    click.echo(f"sim MRSIGNER: {ident.sim_mr_signer}")
    click.echo(f"Only {party}'s nodes need this folder; whoever can read it can forge sim quotes for "
               f"{party}'s nodes (no other party's).")


@command.command(name="add-peer")
@click.argument("identity_file", type=click.Path(dir_okay=False, path_type=Path))
@_party
@_root
@click.option("--replace", is_flag=True, help="Replace a different identity already pinned for that party "
              "(after confirming the new fingerprint with it).")
def add_peer(identity_file: Path, party: str, root: Path, replace: bool) -> None:
    """Pin another party's public IDENTITY_FILE (its identity.json) in TRUST_DIR/PARTY/peers: PARTY's nodes
    then accept sim quotes of that party's nodes, and no one else's in its name."""
    from fldsl.runtime.attestation.backend import AttestationError
    from fldsl.runtime.attestation.parties import add_peer as pin
    from fldsl.runtime.attestation.parties import load_identity, party_folder

    try:
        ident = load_identity(identity_file)
        folder = party_folder(root, party)
        state = pin(folder, ident, replace=replace)
    except AttestationError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_TRUST)
    except OSError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_ENV)
    click.echo(f"{state}: party {ident.party} pinned in {folder}/peers ({ident.fingerprint()})")
    click.echo(f"confirm this fingerprint with {ident.party} over another channel than the file came by")


@command.command(name="show")
@_party
@_root
def show(party: str, root: Path) -> None:
    """PARTY's public identity (fingerprint) and the peers it pins."""
    from fldsl.runtime.attestation.backend import AttestationError
    from fldsl.runtime.attestation.parties import IDENTITY_FILE, PEERS_DIR, load_identity, party_folder

    folder = party_folder(root, party)
    try:
        own = load_identity(folder / IDENTITY_FILE)
        peers = [load_identity(p) for p in sorted((folder / PEERS_DIR).glob("*.json"))]
    except AttestationError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_INPUT)
    click.echo(f"party {own.party}: {folder / IDENTITY_FILE}")
    click.echo(f"  fingerprint {own.fingerprint()}")
    click.echo("pinned peers:" + ("" if peers else " none"))
    for ident in peers:
        click.echo(f"  {ident.party:<16} {ident.fingerprint()}")


@command.command(name="owner-key")
@click.argument("private_out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--public", "public_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where the public key goes (default: PRIVATE_OUT with the suffix .pub.pem).")
@click.option("--type", "kind", type=click.Choice(["x25519", "p256", "p384", "rsa3072"]), default="x25519",
              show_default=True, help="Key type.")
def owner_key(private_out: Path, public_out: Path | None, kind: str) -> None:
    """Make a model owner's key pair: PRIVATE_OUT (0600) stays with the owner, the public key goes to
    `fldsl compile --owner-key PARTY=PUBLIC.pem`. Never overwrites, never follows a symlink."""
    from fldsl.runtime.attestation.crypto import write_public, write_secret
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
