"""The writer of a node's audit record (format: ``fldsl.auditlog``; verifier: ``fldsl.runtime.audit_verify``).

Every message a link sends or receives, every attestation of the peer, every refusal, and the node's
checkpoints and exports become a record: hash-chained per file, signed with the node's current RA-TLS key
(whose certificate, quote inside, is stored in ``certs/``), sealed line by line with the node's sealing key.
Records are appended and flushed as they happen (a crash loses at most the line being written). Payload
bytes never enter a record, only their SHA-256; the key never leaves this process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fldsl.auditlog import (
    CERTS,
    GENESIS,
    NODE_CHAIN,
    SUFFIX,
    AuditFileHeader,
    AuditRecord,
    Event,
    FlowGrant,
    PeerIdentity,
    PolicyHead,
)
from fldsl.runtime.sealing import LineSealer, SealError

log = logging.getLogger("fldsl.audit")

SEAL_LABEL = b"fldsl-audit/1"


def audit_dir(run_dir: Path, node_id: str) -> Path:
    return Path(run_dir) / "audit" / node_id


def cert_sha256(cert_pem: bytes) -> str:
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def peer_identity(cert_pem: bytes) -> PeerIdentity:
    """What the pinned certificate of a verified peer says about it (its quote's measurement)."""
    from fldsl.runtime.attestation.ratls import parse_certificate

    ev = parse_certificate(cert_pem)
    return PeerIdentity(node=ev.node_id or ev.subject_cn or "?",
                        cert_sha256=hashlib.sha256(ev.cert_der).hexdigest(),
                        measurement=ev.quote.mr_enclave.hex(), simulated=bool(ev.quote.is_simulated))


class _Signer:
    """The node's current RA-TLS key and its certificate's fingerprint (swapped at renewal)."""

    def __init__(self, certs: Path) -> None:
        self._certs = certs
        self._lock = threading.Lock()
        self._key: ec.EllipticCurvePrivateKey | None = None
        self.fingerprint = ""

    def use(self, key_pem: bytes, cert_pem: bytes) -> None:
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the RA-TLS key is not an EC key; the audit record signs with ECDSA")
        fp = cert_sha256(cert_pem)
        self._certs.mkdir(parents=True, exist_ok=True)
        path = self._certs / f"{fp}.pem"
        if not path.exists():
            path.write_bytes(cert_pem)
        with self._lock:
            self._key, self.fingerprint = key, fp

    def sign(self, digest_hex: str) -> tuple[str, str]:
        import base64

        with self._lock:
            key, fp = self._key, self.fingerprint
        if key is None:
            raise RuntimeError("audit record has no signing identity yet")
        sig = key.sign(bytes.fromhex(digest_hex), ec.ECDSA(hashes.SHA256()))
        return fp, base64.b64encode(sig).decode()


class AuditError(Exception):
    """The audit record could not be written: the node stops (a run without its record is not allowed)."""


class _Writer:
    """The one thread that signs, seals and writes a node's records, in the order they were handed over.

    The link's threads only hash the payload (while its buffer is theirs) and queue the fields. The writer
    wakes at most every ``_BATCH_S``, writes what accumulated and signs only the last record of each file in
    the batch: its hash covers every earlier record through the chain, so one ECDSA signature vouches for the
    batch, and neither the signing nor a thread wake-up per message sits on the send and receive paths.
    Files are flushed after each batch; a crash loses at most the last ``_BATCH_S`` of records."""

    def __init__(self, node: str) -> None:
        self._items: list[tuple[AuditChain, Event, float, dict[str, Any]]] = []
        self._cv = threading.Condition()
        self._stopping = False
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"audit-{node}", daemon=True)
        self._thread.start()

    def put(self, chain: AuditChain, event: Event, fields: dict[str, Any]) -> None:
        with self._cv:
            while len(self._items) >= _QUEUE_MAX and self.failure is None:
                self._cv.wait(0.5)  # back-pressure: the disk stalls, the run waits rather than lose records
            if self.failure is not None:
                raise AuditError(f"the audit record cannot be written: {self.failure}")
            self._items.append((chain, event, time.time(), fields))
            if len(self._items) == 1:
                self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._items and not self._stopping:
                    self._cv.wait()
                if not self._items:
                    return
                stopping = self._stopping
            if not stopping:
                time.sleep(_BATCH_S)  # let a batch gather
            with self._cv:
                batch, self._items = self._items, []
                self._cv.notify_all()
            try:
                self._write(batch)
            except Exception as e:  # disk full, a closed file: every later append raises (fail closed)
                log.exception("audit: writing the record failed")
                with self._cv:
                    self.failure = e
                    self._cv.notify_all()
                return

    @staticmethod
    def _write(batch: list[tuple[AuditChain, Event, float, dict[str, Any]]]) -> None:
        last = {id(chain): i for i, (chain, *_) in enumerate(batch)}
        for i, (chain, event, when, fields) in enumerate(batch):
            chain.write(event, when, fields, sign=last[id(chain)] == i)
        for chain in {id(c): c for c, *_ in batch}.values():
            chain.flush()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout)


# How long the writer lets records gather before it writes and signs them.
_BATCH_S = 0.01
# Records queued and not yet written, at most (a producer waits beyond): bounds memory if the disk stalls.
_QUEUE_MAX = 8192


class AuditChain:
    """One append-only, hash-chained, signed and sealed record file. ``append`` is thread-safe (it queues);
    ``write`` runs on the writer thread only."""

    def __init__(self, path: Path, *, node: str, chain: str, sealer: LineSealer, signer: _Signer,
                 writer: _Writer) -> None:
        self.path = path
        self.node = node
        self.chain = chain
        self._sealer = sealer
        self._signer = signer
        self._writer = writer
        self._seq, self._prev = 0, GENESIS
        if path.exists() and path.stat().st_size:
            self._resume()
        else:
            head = AuditFileHeader(node=node, chain=chain, key_id=sealer.key_id)
            path.write_text(head.model_dump_json() + "\n")
        self._f = open(path, "ab")  # kept open for the run, closed by close()

    def _resume(self) -> None:
        """A restarted node (``--run-dir`` resume) continues its chain after its last SIGNED record: the
        records after it (the last batch before a crash) were never signed, so the host could have
        rewritten them; the new records do not vouch for them (the verifier reports them as unsigned)."""
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):  # a line cut by the crash: junk that opens for no one
            log.warning("audit: %s ends in a partial line (the node stopped while writing it); dropped",
                        self.path)
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
        lines = [x for x in data.split(b"\n")[1:] if x.strip()]
        for line in reversed(lines):
            try:
                rec = AuditRecord.model_validate_json(self._sealer.open(self.chain, line))
            except (SealError, ValueError):
                continue
            if rec.signed and _signature_verifies(self.path.parent / CERTS / f"{rec.signer}.pem", rec):
                self._seq, self._prev = rec.seq + 1, rec.hash
                return

    def append(self, event: Event, **fields: Any) -> None:
        self._writer.put(self, event, fields)

    def write(self, event: Event, when: float, fields: dict[str, Any], *, sign: bool) -> None:
        """Append one record (writer thread). ``sign``: the last of its file in a batch (see _Writer)."""
        if "file" in fields:  # a checkpoint or export: its digest, read here, off the training thread
            fields = dict(fields)
            fields["digest"] = _file_digest_or_none(Path(fields.pop("file")))
        rec = AuditRecord(seq=self._seq, prev=self._prev, time=when, node=self.node, chain=self.chain,
                          event=event, signer=self._signer.fingerprint, signed=sign, **fields)
        rec.hash = rec.compute_hash()
        if sign:
            signer, rec.sig = self._signer.sign(rec.hash)
            if signer != rec.signer:  # renewed between the two reads: sign again under the new one
                rec.signer = signer
                rec.hash = rec.compute_hash()
                _, rec.sig = self._signer.sign(rec.hash)
        self._f.write(self._sealer.seal(self.chain, rec.model_dump_json().encode()) + b"\n")
        self._seq, self._prev = rec.seq + 1, rec.hash

    def flush(self) -> None:
        self._f.flush()

    def close_file(self) -> None:
        self._f.close()


def _signature_verifies(cert_path: Path, rec: AuditRecord) -> bool:
    import base64

    try:
        key = x509.load_pem_x509_certificate(cert_path.read_bytes()).public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            return False
        key.verify(base64.b64decode(rec.sig), bytes.fromhex(rec.hash), ec.ECDSA(hashes.SHA256()))
    except (OSError, ValueError, InvalidSignature):
        return False
    return True


def _digest(segments: Iterable[Any]) -> str:
    h = hashlib.sha256()
    for s in segments:
        h.update(s)
    return h.hexdigest()


class LinkAudit:
    """What a ``PeerLink`` calls: one chain per peer, with the peer's identity as last attested."""

    def __init__(self, chain: AuditChain, guard_flows: dict[str, Any]) -> None:
        self.chain = chain
        self._flows = guard_flows
        self._peer: PeerIdentity | None = None
        self._counts = {"send": 0, "recv": 0, "refusal": 0}

    def attested(self, cert_pem: bytes) -> None:
        try:
            self._peer = peer_identity(cert_pem)
        except Exception as e:  # the verifier accepted it: a parse failure here is a bug, recorded as such
            log.error("audit: cannot read the verified certificate of %s: %s", self.chain.chain, e)
            return
        self.chain.append("attest", peer=self._peer)

    def message(self, direction: Literal["send", "recv"], flow: str, step: int, kind: str,
                specs: list[tuple[str, tuple[int, ...]]], nbytes: int, segments: Iterable[Any]) -> None:
        grant = self._flows.get(flow)
        self._counts[direction] += 1
        self.chain.append(
            direction, flow=flow, step=step, kind=kind, dtypes=[d for d, _ in specs],
            shapes=[list(s) for _, s in specs], nbytes=nbytes, digest=_digest(segments),
            rule=getattr(grant, "rule", None), peer=self._peer)

    def refused(self, direction: str, flow: str, reason: str) -> None:
        self._counts["refusal"] += 1
        self.chain.append("refusal", direction=direction, flow=flow or None, detail=reason[:2000],
                           peer=self._peer)

    def close(self) -> None:
        self.chain.append("close", detail=json.dumps(self._counts, sort_keys=True))


def _grant(f: Any) -> FlowGrant:
    spec = f.spec
    dims = "" if spec is None else ", ".join("?" if d is None else str(d) for d in spec.shape)
    text = "bytes" if spec is None else f"{spec.dtype}[{dims}]"
    return FlowGrant(id=f.id, src=f.src, dst=f.dst, spec=text, rule=f.rule, max_bytes=f.max_bytes)


class AuditLog:
    """A node's audit folder: a chain per peer link, ``node`` for its own events, the signing certs."""

    def __init__(
        self, run_dir: Path, *, node_id: str, sealing_root: bytes, policy: Any, identity: Any,
    ) -> None:
        self.dir = audit_dir(run_dir, node_id)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.node = node_id
        self._policy = policy
        self._policy_sha = hashlib.sha256(policy.model_dump_json().encode()).hexdigest()
        self._sealer = LineSealer(sealing_root, node_id, SEAL_LABEL)
        self._signer = _Signer(self.dir / CERTS)
        self._signer.use(identity.key_pem, identity.cert_pem)
        self._links: dict[str, LinkAudit] = {}
        self._writer = _Writer(node_id)
        self._closed = False
        self._node = self._chain(NODE_CHAIN)
        self._node.append("open", policy=PolicyHead(pipeline=getattr(policy, "pipeline", ""),
                                                     policy_sha256=self._policy_sha, flows=[]))

    def _chain(self, name: str) -> AuditChain:
        return AuditChain(self.dir / f"{name}{SUFFIX}", node=self.node, chain=name, sealer=self._sealer,
                          signer=self._signer, writer=self._writer)

    def set_identity(self, identity: Any) -> None:
        """A renewed RA-TLS identity signs every later record."""
        self._signer.use(identity.key_pem, identity.cert_pem)

    def link(self, peer: str, flows: dict[str, Any]) -> LinkAudit:
        if peer not in self._links:
            chain = self._chain(peer)
            mine = [_grant(f) for f in flows.values() if {f.src, f.dst} == {self.node, peer}]
            chain.append("open", policy=PolicyHead(pipeline=getattr(self._policy, "pipeline", ""),
                                                    policy_sha256=self._policy_sha, flows=mine))
            self._links[peer] = LinkAudit(chain, flows)
        return self._links[peer]

    def node_event(self, event: Literal["checkpoint", "export"], *, path: str, detail: str) -> None:
        """A checkpoint or an export: the file's digest, so the auditor can tie a file to this run."""
        self._node.append(event, file=path, detail=f"{detail} {path}".strip())

    def close(self) -> None:
        """Closing records, then wait until everything queued is written (call after the links closed)."""
        if self._closed:
            return
        self._closed = True
        for link in self._links.values():
            link.close()
        self._node.append("close", detail="{}")
        self._writer.stop()
        for chain in [self._node, *(link.chain for link in self._links.values())]:
            chain.close_file()


def _file_digest_or_none(path: Path) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:  # pruned already (checkpoints keep the last few): the record says so by its absence
        return None
    return h.hexdigest()


class AuditingProgress:
    """Wraps a node's progress reporter: checkpoint and export events also go to the audit record."""

    def __init__(self, inner: Any, audit: AuditLog) -> None:
        self._inner = inner
        self._audit = audit

    def emit(self, event: str, **fields: Any) -> None:
        kind: Literal["checkpoint", "export"] | None = \
            "checkpoint" if event == "checkpoint" else "export" if event == "export" else None
        if kind is not None and "path" in fields:
            what = f"step {fields['step']}" if "step" in fields else str(fields.get("name", ""))
            try:
                self._audit.node_event(kind, path=str(fields["path"]), detail=what)
            except Exception:  # the run goes on; the missing record shows in the audit
                log.exception("audit: could not record %s", event)
        self._inner.emit(event, **fields)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
