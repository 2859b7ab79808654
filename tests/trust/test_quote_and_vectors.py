"""Quote layout (build/parse, v3/v4, strict errors) and the real RA-TLS test vectors."""

from __future__ import annotations

import hashlib
import struct

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fldsl.artifacts import AttestationRequirement, Identity, Pins
from fldsl.runtime.attestation import qvl, ratls
from fldsl.runtime.attestation.quote import INTEL_QE_VENDOR_ID, SIM_QE_VENDOR_ID, Quote, QuoteError
from fldsl.runtime.attestation.sim import verify_sim_quote
from fldsl.runtime.attestation.verify import PeerRefused, PeerVerifier, check_identity

from .conftest import MR_A, VECTORS

GRAMINE_MRENCLAVE = "0866e7ca11b9f4efe4bf39b2607f4e1299f111920d96d95719080f01b62b7585"
GRAMINE_MRSIGNER = "adc53501f21ced9b998e37a7a18e061c63e00315045fa57a49c18ef0a30d02ca"


def test_sim_quote_roundtrips_every_field(deployment, backend_a):
    rd = bytes(range(64))
    q = Quote.parse(backend_a.quote(rd))
    assert (q.version, q.att_key_type, q.tee_type) == (3, 2, 0)
    assert q.mr_enclave == MR_A and q.mr_signer == deployment.mr_signer
    assert (q.isv_prod_id, q.isv_svn, q.debug, q.report_data) == (7, 2, False, rd)
    assert q.attributes == 0x5 and q.vendor_id == SIM_QE_VENDOR_ID and q.is_simulated
    assert q.cert_data_type == 5 and q.cert_data.endswith(b"\0")
    assert verify_sim_quote(q.raw, deployment.root_cert_pem).ok


def test_sim_quote_has_the_real_v3_offsets(backend_a):
    raw = backend_a.quote(b"\xaa" * 64)
    assert raw[112:144] == MR_A  # MRENCLAVE at 112 (sgx_quote_3.h)
    assert raw[368:432] == b"\xaa" * 64  # REPORTDATA at 368
    assert struct.unpack_from("<I", raw, 432)[0] == len(raw) - 436
    q = Quote.parse(raw)
    assert q.qe_report.report_data == hashlib.sha256(q.attestation_key + q.qe_auth_data).digest() + b"\0" * 32


def test_sim_quote_can_never_look_like_intel(backend_a):
    assert Quote.parse(backend_a.quote(b"\0" * 64)).vendor_id != INTEL_QE_VENDOR_ID
    verdict = qvl.verify_dcap_quote(Quote.parse(backend_a.quote(b"\0" * 64)))
    assert not verdict.ok and verdict.status == "not-intel"


def _to_v4(v3: bytes) -> bytes:
    """Re-wrap a v3 quote in the v4 layout: QE report etc. inside certification data type 6."""
    q = Quote.parse(v3)
    inner = (
        q.qe_report.raw
        + q.qe_report_signature
        + struct.pack("<H", len(q.qe_auth_data))
        + q.qe_auth_data
        + struct.pack("<HI", q.cert_data_type, len(q.cert_data))
        + q.cert_data
    )
    sig = q.signature + q.attestation_key + struct.pack("<HI", 6, len(inner)) + inner
    header = struct.pack("<H", 4) + v3[2:48]
    return header + v3[48:432] + struct.pack("<I", len(sig)) + sig


def test_v4_sgx_quote_parses_to_the_same_fields(backend_a):
    v3 = backend_a.quote(b"\x01" * 64)
    q4 = Quote.parse(_to_v4(v3))
    q3 = Quote.parse(v3)
    assert q4.version == 4
    assert (q4.mr_enclave, q4.report_data, q4.qe_report, q4.cert_data) == (
        q3.mr_enclave,
        q3.report_data,
        q3.qe_report,
        q3.cert_data,
    )


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:500], "too short"),
        (lambda b: b + b"\0", "signature_data_len"),
        (lambda b: struct.pack("<H", 5) + b[2:], "v5"),
        (lambda b: b[:4] + struct.pack("<I", 0x81) + b[8:], "TDX"),
        (lambda b: b[:2] + struct.pack("<H", 3) + b[4:], "attestation key type"),
        (lambda b: b[:1012] + struct.pack("<H", 60000) + b[1014:], "QE auth data"),
        (lambda b: b[:-5] + b"\xff" * 5, None),  # fine: PEM bytes changed, parse still succeeds
    ],
)
def test_malformed_quotes_raise_quote_error_naming_the_problem(backend_a, mutate, message):
    raw = mutate(backend_a.quote(b"\0" * 64))
    if message is None:
        Quote.parse(raw)
        return
    with pytest.raises(QuoteError, match=message):
        Quote.parse(raw)


def test_non_bytes_input_is_a_quote_error():
    with pytest.raises(QuoteError):
        Quote.parse("not bytes")  # type: ignore[arg-type]


def test_gramine_certificate_parses_with_the_known_values():
    ev = ratls.parse_certificate((VECTORS / "gramine-ra-tls-cert.pem").read_bytes())
    assert ev.source == "tcg" and ev.pubkey_hash_ok and ev.self_signature_ok
    q = ev.quote
    assert (q.version, q.att_key_type) == (3, 2)
    assert q.mr_enclave.hex() == GRAMINE_MRENCLAVE and q.mr_signer.hex() == GRAMINE_MRSIGNER
    assert (q.isv_prod_id, q.isv_svn, q.attributes, q.debug) == (0, 0, 0x7, True)
    assert q.vendor_id == INTEL_QE_VENDOR_ID and not q.is_simulated
    assert ev.subject_cn == "RATLS" and set(ev.claims) == {"pubkey-hash"}
    assert ev.node_id is None and ev.pins_digest is None


def test_gramine_certificate_legacy_quote_binds_the_key():
    """The legacy OID (as parsers read it) carries a 4,734-byte quote with report data SHA-256(SPKI) ‖ 0³²."""
    from fldsl.runtime.attestation import _der

    der = ratls._to_der((VECTORS / "gramine-ra-tls-cert.pem").read_bytes())
    fields = _der.parse_certificate(der)
    legacy = {e.oid: e.value for e in fields.extensions}[ratls.OID_GRAMINE_LEGACY]
    q = Quote.parse(legacy)
    assert len(legacy) == 4734 and q.mr_enclave.hex() == GRAMINE_MRENCLAVE
    assert q.report_data == hashlib.sha256(fields.spki).digest() + b"\0" * 32
    assert fields.signature_oid == "1.2.840.10045.4.3.2"  # with the NULL parameter cryptography refuses


def test_intel_sdk_certificate_parses():
    ev = ratls.parse_certificate((VECTORS / "intel-sgxsdk-ra-tls-cert.pem").read_bytes())
    assert ev.source == "tcg" and ev.pubkey_hash_ok and ev.self_signature_ok
    assert ev.quote.version == 3 and not ev.quote.is_simulated and len(ev.quote.mr_enclave) == 32


def test_intel_sdk_oid_alone_is_understood(backend_a):
    """A certificate with only the Intel-SDK quote extension: source intel-sdk, binding checked."""
    key = ec.generate_private_key(ec.SECP384R1())
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    quote = backend_a.quote(hashlib.sha256(spki).digest() + b"\0" * 32)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sdk")])
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(ratls.OID_INTEL_SDK), quote), False)
        .sign(key, hashes.SHA384())
    )
    ev = ratls.parse_certificate(cert.public_bytes(serialization.Encoding.PEM))
    assert (
        ev.source == "intel-sdk"
        and ev.pubkey_hash_ok
        and ev.self_signature_ok
        and ev.quote.mr_enclave == MR_A
    )


def _gramine_pins() -> Pins:
    return Pins(
        pipeline="x",
        nodes={
            "g.node": Identity(
                mr_enclave=[GRAMINE_MRENCLAVE],
                mr_signer=GRAMINE_MRSIGNER,
                isv_prod_id=0,
                isv_svn_min=0,
                measurement_kind="sgx",
            )
        },
    )


@pytest.mark.skipif(
    qvl.find_library() is not None, reason="Intel QVL installed: the quote would be checked for real"
)
def test_real_gramine_certificate_is_refused_without_qvl():
    pins = _gramine_pins()
    v = PeerVerifier(
        pins, AttestationRequirement(mode="dcap"), sim_roots=None, own_pins_digest=pins.digest()
    )
    with pytest.raises(PeerRefused) as info:
        v.verify((VECTORS / "gramine-ra-tls-cert.pem").read_bytes(), "g.node")
    assert info.value.field == "quote" and "libsgx_dcap_quoteverify" in str(info.value)
    assert "fail closed" in str(info.value)


def test_real_gramine_quote_is_refused_as_a_debug_enclave():
    ev = ratls.parse_certificate((VECTORS / "gramine-ra-tls-cert.pem").read_bytes())
    identity = _gramine_pins().nodes["g.node"]
    with pytest.raises(PeerRefused) as info:
        check_identity(ev.quote, identity, AttestationRequirement(mode="dcap"), who="g.node")
    assert info.value.field == "debug" and info.value.actual == "DEBUG enclave"
    identity.debug = True
    check_identity(
        ev.quote, identity, AttestationRequirement(mode="dcap", allow_debug=True)
    )  # dev opt-in works


@pytest.mark.skipif(qvl.find_library() is not None, reason="Intel QVL installed")
def test_unverified_real_quotes_are_only_a_policy_opt_in_and_still_need_fldsl_claims():
    pins = _gramine_pins()
    req = AttestationRequirement(mode="dcap", allow_unverified_real_quotes=True, allow_debug=True)
    v = PeerVerifier(pins, req, sim_roots=None, own_pins_digest=pins.digest())
    with pytest.raises(PeerRefused) as info:  # genuine-ness waived, but a non-fldsl cert has no pins claim
        v.verify((VECTORS / "gramine-ra-tls-cert.pem").read_bytes(), "g.node")
    assert info.value.field == "node"
