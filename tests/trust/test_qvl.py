"""The QVL ctypes path against a fake libsgx_dcap_quoteverify.so (compiled here when a C compiler exists).

The fake has Intel's two entry points with the same C signatures; its verdict comes from environment
variables so each QVL outcome can be exercised. What it proves: the marshalling, the result mapping and
that PeerVerifier accepts a real-vendor quote only on SGX_QL_QV_RESULT_OK with fresh collateral.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from fldsl.artifacts import AttestationRequirement, Identity, Pins
from fldsl.runtime.attestation import crypto, qvl, ratls
from fldsl.runtime.attestation.quote import (
    INTEL_QE_VENDOR_ID,
    Quote,
    build_header,
    build_quote,
    make_report_body,
)
from fldsl.runtime.attestation.verify import PeerRefused, PeerVerifier

from .conftest import MR_A

FAKE_QVL_C = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
static uint32_t env(const char *n, uint32_t d) {
    const char *v = getenv(n);
    return v ? (uint32_t)strtoul(v, 0, 0) : d;
}
uint32_t sgx_qv_get_quote_supplemental_data_size(uint32_t *size) { *size = 128; return 0; }
uint32_t sgx_qv_verify_quote(const uint8_t *quote, uint32_t quote_size, const void *collateral, int64_t now,
                             uint32_t *expiration, uint32_t *result, void *qve_report, uint32_t supp_size,
                             uint8_t *supp) {
    if (!quote || quote_size < 1020 || collateral || qve_report) return 0xE002;
    if (!expiration || !result || now <= 0) return 0xE002;
    if (supp_size != 128 || !supp) return 0xE003;
    static const uint8_t intel[16] = {0x93, 0x9a, 0x72, 0x33, 0xf7, 0x9c, 0x4c, 0xa9,
                                      0x94, 0x0a, 0x0d, 0xb3, 0x95, 0x7f, 0x06, 0x07};
    if (memcmp(quote + 12, intel, 16)) return 0xE004;
    *expiration = env("FAKE_QVL_EXPIRED", 0);
    *result = env("FAKE_QVL_RESULT", 0);
    return env("FAKE_QVL_RC", 0);
}
"""


@pytest.fixture(scope="module")
def fake_qvl(tmp_path_factory) -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the fake QVL library")
    d = tmp_path_factory.mktemp("qvl")
    (d / "fake_qvl.c").write_text(FAKE_QVL_C)
    lib = d / "libsgx_dcap_quoteverify.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(lib), str(d / "fake_qvl.c")], check=True)
    return str(lib)


class IntelLookalikeBackend:
    """Quotes with Intel's QE vendor id (signed by sim keys): only the fake QVL can 'verify' them."""

    kind = "gramine"

    def __init__(self, deployment) -> None:
        self.dep = deployment

    def quote(self, report_data: bytes) -> bytes:
        att_pub = crypto.raw_public_p256(self.dep.attestation_key)
        qe = make_report_body(
            mr_enclave=b"\1" * 32, mr_signer=b"\2" * 32, isv_prod_id=1, isv_svn=1, report_data=b"\0" * 64
        )
        body = make_report_body(
            mr_enclave=MR_A, mr_signer=self.dep.mr_signer, isv_prod_id=7, isv_svn=2, report_data=report_data
        )
        return build_quote(
            header=build_header(vendor_id=INTEL_QE_VENDOR_ID),
            body=body,
            sign=lambda d: crypto.sign_raw_p256(self.dep.attestation_key, d),
            attestation_key=att_pub,
            qe_report=qe,
            qe_report_signature=b"\0" * 64,
            qe_auth_data=b"",
            cert_data=b"chain\0",
        )

    def sealing_key(self) -> bytes:
        return b"\0" * 32

    def verify(self, quote: bytes):
        return qvl.verify_dcap_quote(Quote.parse(quote))


@pytest.fixture
def with_fake(fake_qvl, monkeypatch):
    monkeypatch.setenv(qvl.ENV_LIB, fake_qvl)
    for var in ("FAKE_QVL_RESULT", "FAKE_QVL_EXPIRED", "FAKE_QVL_RC"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def _setup(deployment):
    pins = Pins(
        pipeline="r",
        nodes={
            "a.n": Identity(
                mr_enclave=[MR_A.hex()],
                mr_signer=deployment.mr_signer.hex(),
                isv_prod_id=7,
                isv_svn_min=2,
                measurement_kind="sgx",
            )
        },
    )
    cert = ratls.make_identity(
        IntelLookalikeBackend(deployment), node_id="a.n", pins_digest=pins.digest()
    ).cert_pem
    v = PeerVerifier(
        pins, AttestationRequirement(mode="dcap"), sim_roots=None, own_pins_digest=pins.digest()
    )
    return v, cert


def test_qvl_ok_accepts_a_real_vendor_quote(with_fake, deployment):
    v, cert = _setup(deployment)
    verdict = v.verify(cert, "a.n")
    assert not verdict.simulated and verdict.quote_verdict.status == "ok"
    assert "Intel QVL verified" in verdict.summary


@pytest.mark.parametrize(
    ("env", "status"),
    [
        ({"FAKE_QVL_RESULT": "0xA002"}, "out_of_date"),
        ({"FAKE_QVL_RESULT": "0xA005"}, "revoked"),
        ({"FAKE_QVL_RESULT": "0xA004"}, "invalid_signature"),
        ({"FAKE_QVL_RESULT": "0xA001"}, "config_needed"),
        ({"FAKE_QVL_EXPIRED": "1"}, "collateral-expired"),
        ({"FAKE_QVL_RC": "0xE011"}, "qvl-error"),
    ],
)
def test_every_non_ok_qvl_outcome_is_refused_with_its_name(with_fake, deployment, env, status):
    for k, val in env.items():
        with_fake.setenv(k, val)
    v, cert = _setup(deployment)
    with pytest.raises(PeerRefused) as info:
        v.verify(cert, "a.n")
    assert info.value.field == "quote" and info.value.actual == status


def test_the_fake_rejects_bad_marshalling(with_fake, deployment):
    """Guard the fake: a non-Intel quote reaching it would be an error, so the real one is what it saw."""
    q = Quote.parse(IntelLookalikeBackend(deployment).quote(b"\0" * 64))
    assert qvl.verify_dcap_quote(q).ok


def test_missing_library_named_in_env_is_unavailable(monkeypatch, tmp_path, deployment):
    monkeypatch.setenv(qvl.ENV_LIB, str(tmp_path / "nope.so"))
    q = Quote.parse(IntelLookalikeBackend(deployment).quote(b"\0" * 64))
    with pytest.raises(qvl.QvlUnavailable):
        qvl.verify_dcap_quote(q)
