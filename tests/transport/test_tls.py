"""TLS-level facts the transport relies on, independent of the trust layer's certificate profile."""

from __future__ import annotations

import hashlib

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from fldsl.runtime.transport.server import CertRegistry, cert_fingerprint

from .conftest import A, B, FakeVerifier, make_addresses, make_test_identity, make_transport


def test_self_signed_ca_false_leaf_works_as_its_own_pinned_root() -> None:
    """BoringSSL (grpcio 1.85) accepts a plain CA:FALSE self-signed leaf, without keyUsage/EKU, as the
    single trust root on both sides of the mutual-TLS channel."""
    verifier = FakeVerifier()
    ids = {n: make_test_identity(n) for n in (A, B)}
    for n, ident in ids.items():
        verifier.attest(ident, n)
    addresses = make_addresses()
    a = make_transport(A, ids[A], verifier, addresses)
    b = make_transport(B, ids[B], verifier, addresses)
    b.start()
    a.start()
    try:
        a.link(B, timeout=15).send("act", 0, np.ones((3, 16), np.float32))
        assert b.link(A, timeout=15).recv("act", 0, timeout=10).sum() == 48
    finally:
        a.close()
        b.close()


def test_registry_pins_exactly_one_certificate_per_peer() -> None:
    """A restarted peer's new certificate replaces the old one (two certificates with one subject in
    the root list make BoringSSL pick the wrong anchor), and only verified certificates map to a node."""
    own = make_test_identity(B)
    reg = CertRegistry(own)
    first, second = make_test_identity(A), make_test_identity(A)
    assert reg.fetch() is not None and reg.fetch() is None  # unchanged -> gRPC keeps its config
    reg.add(A, first.cert_pem)
    assert reg.fetch() is not None and reg.node_of(first.cert_pem) == A
    reg.add(A, second.cert_pem)
    assert reg.node_of(second.cert_pem) == A and reg.node_of(first.cert_pem) is None
    roots = reg.roots()
    assert roots.count(b"BEGIN CERTIFICATE") == 2 and second.cert_pem in roots and first.cert_pem not in roots
    assert reg.node_of(own.cert_pem) is None  # our own certificate is a root but never a peer
    assert reg.node_of(b"garbage") is None
    assert cert_fingerprint(first.cert_pem) == cert_fingerprint(first.cert_der)


def test_fingerprint_of_der_keeps_trailing_bytes_that_look_like_whitespace() -> None:
    """DER is binary: a signature ending in 0x0a or 0x20 must not be stripped (it was, for ~2% of certs)."""
    pem = make_test_identity(A).cert_pem
    der = x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
    for tail in (b"\n", b" ", b"\t"):
        padded = der + tail  # stands in for a DER whose last signature byte is whitespace-valued
        assert cert_fingerprint(padded) == hashlib.sha256(padded).hexdigest()
    assert cert_fingerprint(pem) == hashlib.sha256(der).hexdigest()
