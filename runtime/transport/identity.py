"""What the transport needs from the trust layer (``fldsl.runtime.attestation``), as protocols.

The transport only needs a certificate + key to present and a verifier to judge peers; typing them as
protocols keeps the transport importable and testable on its own.
"""

from __future__ import annotations

from typing import Any, Protocol


class LocalIdentityLike(Protocol):
    """``fldsl.runtime.attestation.ratls.LocalIdentity``: this node's RA-TLS key and certificate (PEM)."""

    @property
    def key_pem(self) -> bytes: ...

    @property
    def cert_pem(self) -> bytes: ...


class PeerVerifierLike(Protocol):
    """``fldsl.runtime.attestation.verify.PeerVerifier``: raises ``PeerRefused`` for a peer it refuses."""

    def verify(self, cert_pem: bytes, expect_node: str | None) -> Any: ...


def refusal_field(exc: BaseException) -> str | None:
    """The identity field a verifier refusal names (``PeerRefused.field``), if any."""
    field = getattr(exc, "field", None)
    return field if isinstance(field, str) else None


def is_trust_failure(exc: BaseException) -> bool:
    """True for attestation refusals on either side (our verifier's, or the peer's reply at Hello)."""
    from .errors import RemoteRefused

    if isinstance(exc, RemoteRefused):
        return True
    try:
        from fldsl.runtime.attestation.verify import PeerRefused
    except ImportError:  # trust layer absent: recognise it by name
        return type(exc).__name__ == "PeerRefused"
    return isinstance(exc, PeerRefused)
