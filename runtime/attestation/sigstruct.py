"""The SGX SIGSTRUCT that ``gramine-sgx-sign`` writes (``<node>.sig``, 1808 bytes; layout: Intel SDM vol. 3D,
"SIGSTRUCT").

Under real SGX the CPU checks it at EINIT and reports its MRENCLAVE / MRSIGNER in every quote. Under
``gramine-direct`` nothing checks it, so the simulated backend does what EINIT would: it verifies the RSA-3072
signature (e = 3, PKCS#1 v1.5, SHA-256, over bytes 0..128 and 900..1028) before it reports the signer's
MRSIGNER and the ISV values, so a SIGSTRUCT altered by the host is refused, not reported.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from fldsl.runtime.attestation.backend import AttestationError

SIGSTRUCT_SIZE = 1808
_HEADER = bytes.fromhex("06000000e100000000000100" "00000000")
_FLAG_DEBUG = 0x2


@dataclass(frozen=True)
class Sigstruct:
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    debug: bool


def parse_sigstruct(data: bytes) -> Sigstruct:
    """Parse and verify a SIGSTRUCT; :class:`AttestationError` names what is wrong."""
    if len(data) != SIGSTRUCT_SIZE:
        raise AttestationError(f"SIGSTRUCT must be {SIGSTRUCT_SIZE} bytes, got {len(data)}")
    if data[:16] != _HEADER:
        raise AttestationError("SIGSTRUCT header is not the SGX one")
    modulus_le = data[128:512]
    exponent = int.from_bytes(data[512:516], "little")
    if exponent != 3:
        raise AttestationError(f"SIGSTRUCT exponent must be 3, got {exponent}")
    n = int.from_bytes(modulus_le, "little")
    signature = int.from_bytes(data[516:900], "little").to_bytes(384, "big")
    try:
        rsa.RSAPublicNumbers(3, n).public_key().verify(
            signature, data[:128] + data[900:1028], padding.PKCS1v15(), hashes.SHA256()
        )
    except (InvalidSignature, ValueError):
        raise AttestationError("SIGSTRUCT signature does not verify: the .sig was altered after signing") \
            from None
    flags = int.from_bytes(data[928:936], "little")
    return Sigstruct(
        mr_enclave=data[960:992],
        mr_signer=hashlib.sha256(modulus_le).digest(),
        isv_prod_id=int.from_bytes(data[1024:1026], "little"),
        isv_svn=int.from_bytes(data[1026:1028], "little"),
        debug=bool(flags & _FLAG_DEBUG),
    )
