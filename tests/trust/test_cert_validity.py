"""The certificate validity ceiling: peers refuse long-lived RA-TLS certificates; ours stay inside it."""

from __future__ import annotations

import datetime as dt

import pytest

from fldsl.artifacts import Pins
from fldsl.runtime.attestation import ratls
from fldsl.runtime.attestation.sim import SimBackend, SimDeployment
from fldsl.runtime.attestation.verify import PeerRefused, PeerVerifier

from .conftest import SIM

TEN_YEARS = dt.timedelta(days=3652)


def _verifier(pins: Pins, deployment: SimDeployment) -> PeerVerifier:
    return PeerVerifier(pins, SIM,
                        sim_roots=dict.fromkeys(pins.parties(), deployment.root_cert_pem),
                        own_pins_digest=pins.digest())


def test_a_genuine_certificate_valid_for_ten_years_is_refused_naming_the_ceiling(
    deployment: SimDeployment, pins: Pins, backend_a: SimBackend, monkeypatch: pytest.MonkeyPatch,
) -> None:
    verifier = _verifier(pins, deployment)
    # Genuine evidence from this deployment, only the lifetime is wrong (make_identity itself refuses to
    # make it, so lift its ceiling for the making only).
    with monkeypatch.context() as m:
        m.setattr(ratls, "MAX_CERT_VALIDITY", TEN_YEARS * 2, raising=False)
        cert = ratls.make_identity(backend_a, node_id="media.trainer", pins_digest=pins.digest(),
                                   validity=TEN_YEARS).cert_pem
    with pytest.raises(PeerRefused) as err:
        verifier.verify(cert, "media.trainer")
    assert err.value.field == "certificate"
    assert "ceiling of 2 days" in str(err.value)
    assert err.value.actual.startswith("3652")


def test_the_nodes_own_certificates_are_within_the_ceiling(
    deployment: SimDeployment, pins: Pins, backend_a: SimBackend,
) -> None:
    ident = ratls.make_identity(backend_a, node_id="media.trainer", pins_digest=pins.digest())
    ev = ratls.parse_certificate(ident.cert_pem)
    assert ev.not_after - ev.not_before <= ratls.MAX_CERT_VALIDITY
    assert _verifier(pins, deployment).verify(ident.cert_pem, "media.trainer").node_id == "media.trainer"
    # Just under the ceiling is accepted; asking make_identity for more fails before any key is made.
    longest = ratls.MAX_CERT_VALIDITY - ratls.CLOCK_SKEW
    cert = ratls.make_identity(backend_a, node_id="media.trainer", pins_digest=pins.digest(),
                               validity=longest).cert_pem
    assert _verifier(pins, deployment).verify(cert, "media.trainer")
    with pytest.raises(ValueError, match="2-day ceiling"):
        ratls.make_identity(backend_a, node_id="media.trainer", pins_digest=pins.digest(),
                            validity=longest + dt.timedelta(seconds=1))
