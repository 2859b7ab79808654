"""``fldsl compile FILE [-o DIR] [--set k=v] [--sign KEY] [--target ...]``: emit the build directory."""

from __future__ import annotations

import importlib
from pathlib import Path

import click

from fldsl.cli import EXIT_ENV, EXIT_INPUT, EXIT_OK, output, parse_sets
from fldsl.cli.check import print_warnings, warnings_json
from fldsl.diagnostics import FldslError


@click.command("compile")
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "-o",
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=str),
    default=None,
    help="Build directory (default: build/<pipeline>).",
)
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE", help="Override a pipeline parameter.")
@click.option(
    "--sign",
    "sign_key",
    type=click.Path(dir_okay=False, path_type=str),
    default=None,
    help="Sign every node with this RSA-3072 key and pin the real MRENCLAVE/MRSIGNER.",
)
@click.option(
    "--entrypoint",
    type=click.Path(dir_okay=False, path_type=str),
    default=None,
    help="--sign: the Python the enclave runs (a venv's bin/python3 with fldsl installed; default: this "
    "one).",
)
@click.option(
    "--owner-key",
    "owner_key_items",
    multiple=True,
    metavar="PARTY=PUBKEY.pem",
    help="The model owner's public key (`fldsl trust owner-key`): PARTY's exported model is also written "
    "encrypted to it. Repeatable.",
)
@click.option(
    "--target",
    type=click.Choice(["kubernetes", "compose"]),
    default=None,
    help="Also write deployment files: deploy/<target>/<party>/, one folder per party (one container per "
    "node; docs/deploy.md).",
)
@click.option("--party", default=None, metavar="PARTY",
              help="--target: write this party's folder only (default: every party's).")
@click.option("--expose", type=click.Choice(["clusterip", "nodeport", "loadbalancer"]), default=None,
              help="--target kubernetes: the type of each node's Service (default clusterip: peers in the "
              "same cluster only).")
@click.option("--addresses", "addresses_file", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="--target: the addresses file the parties agreed on ({node: {host, port, bootstrap_port, "
              "egress_cidrs?}}): where this party's nodes reach the other parties' (default: all in one "
              "cluster, or on one docker host).")
@click.option("--image", default=None, metavar="IMAGE",
              help="--target: the image the nodes run (default fldsl:<version>, built by the Dockerfile).")
@click.option("--json", "as_json", is_flag=True, help=output.JSON_HELP)
def command(
    file: str,
    out_dir: str | None,
    sets: tuple[str, ...],
    sign_key: str | None,
    entrypoint: str | None,
    owner_key_items: tuple[str, ...],
    target: str | None,
    party: str | None,
    expose: str | None,
    addresses_file: str | None,
    image: str | None,
    as_json: bool,
) -> None:
    """Compile a .flp pipeline into per-node plans, policies, pins and Gramine manifests."""
    from fldsl.api import compile_pipeline

    if target is None:
        given = [f for f, v in (("--party", party), ("--expose", expose), ("--addresses", addresses_file),
                                ("--image", image)) if v is not None]
        if given:
            raise click.UsageError(f"{', '.join(given)} only with --target kubernetes|compose")
    elif expose is not None and target != "kubernetes":
        raise click.UsageError("--expose only with --target kubernetes (compose publishes the ports the "
                               "other parties reach)")
    owner_keys = _read_owner_keys(owner_key_items)
    try:
        result = compile_pipeline(file, out_dir, parse_sets(sets), target, owner_keys, party=party,
                                  expose=expose, addresses=addresses_file, image=image)
    except FldslError as e:
        output.fail_diagnostics(e, EXIT_INPUT)
    print_warnings(result.warnings, {file: Path(file).read_text(encoding="utf-8")})
    if sign_key is not None:
        try:
            sign = importlib.import_module("fldsl.compiler.sign")
        except ModuleNotFoundError:
            output.fail(EXIT_ENV, "--sign is not available in this build")
        try:
            signed = sign.sign_build(result.build_dir, Path(sign_key), entrypoint=entrypoint)
        except sign.GramineMissing as e:
            output.fail(EXIT_ENV, f"--sign: {e}")
        except sign.SignError as e:
            output.fail(EXIT_INPUT, f"--sign: {e}")
    nodes = sorted({f.split("/")[1] for f in result.files if f.startswith("nodes/")})
    if as_json:
        output.emit(EXIT_OK, build_dir=str(result.build_dir), digest=result.digest, files=list(result.files),
                    nodes=nodes, warnings=warnings_json(result.warnings), diagnostics=[],
                    signed=[{"node": s.node_id, "mr_enclave": s.mr_enclave, "trusted_files": s.trusted_files}
                            for s in signed] if sign_key is not None else [])
        return
    click.echo(f"compiled {result.build_dir}  digest {result.digest}")
    click.echo(f"  pipeline.json  ({len(result.files)} files)")
    for n in nodes:
        click.echo(f"  nodes/{n}/  plan.json policy.json pins.json manifest (.template, .toml)")
    folders: dict[str, list[str]] = {}
    for f in result.files:
        if f.startswith("deploy/"):
            folder, _, name = f.rpartition("/")
            folders.setdefault(folder, []).append(name)
    for folder, names in folders.items():
        click.echo(f"  {folder}/  {' '.join(names)}")
    if folders:
        click.echo(f"  deploy each party's folder as its header says (docs/deploy.md); the digest "
                   f"{result.digest[:12]} must be the same at every party")
    if sign_key is not None:
        click.echo(f"  signed with {sign_key}: pins hold the real MRENCLAVE/MRSIGNER")
        for s in signed:
            click.echo(f"    {s.node_id}: MRENCLAVE {s.mr_enclave}  ({s.trusted_files} trusted files)")
        click.echo(f"  run it inside Gramine: fldsl run {result.build_dir} --enclave gramine-direct "
                   "(gramine-sgx on SGX hardware)")


def _read_owner_keys(items: tuple[str, ...]) -> dict[str, str]:
    """``--owner-key PARTY=PUBKEY.pem`` items -> {party: PEM text} (the key itself is checked by compile)."""
    out: dict[str, str] = {}
    for item in items:
        party, sep, path = (x.strip() for x in item.partition("="))
        if not sep or not party or not path:
            raise click.UsageError(f"--owner-key expects PARTY=PUBKEY.pem, got `{item}`")
        if party in out:
            raise click.UsageError(f"--owner-key {party} given twice")
        try:
            with open(path, "rb") as f:
                data = f.read(1 << 16)  # a public key PEM is a few hundred bytes; compile refuses the rest
        except OSError as e:
            output.fail(EXIT_INPUT, f"--owner-key {party}: cannot read {path}: {e.strerror}")
        out[party] = data.decode("ascii", errors="replace")
    return out
