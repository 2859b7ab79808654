"""Fixtures for transport tests: identities, a verifier, policies and a pair of transports on loopback.

``attest`` picks the trust layer: the trust helper's real sim backend (``fldsl.runtime.attestation``) when
it is importable, otherwise test certificates judged by :class:`FakeVerifier` (an allow-list of
"attested" certificate fingerprints), so the transport is testable on its own.
"""

from __future__ import annotations

import datetime
import hashlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fldsl.runtime.transport import Addresses, NodeAddress, Transport

from fldsl.artifacts import AttestationRequirement, Flow, PeerRef, Policy, TensorSpec

A = "media.trainer"
B = "shop.trainer"


@dataclass(frozen=True)
class TestIdentity:
    key_pem: bytes
    cert_pem: bytes
    cert_der: bytes


def make_test_identity(node_id: str) -> TestIdentity:
    """A fresh ECDSA P-256 key and self-signed certificate (CN + SAN DNS = node id), like RA-TLS's."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(node_id)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return TestIdentity(key_pem, cert.public_bytes(serialization.Encoding.PEM),
                        cert.public_bytes(serialization.Encoding.DER))


class FakeRefused(Exception):
    """Shaped like the trust layer's PeerRefused (field, expected, actual)."""

    def __init__(self, field: str, expected: str, actual: str) -> None:
        super().__init__(f"{field}: expected {expected}, got {actual}")
        self.field = field
        self.expected = expected
        self.actual = actual


@dataclass
class Verdict:
    node_id: str
    summary: str


@dataclass
class FakeVerifier:
    """Accepts a certificate whose fingerprint was registered as attested for the node it claims."""

    attested: dict[str, str] = field(default_factory=dict)  # sha256(DER) -> node id

    def attest(self, ident: TestIdentity, node_id: str) -> None:
        self.attested[hashlib.sha256(ident.cert_der).hexdigest()] = node_id

    def verify(self, cert_pem: bytes, expect_node: str | None) -> Verdict:
        cert = x509.load_pem_x509_certificate(cert_pem)
        fp = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        node = self.attested.get(fp)
        if node is None:
            raise FakeRefused("mr_enclave", "ab12" * 16, "cd34" * 16)
        if expect_node is not None and node != expect_node:
            raise FakeRefused("node", expect_node, node)
        return Verdict(node, f"{cn} (test attestation)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flow(
    fid: str, src: str, dst: str, spec: TensorSpec | None, max_bytes: int, kind: str = "activation",
) -> Flow:
    return Flow(id=fid, tensor=fid.rsplit(":", 1)[-1], kind=kind, src=src, dst=dst, spec=spec,
                max_bytes=max_bytes, rule=f"allow {src.split('.')[0]} -> {dst.split('.')[0]}: {fid}")


def pair_flows() -> list[Flow]:
    big = 64 * 1024 * 1024
    return [
        flow("act", A, B, TensorSpec(shape=[None, 16], dtype="float32"), big),
        flow("grad", B, A, TensorSpec(shape=[None, 16], dtype="float32"), big),
        flow("weights", A, B, None, big, kind="weights"),
        flow("psi", A, B, None, 1 << 20, kind="psi"),
        flow("psi_back", B, A, None, 1 << 20, kind="psi"),
        flow("small", A, B, TensorSpec(shape=[4], dtype="int64"), 32),
    ]


def policy_for(node: str, flows: list[Flow], max_message_bytes: int = 4 * 1024 * 1024) -> Policy:
    other = B if node == A else A
    return Policy(pipeline="t", node=node, attestation=AttestationRequirement(mode="sim"),
                  accept_peers=[other], flows=[f for f in flows if node in (f.src, f.dst)],
                  max_message_bytes=max_message_bytes)


def make_addresses() -> Addresses:
    return Addresses({n: NodeAddress(host="127.0.0.1", port=free_port(), bootstrap_port=free_port())
                      for n in (A, B)})


@dataclass
class Pair:
    a: Transport
    b: Transport
    verifier: FakeVerifier
    addresses: Addresses
    ids: dict[str, TestIdentity]


def make_transport(node: str, ident: TestIdentity, verifier: FakeVerifier, addresses: Addresses,
                   flows: list[Flow] | None = None, connect_timeout_s: float = 20.0,
                   max_message_bytes: int = 4 * 1024 * 1024) -> Transport:
    other = B if node == A else A
    return Transport(
        node_id=node, policy=policy_for(node, pair_flows() if flows is None else flows, max_message_bytes),
        peers=[PeerRef(id=other, party=other.split(".")[0], dial=(node == A))],
        identity=ident, verifier=verifier, addresses=addresses, connect_timeout_s=connect_timeout_s)


@pytest.fixture
def pair() -> Iterator[Pair]:
    """A (dialer, media.trainer) and B (acceptor, shop.trainer), attested and connected."""
    verifier = FakeVerifier()
    ids = {n: make_test_identity(n) for n in (A, B)}
    for n, ident in ids.items():
        verifier.attest(ident, n)
    addresses = make_addresses()
    a = make_transport(A, ids[A], verifier, addresses)
    b = make_transport(B, ids[B], verifier, addresses)
    a.start()
    b.start()
    try:
        yield Pair(a, b, verifier, addresses, ids)
    finally:
        a.close()
        b.close()
