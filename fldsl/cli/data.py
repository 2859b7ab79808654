"""``fldsl data keygen|encrypt``: a data owner's key and Gramine-encrypted data files.

The key is what ``fldsl keys serve`` releases to attested enclaves; the encrypted file is what the node's
``encrypted`` mount reads (Gramine's protected-file format, made by ``gramine-sgx-pf-crypt``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from fldsl.cli import EXIT_ENV, EXIT_INPUT

KEY_BYTES = 16  # Gramine protected-file keys are 128-bit
PF_CRYPT = "gramine-sgx-pf-crypt"
# The node manifest's encrypted mount: { path = "/fldsl/data", uri = "file:data", key_name = "data" }
# (fldsl/compiler/templates/node.manifest.template.j2). Gramine binds each file to the host path it is
# opened by, relative to the node's working folder: data/NAME.
ENCLAVE_DATA_DIR = "/fldsl/data"
MOUNT_URI_PATH = "data"


@click.group(name="data")
def command() -> None:
    """Data owners: keys and Gramine-encrypted data files."""


@command.command(name="keygen")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
def keygen(out: Path) -> None:
    """Write a new random 16-byte data key to OUT (mode 0600; never overwrites, never follows a symlink)."""
    from fldsl.runtime.attestation._crypto import write_secret

    try:
        write_secret(out, os.urandom(KEY_BYTES))  # O_CREAT|O_EXCL: refuses existing files and symlinks
    except FileExistsError:
        click.echo(f"error: {out} already exists (or is a symlink); refusing to overwrite a key", err=True)
        sys.exit(EXIT_INPUT)
    except OSError as e:
        click.echo(f"error: cannot create {out}: {e.strerror}", err=True)
        sys.exit(EXIT_INPUT)
    click.echo(f"wrote a {KEY_BYTES}-byte data key to {out} (mode 0600); serve it with `fldsl keys serve`")


@command.command(name="encrypt")
@click.argument("plain", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="The encrypted file, or a folder (ending in / or existing) to write <PLAIN's name> into: "
              "the node's --data-dir.")
@click.option("--key", "key_file", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The 16-byte key from `fldsl data keygen`.")
def encrypt(plain: Path, output: Path, key_file: Path) -> None:
    """Encrypt PLAIN into Gramine's protected-file format (gramine-sgx-pf-crypt), for a node to read.

    The node opens the file as /fldsl/data/NAME, NAME being the file name of the plan's csv path; the
    enclave's mount maps that to data/NAME in its working folder, and Gramine refuses a file that does not
    carry exactly that path. So the file is bound to data/NAME, NAME being OUTPUT's file name, wherever
    OUTPUT is: give the node's data folder (-o DIR/) and the name stays PLAIN's."""
    if output.is_dir() or str(output).endswith(("/", os.sep)):
        output = output / plain.name
    _check_inputs(plain, output, key_file)
    tool = shutil.which(PF_CRYPT)
    if tool is None:
        click.echo(f"error: {PF_CRYPT} not found on PATH: install Gramine (https://gramine.readthedocs.io) "
                   "to encrypt data files", err=True)
        sys.exit(EXIT_ENV)
    proc = _pf_encrypt(tool, plain, output, key_file)
    if proc.returncode != 0:
        output.unlink(missing_ok=True)  # never leave a half-written file behind
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        click.echo(f"error: {PF_CRYPT} failed (exit {proc.returncode}): {detail[-1] if detail else ''}",
                   err=True)
        sys.exit(EXIT_INPUT)
    click.echo(f"encrypted {plain} -> {output} ({output.stat().st_size} bytes, Gramine protected file); the "
               f"node reads it as {ENCLAVE_DATA_DIR}/{output.name} from --data-dir NODE={output.parent}")


def _check_inputs(plain: Path, output: Path, key_file: Path) -> None:
    if not plain.is_file():
        click.echo(f"error: {plain}: no such file", err=True)
        sys.exit(EXIT_INPUT)
    try:
        size = key_file.stat().st_size
    except OSError as e:
        click.echo(f"error: cannot read key file {key_file}: {e.strerror}", err=True)
        sys.exit(EXIT_INPUT)
    if size != KEY_BYTES:
        click.echo(f"error: {key_file} holds {size} bytes; a Gramine data key is {KEY_BYTES} bytes "
                   "(make one with `fldsl data keygen`)", err=True)
        sys.exit(EXIT_INPUT)
    if output.exists() or output.is_symlink():
        click.echo(f"error: {output} already exists; refusing to overwrite", err=True)
        sys.exit(EXIT_INPUT)
    if not output.parent.is_dir():
        click.echo(f"error: {output.parent}: no such folder", err=True)
        sys.exit(EXIT_INPUT)


def _pf_encrypt(tool: str, plain: Path, output: Path, key_file: Path) -> subprocess.CompletedProcess[str]:
    """Run gramine-sgx-pf-crypt from a scratch folder whose ``data`` links to OUTPUT's folder, with the
    output path ``data/NAME``: Gramine writes the path exactly as given into the file, and the enclave
    checks it against the mount's host path (uri ``file:data`` + ``/NAME``) when it opens the file."""
    with tempfile.TemporaryDirectory(prefix="fldsl-encrypt-") as scratch:
        (Path(scratch) / MOUNT_URI_PATH).symlink_to(output.parent.resolve(), target_is_directory=True)
        cmd = [tool, "encrypt", "-w", str(key_file.resolve()), "-i", str(plain.resolve()),
               "-o", f"{MOUNT_URI_PATH}/{output.name}"]
        return subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=scratch)
