"""``fldsl model decrypt``: the model owner opens an exported model (sealed, or encrypted to their key).

Two kinds of export: the weights (``<node>_model.sealed`` / ``.owner``, an ``.npz`` file) and the SavedModel
pack (``<node>_model.savedmodel.sealed`` / ``.owner``, export name ``<node>/model/savedmodel``), which is
unpacked into a folder that ``tf.saved_model.load`` opens (fldsl.runtime.savedmodel)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import click

from fldsl.cli import EXIT_INPUT, EXIT_TRUST


@click.group(name="model")
def command() -> None:
    """Exported models."""


@command.command(name="decrypt")
@click.argument("sealed", type=click.Path(path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(), required=True,
    help="Where to write the plaintext: a file, or a folder (existing, or named with a trailing /). A "
    "SavedModel pack becomes the folder OUTPUT (or a folder inside an existing OUTPUT)."
)
@click.option(
    "--key-file",
    type=click.Path(path_type=Path),
    default=None,
    help="The sealing key of the party whose node sealed the model (sim: sealing.key in its trust folder; "
    "default .fldsl/trust/PARTY/sealing.key for --node PARTY.NODE).",
)
@click.option(
    "--owner-key",
    type=click.Path(path_type=Path),
    default=None,
    help="The owner's private key: opens a model exported to `--owner-key` at compile time (*.owner).",
)
@click.option("--node", "node_id", default=None, help="Node id that exported the model, e.g. media.trainer.")
@click.option("--name", default=None, help="Logical name of the export, e.g. media.trainer/model.")
@click.option("--min-version", type=int, default=None, help="Refuse versions older than this (rollback).")
def decrypt(
    sealed: Path,
    output: str,
    key_file: Path | None,
    owner_key: Path | None,
    node_id: str | None,
    name: str | None,
    min_version: int | None,
) -> None:
    """Authenticate and decrypt SEALED into OUTPUT (written only if every chunk authenticates).

    A sealed file needs --node and --name; a file encrypted to the owner names them in its authenticated
    header (given, they must match)."""
    from fldsl.runtime.owner_export import is_owner_export

    if not sealed.is_file():
        click.echo(f"error: {sealed}: no such file", err=True)
        sys.exit(EXIT_INPUT)
    try:
        owner_file = is_owner_export(sealed)
    except OSError as e:
        click.echo(f"error: {sealed}: {e.strerror}", err=True)
        sys.exit(EXIT_INPUT)
    if owner_file != (owner_key is not None):
        why = ("is encrypted to an owner key: pass --owner-key PRIVATE.pem" if owner_file else
               "is sealed, not encrypted to an owner key: drop --owner-key (it opens with --key-file)")
        click.echo(f"error: {sealed} {why}", err=True)
        sys.exit(EXIT_INPUT)
    out = Path(output)
    if output.endswith("/") and not out.exists():  # "-o model/": a folder is meant, as with cp
        out.mkdir(parents=True)
    stem = sealed.name.removesuffix(".sealed").removesuffix(".owner")
    if _is_pack_export(sealed, owner_file, name):
        _decrypt_pack(sealed, out / stem if out.is_dir() else out, key_file, owner_key, node_id, name,
                      min_version)
        return
    if out.is_dir():  # like cp: into the folder, named after the model (never a stray OUTPUT.tmp)
        out = out / (stem + ".npz")
    if owner_key is not None:
        _decrypt_owner(sealed, out, owner_key, node_id, name)
    else:
        if node_id is None or name is None:
            raise click.UsageError("a sealed model needs --node and --name")
        _unseal(sealed, out, key_file, node_id, name, min_version)


def _sealing_key(key_file: Path | None, node_id: str) -> bytes:
    # Each party seals with its own key: only the sealing node's party can open what it wrote.
    path = key_file or Path(".fldsl/trust") / node_id.split(".", 1)[0] / "sealing.key"
    try:
        return path.read_bytes()
    except OSError as e:
        click.echo(f"error: cannot read key file {path}: {e.strerror}", err=True)
        sys.exit(EXIT_INPUT)


def _owner_pem(owner_key: Path) -> bytes:
    from fldsl.runtime.owner_export import MAX_PEM

    try:
        with open(owner_key, "rb") as f:
            return f.read(MAX_PEM + 1)
    except OSError as e:
        click.echo(f"error: cannot read owner key {owner_key}: {e.strerror}", err=True)
        sys.exit(EXIT_INPUT)


@contextlib.contextmanager
def _refusals(src: Path, owner_key: Path | None = None) -> Iterator[None]:
    """A sealed or owner-encrypted file that does not open: exit 2 for what is malformed or the wrong key's,
    3 for what fails authentication (tampered, rolled back)."""
    from fldsl.runtime.owner_export import OwnerExportError, OwnerKeyError
    from fldsl.runtime.sealing import SealError

    try:
        yield
    except SealError as e:
        click.echo(f"error: {src}: {e}", err=True)
        sys.exit(EXIT_INPUT if e.reason in {"bad-key", "not-sealed", "format"} else EXIT_TRUST)
    except OwnerKeyError as e:
        click.echo(f"error: {owner_key}: {e}", err=True)
        sys.exit(EXIT_INPUT)
    except OwnerExportError as e:
        click.echo(f"error: {src}: {e}", err=True)
        sys.exit(EXIT_INPUT if e.reason == "format" else EXIT_TRUST)
    except OSError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_INPUT)


def _unseal(sealed: Path, output: Path, key_file: Path | None, node_id: str, name: str,
            min_version: int | None) -> None:
    from fldsl.runtime.sealing import unseal_file

    key = _sealing_key(key_file, node_id)
    with _refusals(sealed):
        header = unseal_file(sealed, output, key=key, node_id=node_id, name=name, min_version=min_version)
    total = getattr(header, "total_length", None)
    click.echo(f"decrypted {sealed} -> {output} ({total} bytes, version {getattr(header, 'version', '?')})")


def _decrypt_owner(src: Path, output: Path, owner_key: Path, node_id: str | None, name: str | None) -> None:
    from fldsl.runtime.owner_export import decrypt_file

    pem = _owner_pem(owner_key)
    with _refusals(src, owner_key):
        header = decrypt_file(src, output, private_pem=pem, node_id=node_id, name=name)
    click.echo(f"decrypted {src} -> {output} ({header.length} bytes, exported by {header.node} as "
               f"{header.name}, {header.alg})")


def _is_pack_export(src: Path, owner_file: bool, name: str | None) -> bool:
    """A SavedModel pack, by its export name: the owner file's authenticated header, else --name (or the
    file name, when --name is not given)."""
    from fldsl.runtime.savedmodel import SUFFIX, export_name

    if owner_file:
        from fldsl.runtime.owner_export import OwnerExportError, read_header

        try:
            with open(src, "rb") as f:
                header, _ = read_header(f)
        except (OSError, OwnerExportError):
            return False  # the decrypt below reports it
        return header.name.endswith(export_name(""))
    if name is not None:
        return name.endswith(export_name(""))
    return src.name.endswith(SUFFIX + ".sealed")


def _decrypt_pack(src: Path, out: Path, key_file: Path | None, owner_key: Path | None, node_id: str | None,
                  name: str | None, min_version: int | None) -> None:
    """Decrypt a SavedModel pack in memory and unpack it into the new folder ``out``."""
    from fldsl.runtime.savedmodel import ModelPackError, unpack

    if out.exists():
        click.echo(f"error: {out} exists: the SavedModel goes into a new folder (or name an existing folder "
                   "to put it inside)", err=True)
        sys.exit(EXIT_INPUT)
    if owner_key is not None:
        from fldsl.runtime.owner_export import decrypt_bytes

        pem = _owner_pem(owner_key)
        with _refusals(src, owner_key):
            header, data = decrypt_bytes(src, private_pem=pem, node_id=node_id, name=name)
        who = f"exported by {header.node} as {header.name}, {header.alg}"
    else:
        from fldsl.runtime.sealing import unseal_file

        if node_id is None or name is None:
            raise click.UsageError("a sealed model needs --node and --name")
        key = _sealing_key(key_file, node_id)
        with _refusals(src):
            data = bytes(unseal_file(src, key=key, node_id=node_id, name=name, min_version=min_version))
        who = f"sealed by {node_id} as {name}"
    try:
        card = unpack(data, out)
    except ModelPackError as e:
        click.echo(f"error: {src}: {e}", err=True)
        sys.exit(EXIT_INPUT)
    except OSError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_INPUT)
    click.echo(f"decrypted {src} -> {out}/ (SavedModel of {card.get('node')}, {who}; "
               f"tf.saved_model.load('{out}'))")
