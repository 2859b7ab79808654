"""Property: a certificate or quote mutated anywhere is never accepted, and only our own errors come out."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fldsl.runtime.attestation import ratls
from fldsl.runtime.attestation.quote import Quote, QuoteError
from fldsl.runtime.attestation.sim import verify_sim_quote
from fldsl.runtime.attestation.verify import PeerRefused, PeerVerifier

from .conftest import SIM

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def material(deployment):
    from fldsl.artifacts import Identity, Pins

    from .conftest import MR_A

    pins = Pins(
        pipeline="fz",
        nodes={
            "a.n": Identity(
                mr_enclave=[MR_A.hex()], mr_signer=deployment.mr_signer.hex(), isv_prod_id=7, isv_svn_min=2
            )
        },
    )
    backend = deployment.backend(mr_enclave=MR_A, isv_prod_id=7, isv_svn=2, debug=False)
    ident = ratls.make_identity(backend, node_id="a.n", pins_digest=pins.digest())
    verifier = PeerVerifier(pins, SIM,
                            sim_roots=dict.fromkeys(pins.parties(), deployment.root_cert_pem),
                            own_pins_digest=pins.digest())
    verifier.verify(ident.cert_pem, "a.n")  # the unmutated certificate is accepted
    quote = backend.quote(b"\x42" * 64)
    assert verify_sim_quote(quote, deployment.root_cert_pem).ok
    return verifier, ident.cert_der, quote, deployment.root_cert_pem, ident.key_pem


def _mutate(data: bytes, op: str, pos: int, value: int, count: int) -> bytes:
    pos %= len(data)
    if op == "flip":
        out = bytearray(data)
        out[pos] ^= value or 1
        return bytes(out)
    if op == "truncate":
        return data[:pos]
    if op == "insert":
        return data[:pos] + bytes([value]) * count + data[pos:]
    return data[:pos] + data[pos + count :]  # delete


mutations = st.tuples(
    st.sampled_from(["flip", "flip", "flip", "truncate", "insert", "delete"]),
    st.integers(min_value=0, max_value=1 << 20),
    st.integers(min_value=0, max_value=255),
    st.integers(min_value=1, max_value=8),
)


@FUZZ
@given(m=mutations)
def test_mutated_certificate_is_never_accepted(material, m):
    verifier, der, _, _, _ = material
    mutated = _mutate(der, *m)
    if mutated == der:
        return
    with pytest.raises(PeerRefused):
        verifier.verify(mutated, "a.n")


@FUZZ
@given(m=mutations)
def test_mutated_quote_is_never_genuine(material, m):
    _, _, quote, root, _ = material
    mutated = _mutate(quote, *m)
    if mutated == quote:
        return
    try:
        Quote.parse(mutated)
    except QuoteError:
        pass
    verdict = verify_sim_quote(mutated, root)
    assert not verdict.ok, m


@FUZZ
@given(blob=st.binary(max_size=3000))
def test_random_bytes_are_refused_cleanly(material, blob):
    verifier = material[0]
    with pytest.raises(PeerRefused):
        verifier.verify(blob, None)
    with pytest.raises(QuoteError):
        Quote.parse(blob)


@FUZZ
@given(m=mutations, which=st.sampled_from([ratls.OID_TCG_EVIDENCE, ratls.OID_GRAMINE_LEGACY]))
def test_mutated_evidence_resigned_by_the_certificate_key_is_never_accepted(material, m, which):
    """Even the holder of the certificate key (a host without the enclave) cannot edit the evidence."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    verifier, der, _, _, key_pem = material
    cert = x509.load_der_x509_certificate(der)
    key = serialization.load_pem_private_key(key_pem, None)
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(key.public_key())
        .serial_number(3)
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(hours=1))
    )
    changed = False
    for ext in cert.extensions:
        value = ext.value.value if isinstance(ext.value, x509.UnrecognizedExtension) else None
        if value is None:
            continue
        if ext.oid.dotted_string == which:
            new = _mutate(value, *m)
            changed = new != value
            value = new
        b = b.add_extension(x509.UnrecognizedExtension(ext.oid, value), critical=False)
    if not changed:
        return
    mutated = b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    if which == ratls.OID_TCG_EVIDENCE:
        with pytest.raises(PeerRefused):
            verifier.verify(mutated, "a.n")
    else:  # the legacy quote is not used when TCG evidence is present, but parsing it must stay clean
        try:
            verifier.verify(mutated, "a.n")
        except PeerRefused:
            pass


@FUZZ
@given(m=mutations, size=st.sampled_from([0, 100, 3000]))
def test_mutated_sealed_blob_is_never_opened(m, size):
    from fldsl.runtime import sealing

    blob = bytes(
        sealing.seal_bytes(b"\x5a" * size, key=b"k" * 32, node_id="a.n", name="m", version=2, chunk_size=1024)
    )
    mutated = _mutate(blob, *m)
    if mutated == blob:
        return
    with pytest.raises(sealing.SealError):
        sealing.unseal_bytes(mutated, key=b"k" * 32, node_id="a.n", name="m", min_version=2)
