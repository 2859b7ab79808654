"""The attestation backend interface every node uses, whatever produces its quotes.

Two implementations: ``sim.SimBackend`` (default; no hardware; quotes signed by a per-deployment simulated
attestation key) and ``gramine.GramineBackend`` (inside ``gramine-sgx``; real DCAP quotes from
``/dev/attestation``). The runtime picks one; RA-TLS (``ratls``) and sealing only see this protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable


class AttestationError(Exception):
    """Attestation cannot proceed (missing trust material, wrong environment). ``str()`` is user-facing."""


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking that a quote is genuine (not whether its identity is acceptable).

    ``ok`` is False whenever the quote could not be shown genuine; callers must fail closed on it.
    ``status`` is a short machine label: "ok", "unverified" (real quote accepted without QVL, dev only),
    or the reason of a failure ("bad-signature", "untrusted-root", "qvl-missing", ...).
    """

    ok: bool
    simulated: bool
    status: str
    message: str

    @property
    def label(self) -> str:
        if not self.ok:
            return f"REFUSED ({self.status})"
        if self.status == "unverified":
            return "UNVERIFIED real quote (Intel QVL absent; accepted only because the policy allows it)"
        return "SIMULATED (not SGX hardware)" if self.simulated else "verified by Intel QVL"


@runtime_checkable
class AttestationBackend(Protocol):
    kind: Literal["sim", "gramine"]

    def quote(self, report_data: bytes) -> bytes:
        """A quote whose REPORTDATA is exactly ``report_data`` (64 bytes)."""
        ...

    def sealing_key(self) -> bytes:
        """Root key material for sealing (never used directly: ``sealing`` derives keys with HKDF)."""
        ...

    def verify(self, quote: bytes) -> Verdict:
        """Whether a quote (e.g. our own, for self-checks and ``fldsl inspect``) is genuine."""
        ...
