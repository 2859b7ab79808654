"""Real DCAP quote verification through Intel's Quote Verification Library (QVL), via ctypes.

``libsgx_dcap_quoteverify.so`` (package ``libsgx-dcap-quote-verify``) fetches collateral from the PCCS
configured in ``/etc/sgx_default_qcnl.conf`` and checks the PCK chain to the Intel SGX Root CA, the QE
report, the ISV signature and the TCB level (Intel's DCAP Quote Verification Library). We accept only
``SGX_QL_QV_RESULT_OK`` with unexpired collateral: the policy format has no knobs for out-of-date TCBs, so
anything else fails closed with the status named.

Without the library we never pretend: :func:`verify_dcap_quote` raises :class:`QvlUnavailable` and the
peer verifier refuses the peer unless the policy sets ``allow_unverified_real_quotes`` (dev only).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time

from fldsl.runtime.attestation.backend import Verdict
from fldsl.runtime.attestation.quote import INTEL_QE_VENDOR_ID, Quote

LIB_NAME = "sgx_dcap_quoteverify"
ENV_LIB = "FLDSL_QVL_LIBRARY"  # explicit path, e.g. /usr/lib/x86_64-linux-gnu/libsgx_dcap_quoteverify.so.1

RESULTS = {
    0x0000: "OK",
    0xA001: "CONFIG_NEEDED",
    0xA002: "OUT_OF_DATE",
    0xA003: "OUT_OF_DATE_CONFIG_NEEDED",
    0xA004: "INVALID_SIGNATURE",
    0xA005: "REVOKED",
    0xA006: "UNSPECIFIED",
    0xA007: "SW_HARDENING_NEEDED",
    0xA008: "CONFIG_AND_SW_HARDENING_NEEDED",
}


class QvlUnavailable(Exception):
    """Intel's QVL library is not installed here. ``str()`` is user-facing."""


def find_library() -> str | None:
    explicit = os.environ.get(ENV_LIB)
    if explicit:
        return explicit if os.path.exists(explicit) else None
    return ctypes.util.find_library(LIB_NAME)


def _load() -> ctypes.CDLL:
    path = find_library()
    if path is None:
        raise QvlUnavailable(
            "Intel DCAP Quote Verification Library (libsgx_dcap_quoteverify.so) not found, so a real SGX "
            "quote "
            f"cannot be verified here; install libsgx-dcap-quote-verify and a PCCS config, or set {ENV_LIB}"
        )
    try:
        lib = ctypes.CDLL(path)
        get_size, verify = lib.sgx_qv_get_quote_supplemental_data_size, lib.sgx_qv_verify_quote
    except (OSError, AttributeError) as e:
        raise QvlUnavailable(f"cannot load Intel QVL from {path}: {e}") from None
    u32p = ctypes.POINTER(ctypes.c_uint32)
    get_size.argtypes, get_size.restype = [u32p], ctypes.c_uint32
    verify.argtypes = [
        ctypes.c_char_p,  # p_quote
        ctypes.c_uint32,  # quote_size
        ctypes.c_void_p,  # p_quote_collateral (NULL: QVL fetches it through the QCNL/PCCS)
        ctypes.c_int64,  # expiration_check_date (time_t)
        u32p,  # p_collateral_expiration_status
        u32p,  # p_quote_verification_result (sgx_ql_qv_result_t)
        ctypes.c_void_p,  # p_qve_report_info (NULL: verify in-process, no QvE)
        ctypes.c_uint32,  # supplemental_data_size
        ctypes.c_void_p,  # p_supplemental_data
    ]
    verify.restype = ctypes.c_uint32
    return lib


def verify_dcap_quote(quote: Quote, *, now: float | None = None) -> Verdict:
    """Verify a real DCAP quote with QVL. Raises QvlUnavailable when the library is absent."""
    if quote.vendor_id != INTEL_QE_VENDOR_ID:
        return Verdict(False, quote.is_simulated, "not-intel", "the quote's QE vendor id is not Intel's")
    lib = _load()
    supp_size = ctypes.c_uint32(0)
    if lib.sgx_qv_get_quote_supplemental_data_size(ctypes.byref(supp_size)) != 0:
        supp_size.value = 0
    supp = ctypes.create_string_buffer(max(supp_size.value, 1))
    expiration = ctypes.c_uint32(0)
    result = ctypes.c_uint32(0xA006)  # UNSPECIFIED until QVL says otherwise
    rc = lib.sgx_qv_verify_quote(
        quote.raw,
        len(quote.raw),
        None,
        int(now if now is not None else time.time()),
        ctypes.byref(expiration),
        ctypes.byref(result),
        None,
        supp_size.value,
        supp if supp_size.value else None,
    )
    if rc != 0:
        return Verdict(False, False, "qvl-error", f"sgx_qv_verify_quote failed with error {rc:#x}")
    name = RESULTS.get(result.value, f"{result.value:#x}")
    if result.value != 0:
        return Verdict(False, False, name.lower(), f"Intel QVL verdict {name}: quote not accepted")
    if expiration.value != 0:
        return Verdict(
            False, False, "collateral-expired", "Intel QVL: collateral expired (refresh PCCS cache)"
        )
    return Verdict(True, False, "ok", "verified by Intel QVL (TCB up to date)")
