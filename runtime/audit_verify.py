"""Verifying audit records (``fldsl audit``): open, chain, signature and certificate checks per file.

Input: the ``audit/<node>/`` folders of one or more run directories and, per party, the sealing key that
opens its nodes' files (sim: ``sealing.key`` in the party's trust folder) and, optionally, the party's sim
root to check each signing certificate's quote. Each problem is a :class:`Finding` that names the file
and the record's position (1 = the first record, on line 2 after the header). Matching the two ends of
each link and the per-boundary summary are in ``fldsl.runtime.audit_match``.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ValidationError

from fldsl.auditlog import FORMAT, GENESIS, SUFFIX, AuditFileHeader, AuditRecord
from fldsl.runtime.audit import SEAL_LABEL
from fldsl.runtime.sealing import LineSealer, SealError, key_id


class Finding(BaseModel):
    severity: Literal["error", "warning"]
    node: str
    chain: str
    record: int | None  # position in the file, 1-based; None: the file or the link as a whole
    message: str


class SignerInfo(BaseModel):
    node: str
    cert_sha256: str
    measurement: str
    simulated: bool
    quote: str  # how the certificate's quote was checked, in words
    attested_by: list[str] = []  # peers whose records show they verified this certificate at a handshake


@dataclass
class Chain:
    """One record file after verification: its readable, correctly chained and signed records."""

    node: str
    name: str
    path: Path
    records: list[tuple[int, AuditRecord]] = field(default_factory=list)  # (position, record)
    closed: bool = False
    readable: bool = True  # False: the file as a whole could not be read (its finding says why)
    # Intact records no signature covers because the node stopped before signing them: not evidence, but
    # the other end's record of the same message is then a warning, not a forgery.
    unsigned: list[tuple[int, AuditRecord]] = field(default_factory=list)


@dataclass
class _Cert:
    info: SignerInfo
    key: ec.EllipticCurvePublicKey | None
    problem: str | None


class CertBook:
    """The certificates in ``audit/<node>/certs/``, each checked once: its file name is its SHA-256, it
    names the node, its quote binds its key, and (when the party's sim root is known) the quote is genuine."""

    def __init__(self, node: str, folder: Path, sim_root: bytes | None) -> None:
        self.node = node
        self._folder = folder
        self._root = sim_root
        self._cache: dict[str, _Cert] = {}

    def get(self, fingerprint: str) -> _Cert:
        if fingerprint not in self._cache:
            self._cache[fingerprint] = self._load(fingerprint)
        return self._cache[fingerprint]

    def signers(self) -> list[SignerInfo]:
        return [c.info for c in self._cache.values() if c.problem is None]

    def _load(self, fp: str) -> _Cert:
        from fldsl.runtime.attestation.ratls import CertificateError, parse_certificate

        blank = SignerInfo(node=self.node, cert_sha256=fp, measurement="", simulated=False, quote="")
        path = self._folder / f"{fp}.pem"
        if not fp.isalnum() or not path.is_file():
            return _Cert(blank, None, f"its signing certificate {fp[:16]} is not in {self._folder}")
        try:
            ev = parse_certificate(path.read_bytes())
        except (CertificateError, ValueError) as e:
            return _Cert(blank, None, f"its signing certificate {fp[:16]} is malformed: {e}")
        if hashlib.sha256(ev.cert_der).hexdigest() != fp:
            return _Cert(blank, None, f"certificate file {path.name} does not hold the certificate it names")
        info = SignerInfo(node=self.node, cert_sha256=fp, measurement=ev.quote.mr_enclave.hex(),
                          simulated=ev.quote.is_simulated, quote=self._quote_verdict(ev))
        why = None
        if ev.node_id != self.node:
            why = f"certificate {fp[:16]} belongs to {ev.node_id}, not {self.node}"
        elif not (ev.self_signature_ok and ev.pubkey_hash_ok):
            why = (f"certificate {fp[:16]}: its quote does not bind its key "
                   f"({ev.binding_problem or 'bad self-signature'})")
        elif info.quote.startswith("FAILED"):
            why = f"certificate {fp[:16]}: {info.quote}"
        key = ev_key(ev.spki_der)
        return _Cert(info, key, why)

    def _quote_verdict(self, ev: object) -> str:
        from fldsl.runtime.attestation.ratls import CLOCK_SKEW
        from fldsl.runtime.attestation.sim import verify_sim_quote

        quote = ev.quote  # type: ignore[attr-defined]
        if not quote.is_simulated:
            return "real SGX quote (check it with `fldsl inspect`; not verified here)"
        if self._root is None:
            return "simulated quote, not checked (no sim root of the party given)"
        made = ev.not_before + CLOCK_SKEW  # type: ignore[attr-defined]
        verdict = verify_sim_quote(quote, self._root, now=made, whose="the party's")
        if not verdict.ok:
            return f"FAILED: {verdict.message}"
        return "SIMULATED quote, chains to the party's sim root"


def ev_key(spki_der: bytes) -> ec.EllipticCurvePublicKey | None:
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    key = load_der_public_key(spki_der)
    return key if isinstance(key, ec.EllipticCurvePublicKey) else None


def _signature_ok(cert: _Cert, rec: AuditRecord) -> bool:
    if cert.key is None:
        return False
    try:
        cert.key.verify(base64.b64decode(rec.sig, validate=True), bytes.fromhex(rec.hash),
                        ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


class ChainReader:
    """Reads one record file and reports every break with its position (see the module doc)."""

    def __init__(self, path: Path, node: str, root_key: bytes, certs: CertBook) -> None:
        self.chain = Chain(node=node, name=path.name.removesuffix(SUFFIX), path=path)
        self.findings: list[Finding] = []
        self._root_key = root_key
        self._certs = certs
        self._pending: list[tuple[int, AuditRecord]] = []  # intact, chained, waiting for a signed record
        self._proven: tuple[int, str] = (-1, GENESIS)
        self._bad_certs: set[str] = set()  # the last record a signature covers: (seq, hash)

    def _flag(self, pos: int | None, message: str, severity: Literal["error", "warning"] = "error") -> None:
        self.findings.append(Finding(severity=severity, node=self.chain.node, chain=self.chain.name,
                                     record=pos, message=message))

    def read(self) -> Chain:
        lines = self.chain.path.read_bytes().split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        if not lines or not self._header_ok(lines[0]):
            if not lines:
                self._flag(None, "empty file (no header)")
            self.chain.readable = False
            return self.chain
        sealer = LineSealer(self._root_key, self.chain.node, SEAL_LABEL)
        expect_seq: int = 0
        prev: str | None = GENESIS
        for pos, line in enumerate(lines[1:], start=1):
            rec = self._open(sealer, pos, line)
            if rec is None:
                self._drop_pending("an unreadable record follows them")
                prev = None  # the next record cannot be tied to an unreadable one: say so once, there
                continue
            expect_seq, prev = self._check(pos, rec, expect_seq, prev)
        self._drop_pending("no signed record follows them (the node stopped before its writer signed "
                           "them)", "warning")
        last = self.chain.records[-1][1] if self.chain.records else None
        self.chain.closed = last is not None and last.event == "close"
        if not self.chain.closed:
            self._flag(None, "the record does not end with its closing record: cut short (records "
                       "deleted at the end), or the node was stopped before it closed", "warning")
        return self.chain

    def _drop_pending(self, why: str, severity: Literal["error", "warning"] = "error") -> None:
        """Intact records that wait for a later signature which will now never cover them: not evidence."""
        if self._pending:
            first, last = self._pending[0][0], self._pending[-1][0]
            self._flag(first, f"records at positions {first}..{last} are not covered by a signature: {why}; "
                       "they are not counted", severity)
            if severity == "warning":
                self.chain.unsigned += self._pending
            self._pending = []

    def _header_ok(self, line: bytes) -> bool:
        try:
            head = AuditFileHeader.model_validate_json(line)
        except ValidationError:
            self._flag(None, f"not an audit record file (first line is not a {FORMAT} header)")
            return False
        if head.node != self.chain.node or head.chain != self.chain.name:
            self._flag(None, f"the file says it is {head.node}'s record of {head.chain}: moved or renamed")
            return False
        if head.key_id != key_id(self._root_key).hex():
            self._flag(None, f"the sealing key given for {self.chain.node}'s party is not the one that "
                       "sealed this file")
            return False
        return True

    def _open(self, sealer: LineSealer, pos: int, line: bytes) -> AuditRecord | None:
        try:
            plain = sealer.open(self.chain.name, line)
        except SealError as e:
            self._flag(pos, f"does not open: {e}")
            return None
        try:
            return AuditRecord.model_validate_json(plain)
        except ValidationError:
            self._flag(pos, "opens but is not a valid record (sealed by someone holding the key)")
            return None

    def _check(self, pos: int, rec: AuditRecord, expect_seq: int, prev: str | None) -> tuple[int, str]:
        intact = rec.compute_hash() == rec.hash
        if not intact:
            self._flag(pos, f"altered: its content does not match its hash (record {rec.seq}, {rec.event})")
        if rec.node != self.chain.node or rec.chain != self.chain.name:
            self._flag(pos, f"belongs to {rec.node}'s record of {rec.chain}: copied from another file")
            intact = False
        linked = False
        if self._is_resume(rec, expect_seq):
            # The node restarted (--run-dir resume) and continues after its last signed record; the
            # records it wrote after that one, just before it stopped, were never signed.
            self._drop_pending("the node stopped before signing them, and resumed after its last signed "
                               "record", "warning")
            linked = True
        elif rec.seq > expect_seq:
            self._flag(pos, f"records {expect_seq}..{rec.seq - 1} are missing before it (deleted)")
        elif rec.seq < expect_seq:
            self._flag(pos, f"out of order: record {rec.seq} comes after record {expect_seq - 1} "
                       "(reordered or duplicated)")
        elif prev is not None and rec.prev != prev:
            self._flag(pos, f"record {rec.seq} does not follow the record before it (chain broken: "
                       "reordered, or a record replaced)")
        else:
            linked = prev is not None
        if not (intact and linked):
            self._drop_pending("the chain breaks after them")
        if intact and rec.signed:
            if self._signed_ok(pos, rec):
                self.chain.records += [*self._pending, (pos, rec)]
                self._pending = []
                self._proven = (rec.seq, rec.hash)
            elif rec.signer in self._bad_certs:
                self._pending = []  # named already: nothing that certificate signs is counted
            else:
                self._drop_pending("the signature that should cover them does not verify")
        elif intact:
            self._pending.append((pos, rec))  # the next signed record of the batch vouches for it
        return max(expect_seq, rec.seq + 1), rec.hash

    def _is_resume(self, rec: AuditRecord, expect_seq: int) -> bool:
        return (rec.event == "open" and rec.seq < expect_seq and bool(self._pending)
                and (rec.seq - 1, rec.prev) == self._proven)

    def _signed_ok(self, pos: int, rec: AuditRecord) -> bool:
        cert = self._certs.get(rec.signer)
        if cert.problem is not None:
            if rec.signer not in self._bad_certs:  # once per certificate and file: the rest say the same
                self._bad_certs.add(rec.signer)
                self._flag(pos, f"record {rec.seq}: {cert.problem}; no record this certificate signs, "
                           "nor those its signatures cover, is counted")
            return False
        if not _signature_ok(cert, rec):
            self._flag(pos, f"record {rec.seq}: the signature does not verify with {self.chain.node}'s "
                       f"certificate {rec.signer[:16]} (forged, or re-signed with another key)")
            return False
        return True
