"""PeerVerifier: every identity field, key binding, deployment roots, modes and pins digests."""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fldsl.artifacts import AttestationRequirement, Identity, Pins
from fldsl.runtime.attestation import ratls
from fldsl.runtime.attestation.sim import SimDeployment
from fldsl.runtime.attestation.verify import PeerRefused, PeerVerifier

from .conftest import DCAP, MR_A, SIM


def verifier(pins: Pins, deployment: SimDeployment, req: AttestationRequirement = SIM, **kw) -> PeerVerifier:
    return PeerVerifier(pins, req,
                        sim_roots=dict.fromkeys(pins.parties(), deployment.root_cert_pem),
                        own_pins_digest=pins.digest(), **kw)


def cert_for(
    deployment: SimDeployment,
    pins: Pins,
    *,
    node: str = "media.trainer",
    mr: bytes = MR_A,
    prod: int = 7,
    svn: int = 2,
    debug: bool = False,
    digest: str | None = None,
) -> bytes:
    backend = deployment.backend(mr_enclave=mr, isv_prod_id=prod, isv_svn=svn, debug=debug)
    return ratls.make_identity(backend, node_id=node, pins_digest=digest or pins.digest()).cert_pem


def refused(v: PeerVerifier, cert: bytes, expect: str | None = "media.trainer") -> PeerRefused:
    with pytest.raises(PeerRefused) as info:
        v.verify(cert, expect)
    return info.value


def test_genuine_peer_is_accepted_and_labelled_simulated(deployment, pins):
    verdict = verifier(pins, deployment).verify(cert_for(deployment, pins), "media.trainer")
    assert verdict.node_id == "media.trainer"
    assert verdict.simulated is True
    assert verdict.identity == pins.nodes["media.trainer"]
    assert "SIMULATED" in verdict.summary


@pytest.mark.parametrize(
    ("field", "cert_kw", "expected", "actual"),
    [
        (
            "mr_enclave",
            {"mr": hashlib.sha256(b"edited plan").digest()},
            MR_A.hex(),
            hashlib.sha256(b"edited plan").hexdigest(),
        ),
        ("isv_prod_id", {"prod": 8}, "7", "8"),
        ("isv_svn", {"svn": 1}, ">= 2", "1"),
        ("debug", {"debug": True}, "production enclave (DEBUG clear)", "DEBUG enclave"),
    ],
)
def test_each_quote_field_tampered_is_refused_by_name(deployment, pins, field, cert_kw, expected, actual):
    err = refused(verifier(pins, deployment), cert_for(deployment, pins, **cert_kw))
    assert (err.field, err.expected, err.actual) == (field, expected, actual)
    assert field in str(err) and "media.trainer" in str(err)


def test_mr_enclave_message_names_the_likely_cause(deployment, pins):
    err = refused(verifier(pins, deployment), cert_for(deployment, pins, mr=b"\1" * 32))
    assert "different plan or code than was compiled" in str(err)


def test_pinned_mr_signer_mismatch_is_refused(deployment, pins):
    pins.nodes["media.trainer"].mr_signer = "ab" * 32
    err = refused(verifier(pins, deployment), cert_for(deployment, pins))
    assert (err.field, err.expected, err.actual) == ("mr_signer", "ab" * 32, deployment.mr_signer.hex())


def test_higher_svn_and_any_listed_mr_enclave_are_accepted(deployment, pins):
    pins.nodes["media.trainer"].mr_enclave = ["00" * 32, MR_A.hex()]
    assert verifier(pins, deployment).verify(cert_for(deployment, pins, svn=9)).node_id == "media.trainer"


def test_debug_needs_both_policy_and_pinned_identity(deployment, pins):
    allow = AttestationRequirement(mode="sim", allow_debug=True)
    err = refused(verifier(pins, deployment, allow), cert_for(deployment, pins, debug=True))
    assert err.field == "debug" and "pinned identity is not a debug build" in str(err)
    pins.nodes["media.trainer"].debug = True  # a debug build was compiled and pinned
    cert = cert_for(deployment, pins, debug=True)
    err = refused(verifier(pins, deployment, SIM), cert)
    assert err.field == "debug" and "policy does not allow debug" in str(err)
    assert verifier(pins, deployment, allow).verify(cert).node_id == "media.trainer"


def test_wrong_pins_digest_is_refused(deployment, pins):
    err = refused(verifier(pins, deployment), cert_for(deployment, pins, digest="11" * 32))
    assert (err.field, err.expected, err.actual) == ("pins", pins.digest(), "11" * 32)
    assert "pins.json differs" in str(err)


def test_edited_pins_on_the_peer_host_is_refused(deployment, pins):
    edited = pins.model_copy(deep=True)
    edited.nodes["shop.trainer"].mr_enclave = ["ff" * 32]  # a host trying to admit its own build
    err = refused(verifier(pins, deployment), cert_for(deployment, edited))
    assert err.field == "pins"


def test_unknown_and_unexpected_node_ids_are_refused(deployment, pins):
    v = verifier(pins, deployment)
    err = refused(v, cert_for(deployment, pins, node="evil.node"), expect=None)
    assert err.field == "node" and err.actual == "evil.node"
    err = refused(v, cert_for(deployment, pins), expect="shop.trainer")
    assert (err.field, err.expected, err.actual) == ("node", "shop.trainer", "media.trainer")


def test_quote_from_another_deployments_root_is_refused(deployment, other_deployment, pins):
    pins.nodes["media.trainer"].mr_signer = None  # would not get that far, but make the root the only problem
    err = refused(verifier(pins, deployment), cert_for(other_deployment, pins))
    assert err.field == "quote" and "party media's simulated root" in str(err)


def test_a_partys_keys_cannot_vouch_for_another_partys_node(deployment, other_deployment, pins):
    """Each party's nodes must chain to that party's own root: media's root pinned for media, another root
    (the other deployment's, standing for party shop's) for shop. A shop.trainer certificate quoted with
    media's keys is refused, naming shop's root; media's own node still passes."""
    v = PeerVerifier(pins, SIM, sim_roots={"media": deployment.root_cert_pem,
                                           "shop": other_deployment.root_cert_pem},
                     own_pins_digest=pins.digest())
    err = refused(v, cert_for(deployment, pins, node="shop.trainer"), expect="shop.trainer")
    assert err.field == "quote" and "party shop's simulated root" in str(err)
    assert v.verify(cert_for(deployment, pins), "media.trainer").node_id == "media.trainer"
    unpinned = PeerVerifier(pins, SIM, sim_roots={"media": deployment.root_cert_pem},
                            own_pins_digest=pins.digest())
    err = refused(unpinned, cert_for(deployment, pins, node="shop.trainer"), expect="shop.trainer")
    assert err.field == "quote" and "no identity of party shop is pinned" in str(err)
    assert "fldsl trust add-peer" in str(err)


def test_sim_quote_refused_under_dcap(deployment, pins):
    err = refused(verifier(pins, deployment, DCAP), cert_for(deployment, pins))
    assert (err.field, err.actual) == ("attestation_mode", "simulated quote")


def test_sim_quote_refused_when_pins_hold_real_measurements(deployment, pins):
    pins.nodes["media.trainer"].measurement_kind = "sgx"
    assert refused(verifier(pins, deployment), cert_for(deployment, pins)).field == "attestation_mode"


def test_sim_quote_without_a_sim_root_is_refused(deployment, pins):
    v = PeerVerifier(pins, SIM, sim_roots=None, own_pins_digest=pins.digest())
    assert refused(v, cert_for(deployment, pins)).field == "quote"


def test_certificate_outside_its_validity_window_is_refused(deployment, pins):
    cert = cert_for(deployment, pins)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    err = refused(verifier(pins, deployment, now=later), cert)
    assert err.field == "certificate" and "validity" in str(err)


def _reissue(
    cert_pem: bytes,
    *,
    keep_key: bool = False,
    drop_tcg: bool = False,
    oid_swap: str | None = None,
    new_name: str | None = None,
) -> bytes:
    """A copy of an RA-TLS certificate's extensions under a new (attacker) key: a man-in-the-middle."""
    src = x509.load_pem_x509_certificate(cert_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, new_name or "media.trainer")])
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(hours=1))
    )
    for ext in src.extensions:
        oid = ext.oid.dotted_string
        if drop_tcg and oid == ratls.OID_TCG_EVIDENCE:
            continue
        if oid in (ratls.OID_TCG_EVIDENCE, ratls.OID_GRAMINE_LEGACY):
            target = (
                x509.ObjectIdentifier(oid_swap) if oid_swap and oid == ratls.OID_GRAMINE_LEGACY else ext.oid
            )
            b = b.add_extension(x509.UnrecognizedExtension(target, ext.value.value), critical=False)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_evidence_copied_to_another_key_is_refused(deployment, pins):
    mitm = _reissue(cert_for(deployment, pins))
    err = refused(verifier(pins, deployment), mitm)
    assert err.field == "pubkey" and "does not match the certificate's public key" in str(err)


def test_legacy_only_evidence_copied_to_another_key_is_refused(deployment, pins):
    mitm = _reissue(cert_for(deployment, pins), drop_tcg=True)
    ev = ratls.parse_certificate(mitm)
    assert ev.source == "gramine-legacy" and not ev.pubkey_hash_ok
    assert refused(verifier(pins, deployment), mitm).field == "pubkey"


def test_modified_certificate_fails_its_self_signature(deployment, pins):
    der = bytearray(
        x509.load_pem_x509_certificate(cert_for(deployment, pins)).public_bytes(serialization.Encoding.DER)
    )
    i = der.index(b"media.trainer")
    der[i] = ord("M")  # subject CN inside the signed TBS
    err = refused(verifier(pins, deployment), bytes(der))
    assert err.field == "certificate" and "modified" in str(err)


def test_garbage_is_refused_as_certificate(deployment, pins):
    for junk in (
        b"",
        b"hello",
        b"-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n",
        b"\x30\x03\x02\x01",
    ):
        assert refused(verifier(pins, deployment), junk).field == "certificate"


def test_identity_from_pins_matches_what_the_node_reports(deployment, pins):
    """The quote's mr_signer is the deployment's enclave-signing key (same formula as real MRSIGNER)."""
    ev = ratls.parse_certificate(cert_for(deployment, pins))
    n = deployment.signing_key.public_key().public_numbers().n
    assert ev.quote.mr_signer == hashlib.sha256(n.to_bytes(384, "little")).digest()
    assert ev.pins_digest == bytes.fromhex(pins.digest()) and ev.node_id == "media.trainer"


def test_pinned_identity_with_uppercase_hex_still_matches(deployment, pins):
    pins.nodes["media.trainer"] = Identity(
        mr_enclave=[MR_A.hex().upper()],
        mr_signer=deployment.mr_signer.hex().upper(),
        isv_prod_id=7,
        isv_svn_min=2,
    )
    assert verifier(pins, deployment).verify(cert_for(deployment, pins)).node_id == "media.trainer"
