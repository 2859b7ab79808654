"""A minimal, strict DER walker for X.509 certificates.

Why not ``cryptography.x509``: real RA-TLS certificates from Gramine (mbedTLS < 3.5) and the Intel SGX SDK
put a NULL parameter in the ECDSA signature AlgorithmIdentifier, which ``cryptography`` ≥ 50 refuses to
parse (docs/trust.md, "RA-TLS certificates"). The verifier needs only a few fields (TBS bytes, signature,
SPKI, validity, subject CN, extensions), so we read them ourselves and hand the SPKI to ``cryptography`` for
the key. Every read is bounds-checked; malformed input raises :class:`DerError`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

MAX_DEPTH_LEN = 1 << 20  # a certificate over 1 MiB is refused outright


class DerError(ValueError):
    pass


@dataclass(frozen=True)
class Tlv:
    tag: int
    start: int  # offset of the tag byte
    body: int  # offset of the content
    end: int  # offset after the content

    def content(self, data: bytes) -> bytes:
        return data[self.body : self.end]

    def whole(self, data: bytes) -> bytes:
        return data[self.start : self.end]


def read_tlv(data: bytes, pos: int, limit: int) -> Tlv:
    if pos + 2 > limit:
        raise DerError(f"truncated DER at offset {pos}")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise DerError(f"multi-byte DER tags are not supported (offset {pos})")
    first = data[pos + 1]
    p = pos + 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4:
            raise DerError(f"unsupported DER length form at offset {pos}")
        if p + n > limit:
            raise DerError(f"truncated DER length at offset {pos}")
        length = int.from_bytes(data[p : p + n], "big")
        if length < 0x80 or data[p] == 0:
            raise DerError(f"non-minimal DER length at offset {pos}")
        p += n
    if p + length > limit:
        raise DerError(f"DER element at offset {pos} claims {length} bytes, only {limit - p} left")
    return Tlv(tag, pos, p, p + length)


def children(data: bytes, parent: Tlv) -> list[Tlv]:
    out, pos = [], parent.body
    while pos < parent.end:
        t = read_tlv(data, pos, parent.end)
        out.append(t)
        pos = t.end
    return out


def expect(t: Tlv, tag: int, what: str) -> Tlv:
    if t.tag != tag:
        raise DerError(f"{what}: expected DER tag {tag:#04x}, found {t.tag:#04x}")
    return t


def decode_oid(raw: bytes) -> str:
    if not raw or raw[-1] & 0x80:
        raise DerError("malformed OBJECT IDENTIFIER")
    arcs: list[int] = []
    value = 0
    for b in raw:
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(value)
            value = 0
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])


def decode_time(data: bytes, t: Tlv) -> dt.datetime:
    text = t.content(data).decode("ascii", "replace")
    try:
        if t.tag == 0x17:  # UTCTime YYMMDDHHMMSSZ
            value = dt.datetime.strptime(text, "%y%m%d%H%M%SZ")
        elif t.tag == 0x18:  # GeneralizedTime YYYYMMDDHHMMSSZ
            value = dt.datetime.strptime(text, "%Y%m%d%H%M%SZ")
        else:
            raise DerError(f"validity: unexpected time tag {t.tag:#04x}")
    except ValueError as e:
        raise DerError(f"validity: bad time {text!r}") from e
    return value.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class Extension:
    oid: str
    critical: bool
    value: bytes


@dataclass(frozen=True)
class CertFields:
    der: bytes
    tbs: bytes  # the exact signed bytes
    signature_oid: str
    signature: bytes  # DER ECDSA-Sig-Value
    spki: bytes  # SubjectPublicKeyInfo DER
    not_before: dt.datetime
    not_after: dt.datetime
    subject_cn: str | None
    extensions: list[Extension]


_CN = "2.5.4.3"


def _first_cn(data: bytes, name: Tlv) -> str | None:
    for rdn in children(data, expect(name, 0x30, "name")):
        for atv in children(data, expect(rdn, 0x31, "name RDN")):
            parts = children(data, expect(atv, 0x30, "name attribute"))
            if len(parts) == 2 and parts[0].tag == 0x06 and decode_oid(parts[0].content(data)) == _CN:
                return parts[1].content(data).decode("utf-8", "replace")
    return None


def parse_certificate(der: bytes) -> CertFields:
    if len(der) > MAX_DEPTH_LEN:
        raise DerError("certificate larger than 1 MiB")
    cert = expect(read_tlv(der, 0, len(der)), 0x30, "certificate")
    if cert.end != len(der):
        raise DerError(f"{len(der) - cert.end} trailing bytes after the certificate")
    parts = children(der, cert)
    if len(parts) != 3:
        raise DerError(f"certificate must have 3 parts, found {len(parts)}")
    tbs, sig_alg, sig = parts
    expect(tbs, 0x30, "tbsCertificate")
    alg_parts = children(der, expect(sig_alg, 0x30, "signatureAlgorithm"))
    if not alg_parts or alg_parts[0].tag != 0x06:
        raise DerError("signatureAlgorithm without an OID")
    # Parameters: absent (RFC 5758) or NULL (old mbedTLS). Anything else is refused.
    if len(alg_parts) > 2 or (len(alg_parts) == 2 and alg_parts[1].whole(der) != b"\x05\x00"):
        raise DerError("unexpected signatureAlgorithm parameters")
    sig_bits = expect(sig, 0x03, "signatureValue").content(der)
    if not sig_bits or sig_bits[0] != 0:
        raise DerError("signatureValue has unused bits")
    fields = children(der, tbs)
    i = 0
    if fields and fields[0].tag == 0xA0:  # [0] version
        i += 1
    if len(fields) < i + 6:
        raise DerError("tbsCertificate has too few fields")
    expect(fields[i], 0x02, "serialNumber")
    expect(fields[i + 1], 0x30, "signature")
    validity = children(der, expect(fields[i + 3], 0x30, "validity"))
    if len(validity) != 2:
        raise DerError("validity must hold notBefore and notAfter")
    subject = fields[i + 4]
    spki = expect(fields[i + 5], 0x30, "subjectPublicKeyInfo")
    extensions: list[Extension] = []
    for f in fields[i + 6 :]:
        if f.tag in (0x81, 0x82, 0xA1, 0xA2):  # issuer/subject unique ids
            continue
        if f.tag != 0xA3:
            raise DerError(f"unexpected tbsCertificate field tag {f.tag:#04x}")
        inner = children(der, f)
        if len(inner) != 1:
            raise DerError("extensions wrapper must hold one SEQUENCE")
        for ext in children(der, expect(inner[0], 0x30, "extensions")):
            e = children(der, expect(ext, 0x30, "extension"))
            if len(e) not in (2, 3) or e[0].tag != 0x06:
                raise DerError("malformed extension")
            critical = False
            if len(e) == 3:
                crit = expect(e[1], 0x01, "extension critical flag").content(der)
                if len(crit) != 1:
                    raise DerError("malformed extension critical flag")
                critical = crit != b"\0"
            value = expect(e[-1], 0x04, "extension value").content(der)
            extensions.append(Extension(decode_oid(e[0].content(der)), critical, value))
    return CertFields(
        der=der,
        tbs=tbs.whole(der),
        signature_oid=decode_oid(alg_parts[0].content(der)),
        signature=sig_bits[1:],
        spki=spki.whole(der),
        not_before=decode_time(der, validity[0]),
        not_after=decode_time(der, validity[1]),
        subject_cn=_first_cn(der, subject),
        extensions=extensions,
    )
