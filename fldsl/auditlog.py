"""The audit record format (``run_dir/audit/<node>/``): what the runtime writes and ``fldsl audit`` reads.

One folder per node: one hash-chained file per peer link (``<peer>.audit``) plus ``node.audit`` for the
node's own events (checkpoints, exports), and ``certs/<sha256>.pem``, every RA-TLS certificate whose key
signed a record (its quote inside). A record file is::

    line 1   AuditFileHeader (JSON, plaintext: what the file is and which sealing key opens it)
    line 2.. base64( nonce[12] ‖ AES-256-GCM(key, nonce, AuditRecord JSON, aad) )

``hash`` = SHA-256 of the record's canonical JSON without ``hash`` and ``sig``; it covers ``prev`` (the
previous record's hash) and ``seq``, so each signature vouches for the whole history up to its record.
``sig`` = ECDSA (the RA-TLS key, P-256/SHA-256) over ``hash``, DER, base64, on the records with ``signed``
(the last of each batch the writer wrote: it vouches for the records before it); ``signer`` names the
certificate. This module is pure format: no crypto, no I/O, shared by writer and verifier.
"""

from __future__ import annotations

import hashlib
import json
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict

FORMAT: Final = "fldsl-audit/1"
GENESIS = "0" * 64  # ``prev`` of a file's first record
NODE_CHAIN = "node"  # the chain of a node's own events (not a peer id: those contain a dot)
CERTS = "certs"
SUFFIX = ".audit"

Event = Literal["open", "attest", "send", "recv", "refusal", "checkpoint", "export", "close"]
Direction = Literal["send", "recv", "peer"]  # refusal: ours on send, ours on receive, the peer's of our send


class AuditFileHeader(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["fldsl-audit/1"] = FORMAT
    node: str
    chain: str
    key_id: str  # sealing.key_id(root).hex(): a wrong key is named as such, not as corruption


class PeerIdentity(BaseModel):
    """The peer as this node verified it at the handshake (from the certificate it pinned)."""

    model_config = ConfigDict(extra="forbid")

    node: str
    cert_sha256: str
    measurement: str  # MRENCLAVE, hex
    simulated: bool


class FlowGrant(BaseModel):
    """One flow of the link as the node's policy declared it when the run started."""

    model_config = ConfigDict(extra="forbid")

    id: str
    src: str
    dst: str
    spec: str  # e.g. float32[?, 64], or "bytes"
    rule: str
    max_bytes: int


class PolicyHead(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pipeline: str
    policy_sha256: str
    flows: list[FlowGrant]


class AuditRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seq: int
    prev: str
    time: float
    node: str
    chain: str
    event: Event
    flow: str | None = None
    step: int | None = None
    kind: str | None = None  # tensor | arrays | blob
    dtypes: list[str] = []
    shapes: list[list[int]] = []
    nbytes: int = 0
    digest: str | None = None  # SHA-256 of the payload as it went on the wire (sender and receiver agree)
    rule: str | None = None  # the policy rule that allowed it
    direction: Direction | None = None  # refusals only
    peer: PeerIdentity | None = None
    detail: str | None = None  # refusal reason, checkpoint/export path, close counts
    policy: PolicyHead | None = None  # "open" only
    signer: str  # SHA-256 of the certificate of the key the node held when it wrote the record
    # Whether ``sig`` signs this record. The writer signs the last record of each batch it writes; that
    # signature covers every earlier record through the chain of hashes. In the hash, so a signature
    # cannot be stripped to pass a rewritten record off as one still waiting for its batch's signature.
    signed: bool = True
    hash: str = ""
    sig: str = ""

    def canonical(self) -> bytes:
        body = self.model_dump(exclude={"hash", "sig"}, mode="json")
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def compute_hash(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()


def spec_text(dtype: str, shape: list[int]) -> str:
    return f"{dtype}[{', '.join(str(d) for d in shape)}]"
