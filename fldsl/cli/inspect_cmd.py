"""``fldsl inspect cert|quote|sealed FILE``: decode and verify trust objects, for humans (or ``--json``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from fldsl.cli import EXIT_INPUT, EXIT_OK, EXIT_TRUST, output

DEFAULT_TRUST_DIR = Path(".fldsl/trust")
_trust_dir = click.option(
    "--trust-dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_TRUST_DIR,
    show_default=True,
    help="Simulated trust material to verify against: a party's folder (its root and its pinned peers'), "
    "or a trust root holding party folders.",
)
_json = click.option("--json", "as_json", is_flag=True, help=output.JSON_HELP)


@click.group(name="inspect")
def command() -> None:
    """Decode and verify RA-TLS certificates, SGX quotes and sealed files."""


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        output.fail(EXIT_INPUT, f"{path}: {e.strerror}")


def _roots(trust_dir: Path) -> dict[str, bytes]:
    """``{party: sim root}`` known under TRUST_DIR: a party folder, or a trust root of party folders."""
    from fldsl.runtime.attestation.backend import AttestationError
    from fldsl.runtime.attestation.parties import IDENTITY_FILE, sim_roots

    folders = [trust_dir] if (trust_dir / IDENTITY_FILE).is_file() else sorted(
        d for d in trust_dir.glob("*") if (d / IDENTITY_FILE).is_file())
    roots: dict[str, bytes] = {}
    for folder in folders:
        try:
            roots.update(sim_roots(folder))
        except AttestationError as e:
            output.fail(EXIT_INPUT, str(e))
    return roots


def _genuine(quote: Any, trust_dir: Path, party: str | None = None) -> Any:
    from fldsl.runtime.attestation import qvl
    from fldsl.runtime.attestation.backend import Verdict
    from fldsl.runtime.attestation.sim import verify_sim_quote

    if quote.is_simulated:
        roots = _roots(trust_dir)
        if party is not None:  # a certificate names its node: only that party's root may vouch for it
            roots = {p: r for p, r in roots.items() if p == party}
        if not roots:
            whose = f"party {party}'s" if party else "any party's"
            return Verdict(False, True, "no-sim-root", f"no simulated root of {whose} under {trust_dir} "
                           "(pass --trust-dir: a party's trust folder)")
        verdicts = [verify_sim_quote(quote, root, whose=f"party {p}'s") for p, root in sorted(roots.items())]
        return next((v for v in verdicts if v.ok), verdicts[0])
    try:
        return qvl.verify_dcap_quote(quote)
    except qvl.QvlUnavailable as e:
        return Verdict(False, False, "qvl-missing", str(e))


def _emit(doc: dict[str, Any], as_json: bool, title: str, code: int) -> None:
    if as_json:
        output.emit(code, **doc)
        return
    click.echo(title)

    def show(d: dict[str, Any], indent: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                click.echo(f"{indent}{k}:")
                show(v, indent + "  ")
            elif isinstance(v, list):
                click.echo(f"{indent}{k + ':':<20} {'none' if not v else ''}".rstrip())
                for item in v:
                    click.echo(f"{indent}  - {item}")
            else:
                click.echo(f"{indent}{k + ':':<20} {v}")

    show(doc, "  ")


def _verdict_doc(verdict: Any) -> dict[str, Any]:
    return {"ok": verdict.ok, "status": verdict.status, "label": verdict.label, "detail": verdict.message}


def _peer_check(file: Path, node_dir: Path, expect: str | None, trust_dir: Path) -> dict[str, Any]:
    """Run exactly the check the node in NODE_DIR would run on this certificate (its pins and policy)."""
    from fldsl.artifacts import ArtifactError, Pins, Policy, load_model
    from fldsl.runtime.attestation.verify import PeerRefused, PeerVerifier

    try:
        pins = load_model(Pins, node_dir / "pins.json")
        policy = load_model(Policy, node_dir / "policy.json")
    except ArtifactError as e:
        output.fail(EXIT_INPUT, str(e))
    verifier = PeerVerifier(pins, policy.attestation, sim_roots=_roots(trust_dir),
                            own_pins_digest=pins.digest())
    try:
        verdict = verifier.verify(file.read_bytes(), expect)
    except PeerRefused as e:
        return {
            "as_node": policy.node,
            "accepted": False,
            "field": e.field,
            "expected": e.expected,
            "actual": e.actual,
            "message": str(e),
        }
    return {"as_node": policy.node, "accepted": True, "summary": verdict.summary}


@command.command(name="cert")
@click.argument("file", type=click.Path(path_type=Path))
@_json
@_trust_dir
@click.option(
    "--node-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="A node's build folder (build/<pipeline>/nodes/<id>): also verify the certificate exactly as that "
    "node would, against its pins.json and policy.json.",
)
@click.option("--expect", default=None, help="With --node-dir: the node id the peer must be.")
def cert(file: Path, as_json: bool, trust_dir: Path, node_dir: Path | None, expect: str | None) -> None:
    """An RA-TLS certificate (PEM or DER): evidence, key binding, quote genuineness."""
    from fldsl.runtime.attestation.ratls import CertificateError, parse_certificate

    try:
        ev = parse_certificate(_read(file))
    except CertificateError as e:
        output.fail(EXIT_INPUT, f"{file}: {e}")
    verdict = _genuine(ev.quote, trust_dir, ev.node_id.split(".", 1)[0] if ev.node_id else None)
    doc = ev.summary()
    doc["genuine"] = _verdict_doc(verdict)
    problems = []
    if not ev.self_signature_ok:
        problems.append("certificate self-signature is invalid (modified after signing)")
    if not ev.pubkey_hash_ok:
        problems.append(f"evidence does not bind the certificate key: {ev.binding_problem}")
    if not verdict.ok:
        problems.append(f"quote not verified: {verdict.message}")
    if ev.quote.debug:
        problems.append("DEBUG enclave: its memory is readable by the host; production policies refuse it")
    doc["problems"] = problems
    failed = not ev.self_signature_ok or not ev.pubkey_hash_ok or not verdict.ok
    if node_dir is not None:
        doc["peer_check"] = _peer_check(file, node_dir, expect, trust_dir)
        failed = failed or not doc["peer_check"]["accepted"]
    code = EXIT_TRUST if failed else EXIT_OK
    _emit(doc, as_json, f"RA-TLS certificate {file}", code)
    sys.exit(code)


@command.command(name="quote")
@click.argument("file", type=click.Path(path_type=Path))
@_json
@_trust_dir
def quote(file: Path, as_json: bool, trust_dir: Path) -> None:
    """A raw SGX ECDSA quote (binary, or hex text)."""
    from fldsl.runtime.attestation.quote import Quote, QuoteError

    raw = _read(file)
    text = raw.strip()
    if text and all(c in b"0123456789abcdefABCDEF" for c in text) and len(text) % 2 == 0:
        raw = bytes.fromhex(text.decode())
    try:
        q = Quote.parse(raw)
    except QuoteError as e:
        output.fail(EXIT_INPUT, f"{file}: {e}")
    verdict = _genuine(q, trust_dir)
    doc = q.summary()
    doc["genuine"] = _verdict_doc(verdict)
    code = EXIT_OK if verdict.ok else EXIT_TRUST
    _emit(doc, as_json, f"SGX quote {file}", code)
    sys.exit(code)


@command.command(name="sealed")
@click.argument("file", type=click.Path(path_type=Path))
@_json
@_trust_dir
@click.option(
    "--key-file", type=click.Path(path_type=Path), default=None,
    help="Default: sealing.key of the sealing node's party folder (TRUST_DIR, or TRUST_DIR/PARTY)."
)
def sealed(file: Path, as_json: bool, trust_dir: Path, key_file: Path | None) -> None:
    """A sealed file: its header, and whether it authenticates with the deployment's sealing key."""
    from fldsl.runtime import sealing

    try:
        header = sealing.read_header_file(file)
    except OSError as e:
        output.fail(EXIT_INPUT, f"{file}: {e.strerror}")
    except sealing.SealError as e:
        output.fail(EXIT_INPUT, f"{file}: {e}")
    doc: dict[str, Any] = header.summary()
    doc["file_bytes"] = file.stat().st_size
    party_dir = trust_dir / header.node_id.split(".", 1)[0]
    key_path = key_file or (party_dir if party_dir.is_dir() else trust_dir) / "sealing.key"
    status, code = "not checked (no sealing key; pass --key-file or --trust-dir)", EXIT_OK
    if key_path.is_file():
        key = key_path.read_bytes()
        try:
            sealing.verify_file(file, key=key, node_id=header.node_id, name=header.name)
            status = "authentic (every chunk verified)"
        except sealing.SealError as e:
            status, code = f"REFUSED: {e}", EXIT_TRUST
    doc["integrity"] = status
    _emit(doc, as_json, f"sealed file {file}", code)
    sys.exit(code)
