"""RA-TLS certificates: make ours, parse anyone's (fldsl, Gramine, Intel SGX SDK).

A node makes a fresh ECDSA key pair at every start and a short-lived self-signed certificate that carries
its quote in two extensions (Gramine's RA-TLS: docs/trust.md, "RA-TLS certificates"):

* TCG DICE tagged evidence, OID ``2.23.133.5.4.9``: CBOR ``tag(60000)[quote bstr, claims bstr]``; claims are a
  CBOR map ``{"pubkey-hash": bstr(cbor [1, sha256(SPKI DER)]), "fldsl-pins": bstr(32), "fldsl-node": tstr}``
  and the quote's REPORTDATA is ``SHA-256(claims) ‖ 0³²``. Gramine's verifier ignores our extra claims.
* The legacy Gramine raw quote (OID as parsers read it: ``0.6.9.42.840.113741.1337.6``) whose REPORTDATA is
  ``SHA-256(SPKI DER) ‖ 0³²``, so pre-1.8 Gramine peers can verify us too.

Binding the pins digest and node id into the quote (via the claims hash) is what lets a peer refuse a node
whose host edited its pins.json or renamed it. Key possession is proven later by the TLS handshake.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from dataclasses import dataclass
from typing import Any, Literal

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fldsl.runtime.attestation import _der
from fldsl.runtime.attestation.backend import AttestationBackend
from fldsl.runtime.attestation.quote import Quote, QuoteError

OID_TCG_EVIDENCE = "2.23.133.5.4.9"
OID_GRAMINE_LEGACY = "0.6.9.42.840.113741.1337.6"
OID_INTEL_SDK = "1.2.840.113741.1.13.1"
CBOR_TAG_TEE_QUOTE = 60000
CLAIM_PUBKEY_HASH = "pubkey-hash"
CLAIM_PINS = "fldsl-pins"
CLAIM_NODE = "fldsl-node"
_HASH_ALGS = {1: hashlib.sha256, 7: hashlib.sha384, 8: hashlib.sha512}  # IANA Named Information ids
_SIG_HASHES = {"1.2.840.10045.4.3.2": hashes.SHA256(), "1.2.840.10045.4.3.3": hashes.SHA384()}
DEFAULT_VALIDITY = dt.timedelta(days=1)
CLOCK_SKEW = dt.timedelta(minutes=5)
# Peers refuse certificates valid for longer (verify.PeerVerifier): a captured certificate must not stay
# usable evidence for years. Ours (DEFAULT_VALIDITY, backdated by CLOCK_SKEW) are well inside it.
MAX_CERT_VALIDITY = dt.timedelta(days=2)

Source = Literal["tcg", "gramine-legacy", "intel-sdk"]


class CertificateError(ValueError):
    """A certificate or its evidence is malformed. ``str()`` is user-facing."""


@dataclass(frozen=True)
class LocalIdentity:
    """This node's RA-TLS identity. ``key_pem`` is the private key: keep it in memory, never log it."""

    key_pem: bytes
    cert_pem: bytes
    cert_der: bytes
    node_id: str

    def __repr__(self) -> str:  # keeps the key out of logs and tracebacks
        return f"LocalIdentity(node_id={self.node_id!r}, cert={len(self.cert_der)} bytes DER)"


@dataclass(frozen=True)
class Evidence:
    """What a certificate claims, plus the binding checks that need no policy."""

    quote: Quote
    quote_bytes: bytes
    claims: dict[str, Any]
    pubkey_hash_ok: bool  # the quote's report data binds this certificate's public key
    pins_digest: bytes | None
    node_id: str | None
    source: Source
    binding_problem: str | None  # why pubkey_hash_ok is False
    spki_der: bytes
    subject_cn: str | None
    not_before: dt.datetime
    not_after: dt.datetime
    self_signature_ok: bool
    cert_der: bytes

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "subject_cn": self.subject_cn,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "self_signature_ok": self.self_signature_ok,
            "pubkey_hash_ok": self.pubkey_hash_ok,
            "binding_problem": self.binding_problem,
            "node_id": self.node_id,
            "pins_digest": self.pins_digest.hex() if self.pins_digest is not None else None,
            "claims": sorted(self.claims),
            "quote": self.quote.summary(),
        }


def _as_digest(pins_digest: bytes | str) -> bytes:
    value = bytes.fromhex(pins_digest) if isinstance(pins_digest, str) else bytes(pins_digest)
    if len(value) != 32:
        raise ValueError(f"pins digest must be 32 bytes (SHA-256), got {len(value)}")
    return value


def encode_claims(spki_der: bytes, *, pins_digest: bytes, node_id: str) -> bytes:
    pubkey_hash = cbor2.dumps([1, hashlib.sha256(spki_der).digest()])
    return cbor2.dumps(
        {CLAIM_PUBKEY_HASH: pubkey_hash, CLAIM_PINS: pins_digest, CLAIM_NODE: node_id}, canonical=True
    )


def make_identity(
    backend: AttestationBackend,
    *,
    node_id: str,
    pins_digest: bytes | str,
    curve: Literal["P-256", "P-384"] = "P-256",
    validity: dt.timedelta = DEFAULT_VALIDITY,
    now: dt.datetime | None = None,
    legacy_extension: bool = True,
) -> LocalIdentity:
    """A fresh key pair and a self-signed RA-TLS certificate carrying ``backend``'s quotes.

    ``pins_digest`` is ``Pins.digest()`` (hex or 32 raw bytes). CN and a DNS SAN are the node id (the
    transport uses it as the TLS target name). basicConstraints CA:TRUE/pathlen 0 + keyCertSign let gRPC
    (BoringSSL) use the pinned certificate itself as the trust root of the mutual-TLS channel.
    ``validity`` (+ the backdating) must stay within ``MAX_CERT_VALIDITY``, which peers enforce.
    """
    digest = _as_digest(pins_digest)
    if validity + CLOCK_SKEW > MAX_CERT_VALIDITY:
        raise ValueError(f"a certificate valid for {validity} (+{CLOCK_SKEW} backdated) exceeds the "
                         f"{MAX_CERT_VALIDITY.days}-day ceiling that peers enforce")
    key = ec.generate_private_key(ec.SECP384R1() if curve == "P-384" else ec.SECP256R1())
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claims = encode_claims(spki, pins_digest=digest, node_id=node_id)
    tcg_quote = backend.quote(hashlib.sha256(claims).digest() + b"\0" * 32)
    evidence = cbor2.dumps(cbor2.CBORTag(CBOR_TAG_TEE_QUOTE, [tcg_quote, claims]))
    now = now or dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, False, False, False), critical=True
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(node_id)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(OID_TCG_EVIDENCE), evidence), critical=False
        )
    )
    if legacy_extension:
        legacy_quote = backend.quote(hashlib.sha256(spki).digest() + b"\0" * 32)
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(OID_GRAMINE_LEGACY), legacy_quote),
            critical=False,
        )
    cert = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return LocalIdentity(
        key_pem=key_pem,
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        cert_der=cert.public_bytes(serialization.Encoding.DER),
        node_id=node_id,
    )


def _to_der(pem_or_der: bytes | str) -> bytes:
    data = pem_or_der.encode() if isinstance(pem_or_der, str) else bytes(pem_or_der)
    if data.lstrip().startswith(b"-----BEGIN"):
        import base64
        import binascii

        text = data.decode("ascii", "replace")
        begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
        if begin not in text or end not in text.split(begin, 1)[1]:
            raise CertificateError("PEM input holds no CERTIFICATE block")
        body = text.split(begin, 1)[1].split(end, 1)[0]
        try:
            return base64.b64decode("".join(body.split()), validate=True)
        except (binascii.Error, ValueError) as e:
            raise CertificateError(f"PEM certificate is not valid base64: {e}") from None
    return data


def _cbor_strict(data: bytes, what: str) -> Any:
    fp = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(fp).decode()
    except Exception as e:  # cbor2 raises assorted errors on hostile input; all mean "malformed"
        raise CertificateError(f"{what}: invalid CBOR ({type(e).__name__})") from None
    if fp.tell() != len(data):
        raise CertificateError(f"{what}: {len(data) - fp.tell()} trailing bytes after the CBOR item")
    return value


def _self_signature_ok(fields: _der.CertFields) -> bool:
    algo = _SIG_HASHES.get(fields.signature_oid)
    if algo is None:
        return False
    try:
        pub = serialization.load_der_public_key(fields.spki)
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            return False
        pub.verify(fields.signature, fields.tbs, ec.ECDSA(algo))
    except (InvalidSignature, ValueError, UnsupportedAlgorithm):
        return False
    return True


def _parse_tcg(value: bytes, spki: bytes) -> tuple[Quote, bytes, dict[str, Any], str | None]:
    outer = _cbor_strict(value, "TCG evidence")
    if not isinstance(outer, cbor2.CBORTag) or outer.tag != CBOR_TAG_TEE_QUOTE:
        raise CertificateError(f"TCG evidence: expected CBOR tag {CBOR_TAG_TEE_QUOTE}")
    items = outer.value
    if not (
        isinstance(items, (list, tuple)) and len(items) == 2 and all(isinstance(x, bytes) for x in items)
    ):
        raise CertificateError("TCG evidence: expected [quote bstr, claims bstr]")
    quote_bytes, claims_bytes = items
    if not claims_bytes:
        raise CertificateError("TCG evidence: empty claims")
    try:
        quote = Quote.parse(quote_bytes)
    except QuoteError as e:
        raise CertificateError(f"TCG evidence: {e}") from None
    claims = _cbor_strict(claims_bytes, "TCG claims")
    if not isinstance(claims, dict) or not all(isinstance(k, str) for k in claims):
        raise CertificateError("TCG claims: expected a map with text keys")
    problem = None
    if quote.report_data != hashlib.sha256(claims_bytes).digest() + b"\0" * 32:
        problem = "the quote's report data is not SHA-256(claims) ‖ 0³²"
    else:
        problem = _check_pubkey_hash(claims.get(CLAIM_PUBKEY_HASH), spki)
    return quote, quote_bytes, claims, problem


def _check_pubkey_hash(entry: Any, spki: bytes) -> str | None:
    if not isinstance(entry, bytes):
        return "claims carry no pubkey-hash"
    hash_entry = _cbor_strict(entry, "pubkey-hash claim")
    if not (
        isinstance(hash_entry, (list, tuple)) and len(hash_entry) == 2 and isinstance(hash_entry[1], bytes)
    ):
        return "pubkey-hash claim is not [alg, hash]"
    alg = hash_entry[0]
    if not isinstance(alg, int) or isinstance(alg, bool) or alg not in _HASH_ALGS:
        return f"pubkey-hash uses unsupported hash algorithm {alg!r}"
    if _HASH_ALGS[alg](spki).digest() != hash_entry[1]:
        return (
            "pubkey-hash does not match the certificate's public key "
            "(evidence copied from another certificate)"
        )
    return None


def parse_certificate(pem_or_der: bytes | str) -> Evidence:
    """Decode an RA-TLS certificate and its evidence. Raises :class:`CertificateError` if malformed.

    Prefers the TCG extension; if it is present but invalid the certificate is refused (no fallback, as
    Gramine does). Without it, the legacy Gramine OID, then the Intel SDK OID, carry a raw quote whose
    report data must be SHA-256(SPKI) ‖ 0³².
    """
    der = _to_der(pem_or_der)
    try:
        fields = _der.parse_certificate(der)
    except _der.DerError as e:
        raise CertificateError(f"not a valid X.509 certificate: {e}") from None
    exts: dict[str, bytes] = {}
    for ext in fields.extensions:
        if ext.oid in exts:
            raise CertificateError(f"extension {ext.oid} appears twice")
        exts[ext.oid] = ext.value
    claims: dict[str, Any] = {}
    source: Source
    if OID_TCG_EVIDENCE in exts:
        source = "tcg"
        quote, quote_bytes, claims, problem = _parse_tcg(exts[OID_TCG_EVIDENCE], fields.spki)
    else:
        for oid, src in ((OID_GRAMINE_LEGACY, "gramine-legacy"), (OID_INTEL_SDK, "intel-sdk")):
            if oid in exts:
                source = src  # type: ignore[assignment]
                quote_bytes = exts[oid]
                break
        else:
            raise CertificateError(
                "certificate carries no SGX evidence (no TCG 2.23.133.5.4.9, Gramine or Intel SDK quote "
                "extension); "
                "is this an RA-TLS certificate?"
            )
        try:
            quote = Quote.parse(quote_bytes)
        except QuoteError as e:
            raise CertificateError(f"{source} quote: {e}") from None
        problem = None
        if quote.report_data != hashlib.sha256(fields.spki).digest() + b"\0" * 32:
            problem = "the quote's report data is not SHA-256(certificate public key) ‖ 0³²"
    pins = claims.get(CLAIM_PINS)
    node = claims.get(CLAIM_NODE)
    return Evidence(
        quote=quote,
        quote_bytes=quote_bytes,
        claims=claims,
        pubkey_hash_ok=problem is None,
        pins_digest=pins if isinstance(pins, bytes) else None,
        node_id=node if isinstance(node, str) else None,
        source=source,
        binding_problem=problem,
        spki_der=fields.spki,
        subject_cn=fields.subject_cn,
        not_before=fields.not_before,
        not_after=fields.not_after,
        self_signature_ok=_self_signature_ok(fields),
        cert_der=der,
    )
