"""How many Exchange streams one peer may hold open, or replace, on a link (red-team finding: 2,000 streams
from one attested peer). The check against real node processes is in tests/e2e/test_peer_abuse.py."""

from __future__ import annotations

import pytest

from fldsl.runtime.transport import FlowRefused, TransportError
from fldsl.runtime.transport.errors import StreamLimitExceeded
from fldsl.runtime.transport.guard import FlowGuard
from fldsl.runtime.transport.link import (
    MAX_LIVE_REPLACEMENTS,
    MAX_STREAMS_PER_PEER,
    Outbox,
    PeerLink,
    StatsBook,
    Stream,
)

from .conftest import A, B, pair_flows, policy_for


def _link() -> PeerLink:
    return PeerLink(me=B, peer_id=A, dial=False, guard=FlowGuard(policy_for(B, pair_flows()), B),
                    stats=StatsBook(), chunk_bytes=1 << 20, send_buffer_bytes=1 << 20, connect_timeout_s=5)


def _stream() -> Stream:
    return Stream(outbox=Outbox(1 << 20))


def test_streams_past_the_per_peer_limit_fail_the_link_naming_it() -> None:
    link = _link()
    for _ in range(MAX_STREAMS_PER_PEER):
        link.open_stream()
    link.stream_closed()
    link.open_stream()  # one ended: room for one more
    with pytest.raises(StreamLimitExceeded) as err:
        link.open_stream()
    msg = str(err.value)
    limit = MAX_STREAMS_PER_PEER
    assert msg == (f"{A} opened more than {limit} Exchange streams to {B} at once (limit {limit} per peer: a "
                   "node dials one stream at a time, and its last one may still be closing): refusing")
    assert err.value.peer == A and link.failure is err.value
    # Fail closed: the role's next receive raises it; later calls are refused at once, without counting.
    with pytest.raises(FlowRefused, match="limit 2 per peer"):
        link.recv("act", 0, timeout=1)
    for _ in range(100):
        link.stream_closed()
    with pytest.raises(TransportError, match=rf"^{B} refused {A}: {A} opened more than") as again:
        link.open_stream()
    assert not isinstance(again.value, StreamLimitExceeded)


def test_a_stream_replacing_a_live_one_again_and_again_fails_the_link() -> None:
    link = _link()
    assert link.attach(_stream()) == 1
    for i in range(MAX_LIVE_REPLACEMENTS):  # a restart, a dead connection the keepalive has not noticed yet
        assert link.attach(_stream()) == i + 2
    late = _stream()
    with pytest.raises(StreamLimitExceeded) as err:
        link.attach(late)
    assert str(err.value) == (
        f"{A} replaced its Exchange stream to {B} while it was up {MAX_LIVE_REPLACEMENTS + 1} times (limit "
        f"{MAX_LIVE_REPLACEMENTS} per link: a node opens a new stream once its last one ended): refusing")
    assert link.generation == MAX_LIVE_REPLACEMENTS + 1 and late.outbox.closed
    with pytest.raises(FlowRefused, match=f"limit {MAX_LIVE_REPLACEMENTS} per link"):
        link.recv("act", 0, timeout=1)


def test_a_stream_after_the_last_one_ended_is_no_replacement() -> None:
    link = _link()
    for i in range(3 * MAX_LIVE_REPLACEMENTS):  # reconnections after real disconnections: never limited
        stream = _stream()
        assert link.attach(stream) == i + 1
        link.detach(stream, "connection reset")
    assert link.failure is None
