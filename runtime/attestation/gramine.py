"""The real attestation backend: DCAP quotes through Gramine's ``/dev/attestation`` (Gramine's attestation
pseudo-files: ``user_report_data``, ``quote``).

Runs inside ``gramine-sgx`` with ``sgx.remote_attestation = "dcap"``. The root is configurable so tests run
against a fake directory with the same files. Fails closed: anything but ``attestation_type == "dcap"`` is an
error, never a silent fallback to simulation.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fldsl.runtime.attestation import qvl
from fldsl.runtime.attestation.backend import AttestationError, Verdict
from fldsl.runtime.attestation.quote import Quote, QuoteError

DEFAULT_ROOT = Path("/dev/attestation")


def available(root: Path | str = DEFAULT_ROOT) -> bool:
    """True when this process runs inside gramine-sgx with DCAP attestation configured."""
    try:
        return (Path(root) / "attestation_type").read_bytes().strip() == b"dcap"
    except OSError:
        return False


class GramineBackend:
    kind = "gramine"

    def __init__(self, root: Path | str = DEFAULT_ROOT) -> None:
        self.root = Path(root)
        try:
            att_type = (self.root / "attestation_type").read_bytes().decode("ascii", "replace").strip()
        except OSError as e:
            raise AttestationError(
                f"{self.root}/attestation_type unreadable ({e.strerror}): not running inside gramine-sgx? "
                "Use the sim backend outside an enclave."
            ) from None
        if att_type != "dcap":
            raise AttestationError(
                f"Gramine reports attestation_type {att_type!r}, expected 'dcap' — set "
                'sgx.remote_attestation = "dcap" in the manifest'
            )

    def quote(self, report_data: bytes) -> bytes:
        if len(report_data) != 64:
            raise AttestationError(f"report_data must be exactly 64 bytes, got {len(report_data)}")
        # One 64-byte write: each write() replaces the whole value (two 32-byte writes would keep only one).
        fd = os.open(self.root / "user_report_data", os.O_WRONLY)
        try:
            written = os.write(fd, report_data)
        finally:
            os.close(fd)
        if written != 64:
            raise AttestationError(f"short write to user_report_data ({written} of 64 bytes)")
        # The quote is generated when the file is opened, from the report data just written.
        raw = (self.root / "quote").read_bytes()
        try:
            q = Quote.parse(raw)
        except QuoteError as e:
            raise AttestationError(f"Gramine returned a malformed quote: {e}") from None
        if q.report_data != report_data:
            raise AttestationError("Gramine's quote does not carry the report data we wrote")
        return raw

    def sealing_key(self) -> bytes:
        """32 bytes derived from the 16-byte MRENCLAVE-bound SGX sealing key (never used raw)."""
        raw = (self.root / "keys" / "_sgx_mrenclave").read_bytes()
        if len(raw) != 16:
            raise AttestationError(f"_sgx_mrenclave key has {len(raw)} bytes, expected 16")
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"fldsl-gramine-seal/1", info=b"root").derive(
            raw
        )

    def verify(self, quote: bytes) -> Verdict:
        try:
            q = Quote.parse(quote)
        except QuoteError as e:
            return Verdict(False, False, "malformed", f"malformed quote: {e}")
        try:
            return qvl.verify_dcap_quote(q)
        except qvl.QvlUnavailable as e:
            return Verdict(False, False, "qvl-missing", str(e))
