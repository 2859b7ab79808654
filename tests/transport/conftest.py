"""Fixtures for transport tests: identities, a verifier, policies and a pair of transports on loopback.

Peers are attested with the trust layer's real sim backend (``fldsl.runtime.attestation``: a throw-away
deployment from ``trust_init``). ``make_test_identity`` / ``FakeVerifier`` are plain self-signed
certificates and an allow-list verifier, for the TLS-level tests that must not depend on the trust layer.
"""

from __future__ import annotations

import datetime
import hashlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fldsl.artifacts import AttestationRequirement, Flow, Identity, PeerRef, Pins, Policy, TensorSpec
from fldsl.runtime.transport import Addresses, NodeAddress, Transport

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
class Trust:
    """One deployment's trust material for A and B (real sim attestation from fldsl.runtime.attestation)."""

    dir: Path
    pins: Pins
    mr: dict[str, bytes]

    def identity(self, node: str, *, mr_enclave: bytes | None = None, debug: bool = False,
                 validity: datetime.timedelta | None = None) -> Any:
        from fldsl.runtime.attestation.ratls import DEFAULT_VALIDITY, make_identity
        from fldsl.runtime.attestation.sim import SimDeployment

        dep = SimDeployment.load(self.dir)
        backend = dep.backend(mr_enclave=mr_enclave or self.mr[node], isv_prod_id=1, isv_svn=1, debug=debug)
        return make_identity(backend, node_id=node, pins_digest=self.pins.digest(),
                             validity=validity or DEFAULT_VALIDITY)

    def verifier(self) -> Any:
        from fldsl.runtime.attestation.sim import SimDeployment
        from fldsl.runtime.attestation.verify import PeerVerifier

        dep = SimDeployment.load(self.dir)
        return PeerVerifier(self.pins, AttestationRequirement(mode="sim"),
                            sim_roots=dict.fromkeys(self.pins.parties(), dep.root_cert_pem),
                            own_pins_digest=self.pins.digest())


def make_trust(directory: Path, nodes: tuple[str, ...] = (A, B)) -> Trust:
    from fldsl.runtime.attestation.sim import trust_init

    trust_init(directory)
    mr = {n: hashlib.sha256(f"code of {n}".encode()).digest() for n in nodes}
    pins = Pins(pipeline="t", nodes={
        n: Identity(mr_enclave=[m.hex()], isv_prod_id=1, isv_svn_min=1) for n, m in mr.items()})
    return Trust(directory, pins, mr)


@pytest.fixture(scope="session")
def trust(tmp_path_factory: pytest.TempPathFactory) -> Trust:
    return make_trust(tmp_path_factory.mktemp("trust"))


@dataclass
class Pair:
    a: Transport
    b: Transport
    trust: Trust
    addresses: Addresses


def make_transport(node: str, ident: Any, verifier: Any, addresses: Addresses,
                   flows: list[Flow] | None = None, connect_timeout_s: float = 20.0,
                   max_message_bytes: int = 4 * 1024 * 1024, renew_identity: Any = None,
                   security: Any = None) -> Transport:
    other = B if node == A else A
    return Transport(
        **({"security": security} if security is not None else {}),
        node_id=node, policy=policy_for(node, pair_flows() if flows is None else flows, max_message_bytes),
        peers=[PeerRef(id=other, party=other.split(".")[0], dial=(node == A))],
        identity=ident, verifier=verifier, addresses=addresses, connect_timeout_s=connect_timeout_s,
        renew_identity=renew_identity)


def start_pair(trust: Trust, flows_a: list[Flow] | None = None, flows_b: list[Flow] | None = None) -> Pair:
    addresses = make_addresses()
    a = make_transport(A, trust.identity(A), trust.verifier(), addresses, flows_a)
    b = make_transport(B, trust.identity(B), trust.verifier(), addresses, flows_b)
    a.start()
    b.start()
    return Pair(a, b, trust, addresses)


@pytest.fixture
def pair(trust: Trust) -> Iterator[Pair]:
    """A (dialer, media.trainer) and B (acceptor, shop.trainer), sim-attested by the real trust layer."""
    p = start_pair(trust)
    try:
        yield p
    finally:
        p.a.close()
        p.b.close()
