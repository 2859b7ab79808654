"""The receive budget of a link: what a peer can make this node hold that its role has not read."""

from __future__ import annotations

import numpy as np
import pytest

from fldsl.artifacts import TensorSpec
from fldsl.runtime.transport import FlowRefused, codec
from fldsl.runtime.transport import fldsl_pb2 as pb
from fldsl.runtime.transport.errors import ReceiveBudgetExceeded
from fldsl.runtime.transport.guard import FlowGuard
from fldsl.runtime.transport.link import MESSAGE_CHARGE, Outbox, PeerLink, StatsBook, Stream, receive_budget

from .conftest import A, B, flow, policy_for

ACT = 64 * 16 * 4 + 256  # an activation flow sized for batch 64, as the compiler would


def _link() -> tuple[PeerLink, Stream]:
    flows = [flow("act", A, B, TensorSpec(shape=[None, 16], dtype="float32"), ACT),
             flow("grad", B, A, TensorSpec(shape=[None, 16], dtype="float32"), ACT)]
    link = PeerLink(me=B, peer_id=A, dial=False, guard=FlowGuard(policy_for(B, flows), B), stats=StatsBook(),
                    chunk_bytes=1 << 20, send_buffer_bytes=1 << 20, connect_timeout_s=5)
    stream = Stream(outbox=Outbox(1 << 30))
    link.attach(stream)
    return link, stream


def _frame(step: int, rows: int = 64) -> bytes:
    (frame,) = codec.tensor_frames("act", step, np.ones((rows, 16), np.float32), 1 << 20)
    return frame


def test_budget_is_derived_from_the_peers_flows() -> None:
    link, _ = _link()
    want = receive_budget(link._guard.flows.values(), A, B)
    assert want == 4 * max(ACT, MESSAGE_CHARGE) + (64 << 20)  # only flows from A to B count
    assert link._budget == want


def test_flood_of_far_future_steps_is_refused_naming_the_limit() -> None:
    link, stream = _link()
    for s in range(4):  # the role is at step 3
        link.on_frame(stream, _frame(s))
        link.recv("act", s, timeout=1)
    frame = _frame(0)
    sent = 0
    most = link._budget // MESSAGE_CHARGE
    for i in range(most + 10):  # valid messages of steps nobody will read for a long time
        link.on_frame(stream, _frame(10**9 + i))
        sent += 1
        if link._failure is not None:
            break
        assert link._held_bytes <= link._budget
    assert isinstance(link._failure, ReceiveBudgetExceeded)
    assert sent <= most + 1
    with pytest.raises(FlowRefused) as err:
        link.recv("act", 4, timeout=1)
    msg = str(err.value)
    assert f"media.trainer sent {sent:,} messages" in msg and "ahead of step 3" in msg, msg
    assert "limit 64.0 MiB per link" in msg and "refusing" in msg, msg
    # The peer is told why, and nothing more is accepted.
    held = link._held_bytes
    link.on_frame(stream, frame)
    assert link._held_bytes == held
    stream.outbox.close()
    reasons = [codec.decode_frame(f)[0].error.reason for f in stream.outbox
               if codec.decode_frame(f)[0].WhichOneof("kind") == "error"]
    assert reasons and "ahead of step 3" in reasons[0]


def test_messages_read_as_they_come_never_exhaust_the_budget() -> None:
    link, stream = _link()
    for s in range(3 * (link._budget // MESSAGE_CHARGE) // 2):  # more than the budget holds, read in turn
        link.on_frame(stream, _frame(s, rows=1))
        link.recv("act", s, timeout=1)
    assert link._failure is None and link._held_bytes == 0


def test_iteration_markers_are_refused() -> None:
    """No role sends them (they were held for a recv_control nobody called, until the budget ran out)."""
    link, stream = _link()
    link.on_frame(stream, codec.control_frame(pb.Control.START, 1))
    assert link._failure is not None and "unexpected control kind" in str(link._failure), link._failure
