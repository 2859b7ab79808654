"""``fldsl data keygen|encrypt|describe``: a data owner's key, Gramine-encrypted data files, and the schema
block that describes a csv file in a pipeline.

The key is what ``fldsl keys serve`` releases to attested enclaves; the encrypted file is what the node's
``encrypted`` mount reads (Gramine's protected-file format, made by ``gramine-sgx-pf-crypt``). ``describe``
reads a party's own csv file and prints its ``data ... = csv(...) { ... }`` declaration, so each party can
compile the pipeline without the other parties' files (docs/language.md, "Schema blocks").
"""

from __future__ import annotations

import json
import os
import re
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
    """Data owners: keys, Gramine-encrypted data files, schema blocks."""


@command.command(name="keygen")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
def keygen(out: Path) -> None:
    """Write a new random 16-byte data key to OUT (mode 0600; never overwrites, never follows a symlink)."""
    from fldsl.runtime.attestation.crypto import write_secret

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


# ---------------------------------------------------------------------------------------------------------
# describe
# ---------------------------------------------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # the grammar's NAME: anything else is written as a string
WRAP = 100  # columns per line of the printed block (continuation lines align after the type)


@command.command(name="describe")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--id", "id_column", default="id", show_default=True, metavar="COL",
              help="The id column (rows are aligned on it; never a feature).")
@click.option("--label", "label_column", default=None, metavar="COL",
              help="The label column, if this party holds the label (never a feature).")
@click.option("--name", default=None, metavar="NAME",
              help="The data set's name in the pipeline (default: FILE's name, made an identifier).")
@click.option("--exact-rows", is_flag=True,
              help="Print `rows <=` the exact row count instead of the count rounded up to two significant "
              "digits.")
def describe(file: Path, id_column: str, label_column: str | None, name: str | None,
             exact_rows: bool) -> None:
    """Print the declaration of FILE, a csv file with a header (or a Parquet file: `.parquet`, `.pq`, typed
    from its column types and values), with its schema block, to paste into a
    party of the pipeline: every column but the id and label, in header order, typed `integer` (every value a
    whole number) or `numeric` (every value a finite number), with `missing: mean` where cells are empty
    (`missing: "?" mean` where one placeholder such as `?` stands for unknown), or `category` with
    `vocabulary: top K` (K = its distinct values, at most 100) for text; names that are not identifiers
    quoted.
    `rows <=` is the file's row count rounded up to two significant digits (569 -> 570, 50,123 -> 51,000),
    room for a file that grows a little; --exact-rows prints the count itself. Columns that cannot be
    declared (non-finite numbers, every cell empty) are left out, each named in a comment in the block and
    on stderr. The fills and vocabulary are suggestions: scaling is yours to add. The node checks its file
    against the block when it starts, with the same rules, so a block printed here passes for this file."""
    from fldsl.runtime.csvschema import describe_csv, round_up_rows
    from fldsl.runtime.data import DataError

    if label_column is not None and label_column == id_column:
        click.echo(f"error: --id and --label both name `{id_column}`", err=True)
        sys.exit(EXIT_INPUT)
    if name is not None and not _NAME.fullmatch(name):
        click.echo(f"error: --name {name!r} is not a name (letters, digits and _, not starting with a digit)",
                   err=True)
        sys.exit(EXIT_INPUT)
    parquet = file.suffix.lower() in (".parquet", ".pq")
    try:
        if parquet:
            from fldsl.runtime.arrowread import describe_parquet

            desc = describe_parquet(file, id_column=id_column, label_column=label_column)
        else:
            desc = describe_csv(file, id_column=id_column, label_column=label_column)
    except DataError as e:
        hint = " (name the id column with --id COL)" if f"no id column `{id_column}`" in str(e) else ""
        click.echo(f"error: {e}{hint}", err=True)
        sys.exit(EXIT_INPUT)
    bound = desc.rows if exact_rows else round_up_rows(desc.rows)
    how = "" if bound == desc.rows else ", rounded up"
    label = f", label: {_column(label_column)}" if label_column is not None else ""
    call = f"{'parquet' if parquet else 'csv'}({_string(str(file))}, id: {_column(id_column)}{label})"
    lines = [f"data {name or _dataset_name(file)} = {call} {{",
             f"  rows <= {bound}  # {desc.rows:,} row{'s' if desc.rows != 1 else ''} in {file.name}{how}"]
    # One line per run of columns with the same type and options, in header order (the feature order).
    run: list[str] = []
    run_key: tuple[str, str] | None = None
    for col in desc.columns:
        if col.type is None:
            continue
        key = (col.type, col.options)
        if key != run_key and run and run_key is not None:
            lines += _typed_line(*run_key, run)
            run = []
        run_key = key
        run.append(_column(col.name))
    if run and run_key is not None:
        lines += _typed_line(*run_key, run)
    skipped = [c for c in desc.columns if c.type is None]
    for c in skipped:
        lines.append(f"  # not declared: {_column(c.name)}: {c.reason}")
        click.echo(f"warning: {file}: column `{c.name}` left out: {c.reason}", err=True)
    if all(c.type is None for c in desc.columns):
        click.echo(f"error: {file}: no column besides the id and label can be declared (a schema block needs "
                   "at least one numeric or integer column)", err=True)
        sys.exit(EXIT_INPUT)
    lines.append("}")
    click.echo("\n".join(lines))


def _string(text: str) -> str:
    """A .flp string literal (JSON escapes, one line)."""
    return json.dumps(text, ensure_ascii=False)


def _column(name: str) -> str:
    return name if _NAME.fullmatch(name) else _string(name)


def _dataset_name(file: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9_]", "_", file.stem) or "data"
    return stem if _NAME.fullmatch(stem) else f"d_{stem}"


def _typed_line(ctype: str, options: str, names: list[str]) -> list[str]:
    """``  numeric a, b, c  OPTIONS`` wrapped at WRAP columns, continuation lines aligned after the type
    (newlines are whitespace in a .flp file); the options follow the last column."""
    indent = " " * (2 + len(ctype) + 1)
    out: list[str] = []
    line = f"  {ctype} "
    for k, n in enumerate(names):
        piece = n + ("," if k < len(names) - 1 else "")
        if len(line) + len(piece) > WRAP and line.strip() != ctype:
            out.append(line.rstrip())
            line = indent
        line += piece + " "
    if options:
        if len(line) + len(options) > WRAP:
            out.append(line.rstrip())
            line = indent
        line += " " + options
    out.append(line.rstrip())
    return out
