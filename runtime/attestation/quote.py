"""SGX ECDSA (DCAP) quotes: strict parsing of v3 / v4 SGX quotes and building of v3 quotes.

Byte layout of Intel's ``sgx_quote_3.h`` / ``sgx_quote_4.h`` (the DCAP quote library and QVL). All integers
are little-endian; ECDSA signatures and public keys are raw ``r‖s`` / ``x‖y`` (2 × 32 bytes, big-endian).

Parsing never trusts a length field: every read is bounds-checked and a malformed quote raises
:class:`QuoteError` naming what is wrong, so a hostile peer cannot make the verifier crash with an
``IndexError`` or read past the buffer. Parsing says nothing about genuineness — that is the verifier's job
(``sim.verify_sim_quote`` or ``qvl``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

HEADER_SIZE = 48
BODY_SIZE = 384
BODY_OFFSET = 48
SIG_LEN_OFFSET = BODY_OFFSET + BODY_SIZE  # 432: also the end of the ISV-signed bytes
SIG_DATA_OFFSET = SIG_LEN_OFFSET + 4  # 436
MIN_QUOTE_SIZE = 1020  # QVL QUOTE_MIN_BYTE_LEN
MAX_QUOTE_SIZE = 64 * 1024  # real quotes are ~5 KB; anything huge is refused before allocating

ATT_KEY_ECDSA_P256 = 2
TEE_TYPE_SGX = 0x00000000
TEE_TYPE_TDX = 0x00000081
CERT_TYPE_PCK_CHAIN = 5
CERT_TYPE_QE_REPORT = 6

INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
# Our simulated quotes carry this vendor id so that they can never pass Intel's QVL (which requires the
# Intel QE vendor id), whatever else a simulated deployment's keys sign.
SIM_QE_VENDOR_ID = b"FLDSL-SIMULATED\0"

FLAG_INIT = 0x1
FLAG_DEBUG = 0x2
FLAG_MODE64BIT = 0x4
FLAG_PROVISIONKEY = 0x10
FLAG_EINITTOKEN_KEY = 0x20


class QuoteError(ValueError):
    """A quote is malformed (wrong size, bad offsets, unsupported version). ``str()`` is user-facing."""


@dataclass(frozen=True)
class ReportBody:
    """The 384-byte SGX report body (``sgx_report_body_t`` of ``sgx_report.h``), used both for the enclave and
    the QE report."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != BODY_SIZE:
            raise QuoteError(f"report body must be {BODY_SIZE} bytes, got {len(self.raw)}")

    cpu_svn = property(lambda self: self.raw[0:16])
    misc_select = property(lambda self: struct.unpack_from("<I", self.raw, 16)[0])
    isv_ext_prod_id = property(lambda self: self.raw[32:48])
    attributes = property(lambda self: struct.unpack_from("<Q", self.raw, 48)[0])  # flags
    xfrm = property(lambda self: struct.unpack_from("<Q", self.raw, 56)[0])
    mr_enclave = property(lambda self: self.raw[64:96])
    mr_signer = property(lambda self: self.raw[128:160])
    config_id = property(lambda self: self.raw[192:256])
    isv_prod_id = property(lambda self: struct.unpack_from("<H", self.raw, 256)[0])
    isv_svn = property(lambda self: struct.unpack_from("<H", self.raw, 258)[0])
    config_svn = property(lambda self: struct.unpack_from("<H", self.raw, 260)[0])
    report_data = property(lambda self: self.raw[320:384])

    @property
    def debug(self) -> bool:
        return bool(self.attributes & FLAG_DEBUG)


def make_report_body(
    *,
    mr_enclave: bytes,
    mr_signer: bytes,
    isv_prod_id: int,
    isv_svn: int,
    report_data: bytes,
    attributes: int = FLAG_INIT | FLAG_MODE64BIT,
    xfrm: int = 0x3,
    cpu_svn: bytes = b"\0" * 16,
    misc_select: int = 0,
) -> ReportBody:
    for name, value, size in (
        ("mr_enclave", mr_enclave, 32),
        ("mr_signer", mr_signer, 32),
        ("report_data", report_data, 64),
        ("cpu_svn", cpu_svn, 16),
    ):
        if len(value) != size:
            raise QuoteError(f"{name} must be {size} bytes, got {len(value)}")
    for name, number in (("isv_prod_id", isv_prod_id), ("isv_svn", isv_svn)):
        if not 0 <= number <= 0xFFFF:
            raise QuoteError(f"{name} must fit in 16 bits, got {number}")
    raw = bytearray(BODY_SIZE)
    raw[0:16] = cpu_svn
    struct.pack_into("<I", raw, 16, misc_select)
    struct.pack_into("<QQ", raw, 48, attributes, xfrm)
    raw[64:96] = mr_enclave
    raw[128:160] = mr_signer
    struct.pack_into("<HH", raw, 256, isv_prod_id, isv_svn)
    raw[320:384] = report_data
    return ReportBody(bytes(raw))


class _Reader:
    """Bounds-checked little-endian reader over the quote bytes."""

    def __init__(self, data: bytes, pos: int, end: int) -> None:
        self.data, self.pos, self.end = data, pos, end

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise QuoteError(
                f"quote truncated: {what} needs {n} bytes at offset {self.pos}, "
                f"only {max(self.end - self.pos, 0)} left"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self, what: str) -> int:
        return struct.unpack("<H", self.take(2, what))[0]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]


@dataclass(frozen=True)
class Quote:
    """A parsed SGX ECDSA quote (v3, or v4 with tee_type SGX)."""

    raw: bytes
    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    vendor_id: bytes  # qe_vendor_id
    user_data: bytes
    body: ReportBody
    signature: bytes  # ISV enclave report signature, raw r‖s over raw[0:432]
    attestation_key: bytes  # raw x‖y
    qe_report: ReportBody
    qe_report_signature: bytes  # raw r‖s over the QE report body, by the PCK key
    qe_auth_data: bytes
    cert_data_type: int
    cert_data: bytes

    # -- the fields a verifier pins -------------------------------------------------------------------
    mr_enclave = property(lambda self: self.body.mr_enclave)
    mr_signer = property(lambda self: self.body.mr_signer)
    isv_prod_id = property(lambda self: self.body.isv_prod_id)
    isv_svn = property(lambda self: self.body.isv_svn)
    attributes = property(lambda self: self.body.attributes)
    xfrm = property(lambda self: self.body.xfrm)
    debug = property(lambda self: self.body.debug)
    report_data = property(lambda self: self.body.report_data)
    cpu_svn = property(lambda self: self.body.cpu_svn)
    misc_select = property(lambda self: self.body.misc_select)

    @property
    def is_simulated(self) -> bool:
        return self.vendor_id == SIM_QE_VENDOR_ID

    @property
    def signed_bytes(self) -> bytes:
        """What the ISV signature covers: header + report body."""
        return self.raw[:SIG_LEN_OFFSET]

    @classmethod
    def parse(cls, data: bytes) -> Quote:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise QuoteError(f"quote must be bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) < MIN_QUOTE_SIZE:
            raise QuoteError(
                f"quote too short: {len(data)} bytes, a DCAP quote has at least {MIN_QUOTE_SIZE}"
            )
        if len(data) > MAX_QUOTE_SIZE:
            raise QuoteError(f"quote too long: {len(data)} bytes (limit {MAX_QUOTE_SIZE})")
        version, att_key_type, tee_type, qe_svn, pce_svn = struct.unpack_from("<HHIHH", data, 0)
        if version not in (3, 4):
            hint = " (v5 quotes are not supported)" if version == 5 else ""
            raise QuoteError(f"unsupported quote version {version}{hint}; expected 3 or 4")
        if tee_type != TEE_TYPE_SGX:
            what = "a TDX quote" if tee_type == TEE_TYPE_TDX else f"tee_type {tee_type:#x}"
            raise QuoteError(f"{what} is not an SGX enclave quote")
        if att_key_type != ATT_KEY_ECDSA_P256:
            raise QuoteError(
                f"unsupported attestation key type {att_key_type}; only 2 (ECDSA P-256) is supported"
            )
        sig_len = struct.unpack_from("<I", data, SIG_LEN_OFFSET)[0]
        if sig_len != len(data) - SIG_DATA_OFFSET:
            raise QuoteError(
                f"signature_data_len is {sig_len} but {len(data) - SIG_DATA_OFFSET} bytes follow it "
                "(truncated or padded quote)"
            )
        r = _Reader(data, SIG_DATA_OFFSET, len(data))
        signature = r.take(64, "ISV report signature")
        att_key = r.take(64, "attestation public key")
        if version == 4:
            outer_type = r.u16("certification data type")
            if outer_type != CERT_TYPE_QE_REPORT:
                raise QuoteError(f"v4 quote: outer certification data type {outer_type}, expected 6")
            outer_size = r.u32("certification data size")
            if outer_size != r.end - r.pos:
                raise QuoteError(
                    f"v4 quote: certification data size {outer_size} != {r.end - r.pos} remaining"
                )
        qe_report = ReportBody(r.take(BODY_SIZE, "QE report"))
        qe_sig = r.take(64, "QE report signature")
        auth = r.take(r.u16("QE auth data size"), "QE auth data")
        cert_type = r.u16("certification data type")
        if not 1 <= cert_type <= 7:
            raise QuoteError(f"unknown certification data type {cert_type}")
        cert_data = r.take(r.u32("certification data size"), "certification data")
        if r.pos != r.end:
            raise QuoteError(f"{r.end - r.pos} unexpected trailing bytes after the certification data")
        return cls(
            raw=data,
            version=version,
            att_key_type=att_key_type,
            tee_type=tee_type,
            qe_svn=qe_svn,
            pce_svn=pce_svn,
            vendor_id=data[12:28],
            user_data=data[28:48],
            body=ReportBody(data[BODY_OFFSET:SIG_LEN_OFFSET]),
            signature=signature,
            attestation_key=att_key,
            qe_report=qe_report,
            qe_report_signature=qe_sig,
            qe_auth_data=auth,
            cert_data_type=cert_type,
            cert_data=cert_data,
        )

    def summary(self) -> dict[str, object]:
        """Human/JSON view used by ``fldsl inspect`` (no key material in a quote, all public)."""
        return {
            "version": self.version,
            "size": len(self.raw),
            "simulated": self.is_simulated,
            "vendor_id": self.vendor_id.hex(),
            "mr_enclave": self.mr_enclave.hex(),
            "mr_signer": self.mr_signer.hex(),
            "isv_prod_id": self.isv_prod_id,
            "isv_svn": self.isv_svn,
            "attributes": f"{self.attributes:#x}",
            "xfrm": f"{self.xfrm:#x}",
            "debug": self.debug,
            "report_data": self.report_data.hex(),
            "cpu_svn": self.cpu_svn.hex(),
            "qe_svn": self.qe_svn,
            "pce_svn": self.pce_svn,
            "cert_data_type": self.cert_data_type,
        }


def build_header(*, vendor_id: bytes, qe_svn: int = 0, pce_svn: int = 0, user_data: bytes = b"") -> bytes:
    if len(vendor_id) != 16 or len(user_data) > 20:
        raise QuoteError("vendor_id must be 16 bytes and user_data at most 20")
    return (
        struct.pack("<HHIHH", 3, ATT_KEY_ECDSA_P256, TEE_TYPE_SGX, qe_svn, pce_svn)
        + vendor_id
        + (user_data.ljust(20, b"\0"))
    )


def build_quote(
    *,
    header: bytes,
    body: ReportBody,
    sign: Callable[[bytes], bytes],
    attestation_key: bytes,
    qe_report: ReportBody,
    qe_report_signature: bytes,
    qe_auth_data: bytes,
    cert_data: bytes,
    cert_data_type: int = CERT_TYPE_PCK_CHAIN,
) -> bytes:
    """Assemble a v3 quote. ``sign(header+body) -> raw r‖s`` is the attestation key's signature."""
    if len(header) != HEADER_SIZE:
        raise QuoteError(f"header must be {HEADER_SIZE} bytes")
    for name, value in (("attestation_key", attestation_key), ("qe_report_signature", qe_report_signature)):
        if len(value) != 64:
            raise QuoteError(f"{name} must be 64 bytes")
    signed = header + body.raw
    signature = sign(signed)
    if len(signature) != 64:
        raise QuoteError("signature must be 64 raw bytes")
    sig_data = (
        signature
        + attestation_key
        + qe_report.raw
        + qe_report_signature
        + struct.pack("<H", len(qe_auth_data))
        + qe_auth_data
        + struct.pack("<HI", cert_data_type, len(cert_data))
        + cert_data
    )
    return signed + struct.pack("<I", len(sig_data)) + sig_data
