"""``fldsl audit``'s report: verify every record file found, match both ends of each link message by message,
and say per boundary what crossed against what the policy allowed (the flows each record's ``open`` names).

A message counts as crossed when the sender's and the receiver's records agree on (flow, step, payload
digest, bytes); one that only one side recorded is a finding that names the record. The report is a
pydantic model (``--json`` prints it as is).
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from fldsl.auditlog import CERTS, NODE_CHAIN, SUFFIX, AuditRecord, FlowGrant, spec_text
from fldsl.runtime.audit_verify import CertBook, Chain, ChainReader, Finding, SignerInfo

# Role step keys at and above this are evaluation / control keys, not training steps (roles.common).
STEP_KEYS = 1 << 48


class AuditInputError(Exception):
    """Bad input (no record found, a key missing): the CLI exits 2 with the message."""


class FlowCrossing(BaseModel):
    flow: str
    src: str
    dst: str
    allowed: str | None  # the policy's spec, or None: not a flow of the link's policy
    rule: str | None
    max_bytes: int | None
    shapes: list[str]  # distinct wire specs seen
    sent: int | None  # None: the sender's record was not given
    received: int | None
    matched: int | None  # both ends recorded it, same digest
    bytes: int
    training_steps: int  # distinct training steps among the crossings


class Refusal(BaseModel):
    node: str
    peer: str
    record: int
    direction: str
    flow: str | None
    reason: str


class Boundary(BaseModel):
    src: str
    dst: str
    cross_party: bool
    flows: list[FlowCrossing]


class NodeEvent(BaseModel):
    node: str
    record: int
    event: str
    detail: str
    digest: str | None


class AuditReport(BaseModel):
    ok: bool
    nodes: list[str]
    files: int
    records: int
    signers: list[SignerInfo]
    boundaries: list[Boundary]
    refusals: list[Refusal]
    events: list[NodeEvent]
    findings: list[Finding]


@dataclass
class PartyKeys:
    """Per party: the sealing root that opens its files and (optional) its sim root."""

    sealing: dict[str, bytes]
    sim_roots: dict[str, bytes]


def find_nodes(run_dirs: list[Path]) -> dict[str, Path]:
    nodes: dict[str, Path] = {}
    for rd in run_dirs:
        base = rd / "audit"
        if not base.is_dir():
            raise AuditInputError(f"{rd}: no audit/ folder (not a run directory, or a run from before "
                                  "audit records)")
        for folder in sorted(p for p in base.iterdir() if p.is_dir()):
            if folder.name in nodes:
                raise AuditInputError(f"node {folder.name} appears in both {nodes[folder.name]} and {folder}")
            nodes[folder.name] = folder
    if not nodes:
        raise AuditInputError(f"no node records under {', '.join(str(r) for r in run_dirs)}")
    return nodes


def _party(node: str) -> str:
    return node.split(".", 1)[0]


def read_all(nodes: dict[str, Path], keys: PartyKeys) -> tuple[dict[tuple[str, str], Chain], list[Finding],
                                                                 list[SignerInfo]]:
    chains: dict[tuple[str, str], Chain] = {}
    findings: list[Finding] = []
    signers: list[SignerInfo] = []
    for node, folder in nodes.items():
        root = keys.sealing.get(_party(node))
        if root is None:
            raise AuditInputError(f"no sealing key for party {_party(node)} (node {node}); give its trust "
                                  "folder with --trust or the key with --key PARTY=FILE")
        certs = CertBook(node, folder / CERTS, keys.sim_roots.get(_party(node)))
        for path in sorted(folder.glob(f"*{SUFFIX}")):
            reader = ChainReader(path, node, root, certs)
            chain = reader.read()
            findings += reader.findings
            if chain.readable:  # else: as if that side's record were not given (its error says why)
                chains[(node, chain.name)] = chain
        signers += certs.signers()
    return chains, findings, signers


def _key(r: AuditRecord) -> tuple[str | None, int | None, str | None, int]:
    return (r.flow, r.step, r.digest, r.nbytes)


def match_link(sender: Chain | None, receiver: Chain | None, src: str, dst: str) -> tuple[
        dict[str, list[tuple[AuditRecord, bool]]], list[Finding]]:
    """Per flow: each crossing (the receiver's record when present, else the sender's) and whether both
    ends recorded it; the findings name the record only one end has."""
    sends = [(p, r) for p, r in (sender.records if sender else []) if r.event == "send"]
    recvs = [(p, r) for p, r in (receiver.records if receiver else []) if r.event == "recv"]
    findings: list[Finding] = []
    out: dict[str, list[tuple[AuditRecord, bool]]] = defaultdict(list)
    if sender is None or receiver is None:
        for _, r in sends or recvs:
            out[r.flow or "?"].append((r, False))
        return out, findings
    pending: dict[tuple, deque[tuple[int, AuditRecord]]] = defaultdict(deque)
    for p, r in sends:
        pending[_key(r)].append((p, r))
    unsigned = {_key(r) for _, r in sender.unsigned if r.event == "send"}
    matched: set[int] = set()
    matched_keys: set[tuple] = set()
    lost: list[tuple[int, AuditRecord]] = []
    for p, r in recvs:
        q = pending.get(_key(r))
        if q:
            q.popleft()
            matched.add(p)
            matched_keys.add(_key(r))
            out[r.flow or "?"].append((r, True))
        else:
            lost.append((p, r))
    stopped = _stopped(sender)
    tails = _connection_tails(receiver, matched) if stopped else set()
    for p, r in lost:
        what = f"received {r.flow} step {r.step} ({r.nbytes} bytes, digest {str(r.digest)[:16]})"
        if _key(r) in unsigned:  # the sender recorded it just before it stopped, and never signed that
            findings.append(Finding(severity="warning", node=dst, chain=src, record=p, message=(
                f"{what}: {src}'s record of sending it is among those it never signed (it stopped)")))
        elif p in tails:
            findings.append(Finding(severity="warning", node=dst, chain=src, record=p, message=(
                f"{what} in the last moments of a connection {src} dropped without closing; {src}'s "
                "record of sending it was still unwritten when it stopped")))
        elif stopped and _key(r) in matched_keys:  # the same bytes again: a resend after a restart
            findings.append(Finding(severity="warning", node=dst, chain=src, record=p, message=(
                f"{what} twice, {src}'s record has it once: {src} sent it again after it restarted, and "
                "its record of the first sending was still unwritten when it stopped")))
        else:
            findings.append(Finding(severity="error", node=dst, chain=src, record=p, message=(
                f"{what} that {src}'s record has no send of (its record altered or cut, or this one "
                "forged)")))
        out[r.flow or "?"].append((r, False))
    for q in pending.values():
        for p, r in q:
            findings.append(Finding(
                severity="warning", node=src, chain=dst, record=p,
                message=f"sent {r.flow} step {r.step} ({r.nbytes} bytes) that {dst}'s record never received "
                        "(lost at a reconnect, or the receiver's record is incomplete)"))
            out[r.flow or "?"].append((r, False))
    return out, findings


def _stopped(chain: Chain) -> bool:
    """The node behind ``chain`` stopped without closing at least once (killed, then maybe resumed)."""
    opens = sum(1 for _, r in chain.records if r.event == "open")
    return bool(chain.unsigned) or opens > 1 or not chain.closed


def _connection_tails(receiver: Chain, matched: set[int]) -> set[int]:
    """Positions of receive records after which, up to the peer's next attestation (a new connection) or the
    end, no received message matched the sender's record: what arrived just before the sender stopped."""
    tails: set[int] = set()
    run: list[int] = []
    for p, r in receiver.records:
        if r.event == "attest":
            tails.update(run)
            run = []
        elif r.event == "recv":
            run = [] if p in matched else [*run, p]
    tails.update(run)
    return tails


def _grants(*chains: Chain | None) -> dict[str, FlowGrant]:
    grants: dict[str, FlowGrant] = {}
    for c in chains:
        for _, r in (c.records if c else []):
            if r.event == "open" and r.policy is not None:
                grants.update({g.id: g for g in r.policy.flows})
    return grants


def _crossings(flows: dict[str, list[tuple[AuditRecord, bool]]], grants: dict[str, FlowGrant], src: str,
               dst: str, sender: Chain | None, receiver: Chain | None) -> list[FlowCrossing]:
    out = []
    ids = sorted(set(flows) | {g.id for g in grants.values() if g.src == src and g.dst == dst})
    for fid in ids:
        items = flows.get(fid, [])
        g = grants.get(fid)
        recs = [r for r, _ in items]
        out.append(FlowCrossing(
            flow=fid, src=src, dst=dst, allowed=g.spec if g else None, rule=g.rule if g else None,
            max_bytes=g.max_bytes if g else None,
            shapes=sorted({spec_text(d, s) for r in recs for d, s in zip(r.dtypes, r.shapes, strict=False)}
                          or ({"bytes"} if recs else set())),
            sent=None if sender is None else sum(1 for r in recs if r.event == "send") + sum(
                1 for r, both in items if both),
            received=None if receiver is None else sum(1 for r in recs if r.event == "recv"),
            matched=sum(1 for _, both in items if both) if sender and receiver else None,
            bytes=sum(r.nbytes for r in recs),
            training_steps=len({r.step for r in recs if r.step is not None and r.step < STEP_KEYS})))
    return out


def _identity_findings(chains: dict[tuple[str, str], Chain], signers: list[SignerInfo]) -> list[Finding]:
    """Every certificate that signed a node's link records must be one its peer verified at a handshake
    (when the peer's records are given): the peer checked that certificate's quote against the pins."""
    attested: dict[str, set[str]] = defaultdict(set)  # cert -> peers that attested it
    for (node, _), c in chains.items():
        for _, r in c.records:
            if r.event == "attest" and r.peer is not None:
                attested[r.peer.cert_sha256].add(node)
    for s in signers:
        s.attested_by = sorted(attested.get(s.cert_sha256, set()))
    findings = []
    for (node, name), c in chains.items():
        if name == NODE_CHAIN or (name, node) not in chains:
            continue
        for fp in sorted({r.signer for _, r in c.records}):
            if name not in attested.get(fp, set()):
                findings.append(Finding(
                    severity="warning", node=node, chain=name, record=None,
                    message=f"signed with certificate {fp[:16]}, which {name}'s record never shows it "
                            "attested (a renewal it did not see, or a key that no peer verified)"))
    return findings


def build_report(run_dirs: list[Path], keys: PartyKeys) -> AuditReport:
    nodes = find_nodes(run_dirs)
    chains, findings, signers = read_all(nodes, keys)
    links = sorted({(a, b) for (a, b) in chains if b != NODE_CHAIN} | {(b, a) for (a, b) in chains
                                                                     if b != NODE_CHAIN})
    boundaries, refusals, events = [], [], []
    for src, dst in links:
        sender, receiver = chains.get((src, dst)), chains.get((dst, src))
        flows, found = match_link(sender, receiver, src, dst)
        findings += found
        crossings = _crossings(flows, _grants(sender, receiver), src, dst, sender, receiver)
        if crossings:
            boundaries.append(Boundary(src=src, dst=dst, cross_party=_party(src) != _party(dst),
                                       flows=crossings))
    for (node, name), c in sorted(chains.items()):
        for pos, r in c.records:
            if r.event == "refusal":
                refusals.append(Refusal(node=node, peer=name, record=pos, direction=r.direction or "?",
                                        flow=r.flow, reason=r.detail or ""))
            elif r.event in ("checkpoint", "export"):
                events.append(NodeEvent(node=node, record=pos, event=r.event, detail=r.detail or "",
                                        digest=r.digest))
    findings += _identity_findings(chains, signers)
    return AuditReport(
        ok=not any(f.severity == "error" for f in findings), nodes=sorted(nodes), files=len(chains),
        records=sum(len(c.records) for c in chains.values()), signers=signers, boundaries=boundaries,
        refusals=refusals, events=events, findings=findings)
