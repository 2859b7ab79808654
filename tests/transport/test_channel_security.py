"""The transport's channel security is an argument (``Transport(security=...)``), not a module to patch."""

from __future__ import annotations

from typing import Any

import numpy as np

from fldsl.bench.node import NoAttestationVerifier, PlainChannels
from fldsl.runtime.transport.channel import MutualTls

from .conftest import A, B, Trust, make_addresses, make_transport


class Recording(MutualTls):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def add_port(self, *args: Any) -> int:
        self.calls.append("add_port")
        return super().add_port(*args)

    def caller(self, *args: Any) -> str | None:
        self.calls.append("caller")
        return super().caller(*args)

    def channel(self, *args: Any) -> Any:
        self.calls.append("channel")
        return super().channel(*args)


def _exchange(a: Any, b: Any) -> None:
    a.start()
    b.start()
    try:
        la, lb = a.link(B, timeout=20), b.link(A, timeout=20)
        la.send("act", 0, np.ones((2, 16), np.float32))
        assert lb.recv("act", 0, timeout=10).shape == (2, 16)
    finally:
        a.close()
        b.close()


def test_the_transport_secures_its_streams_with_the_security_it_is_given(trust: Trust) -> None:
    addresses = make_addresses()
    sa, sb = Recording(), Recording()
    a = make_transport(A, trust.identity(A), trust.verifier(), addresses, security=sa)
    b = make_transport(B, trust.identity(B), trust.verifier(), addresses, security=sb)
    _exchange(a, b)
    assert "add_port" in sa.calls and "channel" in sa.calls  # A dials
    assert "add_port" in sb.calls and "caller" in sb.calls  # B accepts A's stream


def test_bench_plain_channels_need_no_patching(trust: Trust) -> None:
    """The bench's plain mode: no TLS, no attestation verdict; the default transport is untouched."""
    addresses = make_addresses()
    unverified = NoAttestationVerifier(None, None)
    a = make_transport(A, trust.identity(A), unverified, addresses, security=PlainChannels(A))
    b = make_transport(B, trust.identity(B), unverified, addresses, security=PlainChannels(B))
    _exchange(a, b)
    from fldsl.runtime.transport import server, transport

    assert transport.grpc.__name__ == "grpc" and not hasattr(server.NodeServer, "_add_port")
