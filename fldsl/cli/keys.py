"""``fldsl keys serve BUILD_DIR``: the data owner's key service (releases data keys to attested enclaves)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any, NoReturn

import click

from fldsl.cli import EXIT_INPUT, EXIT_OK, output

MAX_KEY_FILE = 4096  # read at most this much of a key file (a key is 16 bytes)


@click.group(name="keys")
def command() -> None:
    """Key service: data keys for attested enclaves."""


def _pairs(values: tuple[str, ...], flag: str) -> list[tuple[str, str]]:
    out = []
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise click.UsageError(f"{flag} expects NAME=VALUE, got `{item}`")
        out.append((name.strip(), value.strip()))
    return out


def _fail(message: str, code: int = EXIT_INPUT) -> NoReturn:
    output.fail(code, message)


def _read_keys(items: list[tuple[str, str]]) -> dict[str, bytes]:
    from fldsl.runtime.keyservice import KEY_BYTES

    keys: dict[str, bytes] = {}
    for name, path in items:
        if name in keys:
            _fail(f"--key {name} given twice")
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_KEY_FILE)
        except OSError as e:
            _fail(f"--key {name}: cannot read {path}: {e.strerror}")
        if len(data) != KEY_BYTES:
            _fail(f"--key {name}: {path} holds {len(data)} bytes, a data key is {KEY_BYTES} "
                  "(make one with `fldsl data keygen`)")
        keys[name] = data
    return keys


def _read_grants(items: list[tuple[str, str]], keys: dict[str, bytes]) -> dict[str, list[str]]:
    from fldsl.diagnostics import did_you_mean

    grants: dict[str, list[str]] = {}
    for name, nodes in items:
        if name not in keys:
            hint = did_you_mean(name, keys)
            _fail(f"--grant {name}: no --key {name}" + (f" (did you mean `{hint}`?)" if hint else ""))
        ids = [n.strip() for n in nodes.split(",") if n.strip()]
        if not ids:
            _fail(f"--grant {name}: no node ids")
        grants.setdefault(name, [])
        grants[name] += [n for n in ids if n not in grants[name]]
    for name in keys:
        if name not in grants:
            click.echo(f"warning: key `{name}` is granted to no node; nobody can fetch it", err=True)
    return grants


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise click.UsageError(f"--listen expects HOST:PORT (port 0 picks a free one), got `{value}`")
    return host.strip("[]"), int(port)


@command.command(name="serve")
@click.argument("build_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--key", "key_items", multiple=True, metavar="NAME=KEYFILE", required=True,
              help="A data key to serve (16 bytes, from `fldsl data keygen`). Repeatable.")
@click.option("--grant", "grant_items", multiple=True, metavar="NAME=NODE_ID[,NODE_ID]", required=True,
              help="Nodes allowed to fetch key NAME. Repeatable.")
@click.option("--listen", default="127.0.0.1:0", show_default=True, metavar="HOST:PORT",
              help="Where to listen (port 0 picks a free port; the bound address is printed).")
@click.option("--trust-dir", type=click.Path(path_type=Path), default=Path(".fldsl/trust"), show_default=True,
              help="Simulated trust root (attestation sim): sim quotes must chain to the root of the node's "
              "party, as pinned in the --party folder.")
@click.option("--party", default=None, metavar="PARTY",
              help="The party running this service (its folder under --trust-dir); default: the party of the "
              "granted nodes.")
def serve(build_dir: Path, key_items: tuple[str, ...], grant_items: tuple[str, ...], listen: str,
          trust_dir: Path, party: str | None) -> None:
    """Serve data keys to the attested nodes of BUILD_DIR until Ctrl-C.

    A node gets a key only if its RA-TLS certificate verifies against the build's pins and policy (as a
    peer node would check it) and the key is granted to it; the key is encrypted to the certificate's
    enclave key. Each grant and refusal is logged with the node and the refused field, never the key."""
    from fldsl.artifacts import ArtifactError
    from fldsl.runtime.attestation.backend import AttestationError
    from fldsl.runtime.keyservice import KeyService, KeyServiceError, verifier_from_build

    host, port = _listen(listen)
    keys = _read_keys(_pairs(key_items, "--key"))
    grants = _read_grants(_pairs(grant_items, "--grant"), keys)
    nodes = sorted({n for ids in grants.values() for n in ids})
    if party is None:
        owners = sorted({n.split(".", 1)[0] for n in nodes})
        if len(owners) != 1:
            _fail(f"the granted nodes belong to parties {', '.join(owners)}: say which one runs this service "
                  "with --party")
        party = owners[0]
    try:
        verifier = verifier_from_build(build_dir, nodes, trust_dir / party)
        service = KeyService(keys, grants, verifier)
    except (ArtifactError, AttestationError, ValueError) as e:
        _fail(str(e))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s keys %(levelname)s: %(message)s")
    try:
        server = service.serve(host, port)
    except KeyServiceError as e:
        _fail(str(e))
    mode = verifier.requirement.mode
    if output.is_json():  # a server streams: JSON lines, the address first (whoever started it reads it)
        output.emit_line("listening", address=server.address, attestation=mode,
                         grants={n: sorted(ids) for n, ids in sorted(grants.items())})
    else:
        click.echo(f"key service listening on {server.address} ({mode} attestation; keys: "
                   + "; ".join(f"{n} -> {', '.join(ids)}" for n, ids in sorted(grants.items())) + ")")
    sys.stdout.flush()

    stop = threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stop.wait(0.5):
        pass
    server.stop()
    if output.is_json():
        output.emit_line("done", ok=True, exit_code=EXIT_OK)
    else:
        click.echo("key service stopped")
    sys.exit(EXIT_OK)
