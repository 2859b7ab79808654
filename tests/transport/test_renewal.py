"""Certificate renewal: a run outlasts its RA-TLS certificates (peers refuse expired ones at Hello)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fldsl.runtime.attestation.verify import PeerRefused

from .conftest import A, B, Trust, make_addresses, make_transport

LIFETIME = dt.timedelta(seconds=6)
RENEW = True


def renewal(trust: Trust, node: str) -> Callable[[], Any]:
    """What the node passes: a fresh key and certificate from its attestation backend."""
    return lambda: trust.identity(node, validity=LIFETIME)


@pytest.mark.timeout(60)
def test_reconnecting_after_the_first_certificates_expired_uses_renewed_ones(trust: Trust) -> None:
    addresses = make_addresses()
    ts = {node: make_transport(node, trust.identity(node, validity=LIFETIME), trust.verifier(), addresses,
                               connect_timeout_s=10, renew_identity=renewal(trust, node) if RENEW else None)
          for node in (A, B)}
    a, b = ts[A], ts[B]
    first = {n: t._identity.cert_pem for n, t in ts.items()}
    b.start()
    a.start()
    try:
        la, lb = a.link(B, timeout=15), b.link(A, timeout=15)
        la.send("act", 0, np.ones((1, 16), np.float32))
        assert lb.recv("act", 0, timeout=10).shape == (1, 16)
        time.sleep(LIFETIME.total_seconds() + 2)  # every first certificate has expired...
        for node in (A, B):  # ...and peers would refuse it at the next Hello
            with pytest.raises(PeerRefused, match="validity window"):
                trust.verifier().verify(first[node], node)
            assert ts[node]._identity.cert_pem != first[node]
        la.send("act", 1, np.ones((2, 16), np.float32))  # the stream that was up stays up
        assert lb.recv("act", 1, timeout=10).shape == (2, 16)
        la._stream.cancel()  # the link breaks: the dialer re-attests with renewed certificates
        deadline = time.monotonic() + 15
        while la.generation < 2 or lb.generation < 2:
            assert time.monotonic() < deadline, "no reconnection with the renewed certificates"
            time.sleep(0.1)
        la.send("act", 2, np.ones((3, 16), np.float32))
        assert lb.recv("act", 2, timeout=10).shape == (3, 16)
    finally:
        a.close()
        b.close()
