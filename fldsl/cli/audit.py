"""``fldsl audit RUN_DIR... [--trust DIR] [--key PARTY=FILE] [--json]``: verify the nodes' signed records of
what crossed every link, match both ends message by message, and print per boundary what crossed.

Exit 0: every record verifies and both ends agree (warnings may remain); 3: a record is missing, altered,
reordered or forged, or one end recorded a message the other did not (each finding names its position);
2: bad input (no records, a key missing or unreadable).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from fldsl.cli import EXIT_INPUT, EXIT_OK, EXIT_TRUST, output

if TYPE_CHECKING:
    from fldsl.runtime.audit_report import AuditReport


def _keys(nodes: list[str], trust: Path, given: dict[str, str]) -> tuple[dict[str, bytes], dict[str, bytes]]:
    from fldsl.runtime.attestation.sim import FILES

    sealing: dict[str, bytes] = {}
    roots: dict[str, bytes] = {}
    for party in sorted({n.split(".", 1)[0] for n in nodes}):
        path = Path(given[party]) if party in given else trust / party / FILES["sealing_key"]
        try:
            sealing[party] = path.read_bytes()
        except OSError as e:
            raise click.UsageError(
                f"cannot read party {party}'s sealing key {path}: {e.strerror} (--trust DIR or --key "
                f"{party}=FILE)") from None
        root = trust / party / FILES["root_cert"]
        if root.is_file():
            roots[party] = root.read_bytes()
    return sealing, roots


def _print(r: AuditReport) -> None:
    click.echo(f"{len(r.nodes)} node(s): {', '.join(r.nodes)}; {r.files} record files, {r.records} records "
               "verified (chain, signature, certificate)")
    for s in r.signers:
        sim = "SIMULATED" if s.simulated else "real SGX"
        by = ", ".join(s.attested_by) or "no peer in these records"
        click.echo(f"  signer {s.node}: cert {s.cert_sha256[:16]}, {sim} measurement {s.measurement[:16]}…; "
                   f"{s.quote}; attested by {by}")
    for b in r.boundaries:
        where = "party boundary" if b.cross_party else "within a party"
        click.echo(f"\n{b.src} -> {b.dst} ({where})")
        for f in b.flows:
            allowed = f"allowed {f.allowed} (rule {f.rule})" if f.allowed else "NOT A FLOW OF THE POLICY"
            counts = ", ".join(f"{k} {v}" for k, v in (("sent", f.sent), ("received", f.received),
                                                          ("matched", f.matched)) if v is not None)
            shapes = ", ".join(f.shapes) or "-"
            click.echo(f"  {f.flow}: {shapes}; {counts}; {f.bytes:,} bytes; {f.training_steps} training "
                       f"steps; {allowed}")
    for x in r.refusals:
        click.echo(f"\nrefused ({x.direction}) at {x.node} record {x.record} [{x.peer}]: {x.flow or '-'}: "
                   f"{x.reason}")
    if r.events:
        kinds = sorted({e.event for e in r.events})
        tallies = [f"{sum(1 for e in r.events if e.event == k)} {k} record(s)" for k in kinds]
        click.echo("\n" + "; ".join(tallies))
    for finding in r.findings:
        at = f"record {finding.record}" if finding.record is not None else "file"
        where = f"{finding.node}/{finding.chain}.audit {at}"
        click.echo(f"{finding.severity.upper()}: {where}: {finding.message}", err=True)
    click.echo("\nok: the records verify and both ends agree" if r.ok else "\nFAILED: see the errors above")


def _parse_keys(items: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in items:
        party, sep, path = item.partition("=")
        if not sep or not party or not path:
            raise click.UsageError(f"--key expects PARTY=FILE, got `{item}`")
        out[party] = path
    return out


@click.command("audit")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--trust", "trust", type=click.Path(file_okay=False, path_type=Path),
              default=Path(".fldsl/trust"), show_default=True,
              help="Trust root holding each party's folder (its sealing.key opens that party's records; "
              "its root_ca.pem checks a sim quote).")
@click.option("--key", "keys", multiple=True, metavar="PARTY=FILE", help="A party's sealing key file.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def command(run_dirs: tuple[Path, ...], trust: Path, keys: tuple[str, ...], as_json: bool) -> None:
    """Verify the signed records of what crossed every link of one or several parties' runs."""
    from fldsl.runtime.audit_report import AuditInputError, PartyKeys, build_report, find_nodes

    try:
        nodes = find_nodes(list(run_dirs))
        sealing, roots = _keys(list(nodes), trust, _parse_keys(keys))
        report = build_report(list(run_dirs), PartyKeys(sealing=sealing, sim_roots=roots))
    except AuditInputError as e:
        output.fail(EXIT_INPUT, str(e))
    code = EXIT_OK if report.ok else EXIT_TRUST
    if as_json:  # the common --json document (fldsl.cli.output) around the report's fields
        output.emit(code, **report.model_dump(mode="json"))
    else:
        _print(report)
    if code != EXIT_OK:
        sys.exit(code)
