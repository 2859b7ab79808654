"""Exported models encrypted to their owner's public key (hybrid encryption), and the owner's side.

A sealed export is bound to the enclave (under SGX, to MRENCLAVE): its owner cannot open it outside the
enclave. When the plan names an ``export_recipient`` (``fldsl compile --owner-key PARTY=PUB.pem``, stored in
the measured plan, so the host cannot swap it), the node also writes the model encrypted to that key.

File layout (integers big-endian)::

    "FLDSLOX1" ‖ u32 n ‖ header (n bytes: canonical JSON of :class:`OwnerExportHeader`) ‖ chunks
    chunk i = AES-256-GCM(k, nonce = 0³² ‖ u64 i, plaintext[i·chunk : (i+1)·chunk], aad_i) ‖ tag[16]
    aad_i   = SHA-256(magic ‖ n ‖ header) ‖ u64 i ‖ u8 is_last
    k       = HKDF-SHA256(secret, salt = "fldsl.owner-export/1", info = "fldsl owner export key" ‖ 0 ‖
                          SHA-256(magic ‖ n ‖ header))

``secret`` comes from the key type of the recipient (the header's ``alg``): X25519 or ECDH P-256/P-384 with
an ephemeral key (``enc`` = its public key), or a random 32-byte secret under RSA-OAEP-SHA256 (``enc`` = the
OAEP ciphertext). The header names the node, the export name, the recipient key's fingerprint and the
plaintext length, and every chunk authenticates all of it; a fresh secret per file keeps the counter nonces
unique. Truncation (``is_last`` and the length), relabelling (node / name) and a wrong key (fingerprint,
checked first, so it is reported as such) are all detected.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import struct
from pathlib import Path
from typing import BinaryIO, Final, Literal

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fldsl.runtime.sealing import atomic_output

MAGIC = b"FLDSLOX1"
FORMAT: Final = "fldsl.owner-export/1"
CHUNK = 1 << 20
MAX_CHUNK = 64 << 20
MAX_HEADER = 16 << 10
MAX_PEM = 64 << 10
TAG = 16
MIN_RSA_BITS = 3072
Alg = Literal["X25519", "ECDH-P256", "ECDH-P384", "RSA-OAEP-SHA256"]
KeyKind = Literal["x25519", "p256", "p384", "rsa3072"]
PublicKey = x25519.X25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey
PrivateKey = x25519.X25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
_EC = {"secp256r1": ("ECDH-P256", ec.SECP256R1()), "secp384r1": ("ECDH-P384", ec.SECP384R1())}


class OwnerKeyError(ValueError):
    """An owner key is unreadable or of an unsupported type; ``str()`` is user-facing."""


class OwnerExportError(Exception):
    """An owner export cannot be opened. ``reason``: format | bad-key | wrong-key | tampered."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class OwnerExportHeader(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["fldsl.owner-export/1"] = FORMAT
    node: str = Field(max_length=256)  # the node that exported the model
    name: str = Field(max_length=1024)  # the plan's export name, e.g. "shop.trainer/model"
    alg: Alg
    recipient: str = Field(pattern=r"^[0-9a-f]{64}$")  # SHA-256 of the recipient's SubjectPublicKeyInfo DER
    enc: str = Field(max_length=4096)  # base64: ephemeral public key, or the RSA-OAEP ciphertext
    chunk_size: int = Field(gt=0, le=MAX_CHUNK)
    length: int = Field(ge=0)  # plaintext bytes


# ---------------------------------------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------------------------------------


def _spki(pub: PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def fingerprint(pub: PublicKey) -> str:
    return hashlib.sha256(_spki(pub)).hexdigest()


def _check_type(key: object, what: str) -> None:
    if isinstance(key, x25519.X25519PublicKey | x25519.X25519PrivateKey):
        return
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        if key.curve.name not in _EC:
            raise OwnerKeyError(f"{what}: EC curve {key.curve.name} is not supported (use P-256 or P-384)")
        return
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise OwnerKeyError(f"{what}: RSA-{key.key_size} is too small (at least RSA-{MIN_RSA_BITS})")
        return
    raise OwnerKeyError(f"{what}: {type(key).__name__} keys are not supported (X25519, EC P-256/P-384, RSA)")


def load_public_key(pem: str | bytes, what: str = "owner key") -> PublicKey:
    """A recipient public key from PEM (SubjectPublicKeyInfo). Raises :class:`OwnerKeyError`."""
    data = pem.encode() if isinstance(pem, str) else bytes(pem)
    if len(data) > MAX_PEM:
        raise OwnerKeyError(f"{what}: {len(data)} bytes is too large for a public key PEM")
    if b"PRIVATE KEY" in data:
        raise OwnerKeyError(f"{what}: this is a PRIVATE key; give the public key (keep the private one)")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise OwnerKeyError(f"{what}: not a PEM public key ({e})") from None
    _check_type(key, what)
    return key  # type: ignore[return-value]


def public_key_pem(pem: str | bytes, what: str = "owner key") -> str:
    """The canonical PEM text of a recipient key (what the plan stores)."""
    key = load_public_key(pem, what)
    spki = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return spki.decode()


def load_private_key(pem: bytes, what: str = "owner private key") -> PrivateKey:
    if len(pem) > MAX_PEM:
        raise OwnerKeyError(f"{what}: {len(pem)} bytes is too large for a private key PEM")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise OwnerKeyError(f"{what}: password-protected; remove the password first (openssl pkey)") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise OwnerKeyError(f"{what}: not a PEM private key ({e})") from None
    _check_type(key, what)
    return key  # type: ignore[return-value]


def generate_owner_key(kind: KeyKind = "x25519") -> tuple[bytes, bytes]:
    """A new owner key pair: (private PKCS#8 PEM, public SubjectPublicKeyInfo PEM)."""
    priv: PrivateKey
    if kind == "x25519":
        priv = x25519.X25519PrivateKey.generate()
    elif kind in ("p256", "p384"):
        priv = ec.generate_private_key(ec.SECP256R1() if kind == "p256" else ec.SECP384R1())
    else:
        priv = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    private = priv.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    public = priv.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


# ---------------------------------------------------------------------------------------------------------
# encrypt (in the node) / decrypt (the owner)
# ---------------------------------------------------------------------------------------------------------


def _encapsulate(pub: PublicKey) -> tuple[Alg, bytes, bytes]:
    """(alg, enc, secret) for a fresh secret only ``pub``'s holder can recover."""
    if isinstance(pub, x25519.X25519PublicKey):
        eph = x25519.X25519PrivateKey.generate()
        return "X25519", eph.public_key().public_bytes_raw(), eph.exchange(pub)
    if isinstance(pub, ec.EllipticCurvePublicKey):
        alg, curve = _EC[pub.curve.name]
        eph_ec = ec.generate_private_key(curve)
        enc = eph_ec.public_key().public_bytes(serialization.Encoding.X962,
                                               serialization.PublicFormat.UncompressedPoint)
        return alg, enc, eph_ec.exchange(ec.ECDH(), pub)  # type: ignore[return-value]
    secret = os.urandom(32)
    return "RSA-OAEP-SHA256", pub.encrypt(secret, _oaep()), secret


def _decapsulate(priv: PrivateKey, alg: str, enc: bytes) -> bytes:
    try:
        if alg == "X25519" and isinstance(priv, x25519.X25519PrivateKey):
            return priv.exchange(x25519.X25519PublicKey.from_public_bytes(enc))
        if alg.startswith("ECDH-") and isinstance(priv, ec.EllipticCurvePrivateKey):
            peer = ec.EllipticCurvePublicKey.from_encoded_point(priv.curve, enc)
            return priv.exchange(ec.ECDH(), peer)
        if alg == "RSA-OAEP-SHA256" and isinstance(priv, rsa.RSAPrivateKey):
            return priv.decrypt(enc, _oaep())
    except ValueError:
        raise OwnerExportError("tampered", "the header's encapsulated key does not open") from None
    raise OwnerExportError("wrong-key", f"the file is encrypted with {alg}; this private key cannot open it")


def _oaep() -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def _derive(secret: bytes, prefix_digest: bytes) -> bytes:
    info = b"fldsl owner export key\0" + prefix_digest
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=FORMAT.encode(), info=info).derive(secret)


def _nonce(i: int) -> bytes:
    return b"\0" * 4 + struct.pack(">Q", i)


def _aad(prefix_digest: bytes, i: int, last: bool) -> bytes:
    return prefix_digest + struct.pack(">QB", i, 1 if last else 0)


def _chunks(length: int, chunk: int) -> int:
    return max(1, -(-length // chunk))


def encrypt_file(data: bytes, dst: Path, *, recipient_pem: str, node_id: str, name: str,
                 chunk_size: int = CHUNK) -> OwnerExportHeader:
    """Write ``data`` to ``dst`` encrypted to ``recipient_pem`` (atomically: a temp file, fsync, rename)."""
    pub = load_public_key(recipient_pem, "export_recipient")
    alg, enc, secret = _encapsulate(pub)
    header = OwnerExportHeader(node=node_id, name=name, alg=alg, recipient=fingerprint(pub),
                               enc=base64.b64encode(enc).decode(), chunk_size=chunk_size, length=len(data))
    body = header.model_dump_json().encode()
    prefix = MAGIC + struct.pack(">I", len(body)) + body
    digest = hashlib.sha256(prefix).digest()
    aead = AESGCM(_derive(secret, digest))
    n = _chunks(len(data), chunk_size)
    with atomic_output(dst) as out:
        out.write(prefix)
        view = memoryview(data)
        for i in range(n):
            part = bytes(view[i * chunk_size:(i + 1) * chunk_size])
            out.write(aead.encrypt(_nonce(i), part, _aad(digest, i, i == n - 1)))
    return header


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise OwnerExportError("tampered", "the file is truncated")
    return data


def is_owner_export(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def read_header(f: BinaryIO) -> tuple[OwnerExportHeader, bytes]:
    """The header and SHA-256 of the prefix (magic, length, header bytes)."""
    if f.read(len(MAGIC)) != MAGIC:
        raise OwnerExportError("format", "not an fldsl owner export (no FLDSLOX1 magic)")
    raw_len = f.read(4)
    if len(raw_len) != 4:
        raise OwnerExportError("format", "truncated header")
    (n,) = struct.unpack(">I", raw_len)
    if n > MAX_HEADER:
        raise OwnerExportError("format", f"header of {n} bytes is larger than {MAX_HEADER}")
    body = f.read(n)
    if len(body) != n:
        raise OwnerExportError("format", "truncated header")
    try:
        header = OwnerExportHeader.model_validate_json(body)
    except ValidationError as e:
        raise OwnerExportError("format", f"malformed header: {e.errors()[0]['msg']}") from None
    return header, hashlib.sha256(MAGIC + raw_len + body).digest()


def decrypt_file(src: Path, dst: Path, *, private_pem: bytes, node_id: str | None = None,
                 name: str | None = None) -> OwnerExportHeader:
    """Authenticate and decrypt ``src`` into ``dst`` (written only once every chunk authenticates).

    ``node_id`` / ``name``, when given, must equal the header's. Raises :class:`OwnerExportError` (and
    :class:`OwnerKeyError` for an unreadable private key)."""
    # The plaintext model: readable by its owner only.
    with atomic_output(dst, mode=0o600) as out:
        return _decrypt(src, out, private_pem=private_pem, node_id=node_id, name=name)


def decrypt_bytes(src: Path, *, private_pem: bytes, node_id: str | None = None,
                  name: str | None = None) -> tuple[OwnerExportHeader, bytes]:
    """:func:`decrypt_file` into memory (a SavedModel pack is unpacked into a folder, never written whole)."""
    buf = io.BytesIO()
    header = _decrypt(src, buf, private_pem=private_pem, node_id=node_id, name=name)
    return header, buf.getvalue()


def _decrypt(src: Path, out: BinaryIO, *, private_pem: bytes, node_id: str | None,
             name: str | None) -> OwnerExportHeader:
    priv = load_private_key(private_pem)
    with open(src, "rb") as f:
        header, digest = read_header(f)
        if header.recipient != fingerprint(priv.public_key()):
            raise OwnerExportError(
                "wrong-key", f"encrypted to owner key {header.recipient[:16]}…, but this private key is "
                f"{fingerprint(priv.public_key())[:16]}… (the wrong owner key)")
        for want, got, what in ((node_id, header.node, "node"), (name, header.name, "name")):
            if want is not None and want != got:
                raise OwnerExportError("tampered", f"the file is the export of {what} {got!r}, not {want!r}")
        try:
            enc = base64.b64decode(header.enc, validate=True)
        except ValueError:
            raise OwnerExportError("format", "malformed header: enc is not base64") from None
        aead = AESGCM(_derive(_decapsulate(priv, header.alg, enc), digest))
        n = _chunks(header.length, header.chunk_size)
        for i in range(n):
            size = min(header.chunk_size, header.length - i * header.chunk_size)
            ct = _read_exact(f, size + TAG)
            try:
                out.write(aead.decrypt(_nonce(i), ct, _aad(digest, i, i == n - 1)))
            except InvalidTag:
                raise OwnerExportError(
                    "tampered", f"chunk {i} does not authenticate: the file was modified") from None
        if f.read(1):
            raise OwnerExportError("tampered", "trailing bytes after the last chunk")
    return header
