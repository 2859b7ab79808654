"""PeerLink frame handling without the network: hostile or broken frame sequences fail closed."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from fldsl.runtime.transport import FlowRefused, FrameError, codec
from fldsl.runtime.transport import fldsl_pb2 as pb
from fldsl.runtime.transport.guard import FlowGuard
from fldsl.runtime.transport.link import Outbox, PeerLink, StatsBook, Stream

from .conftest import A, B, pair_flows, policy_for


def _link() -> tuple[PeerLink, Stream]:
    link = PeerLink(me=B, peer_id=A, dial=False, guard=FlowGuard(policy_for(B, pair_flows()), B),
                    stats=StatsBook(), chunk_bytes=1024, send_buffer_bytes=1 << 20, connect_timeout_s=5)
    stream = Stream(outbox=Outbox(1 << 20))
    link.attach(stream)
    return link, stream


def _sent_errors(stream: Stream) -> list[str]:
    stream.outbox.close()
    out = []
    for frame in stream.outbox:
        header, _ = codec.decode_frame(frame)
        if header.WhichOneof("kind") == "error":
            out.append(header.error.reason)
    return out


def test_chunked_message_reassembles() -> None:
    link, stream = _link()
    arr = np.arange(16 * 100, dtype=np.float32).reshape(100, 16)  # 6400 bytes -> 7 chunks of <= 1024
    frames = list(codec.tensor_frames("act", 3, arr, 1024))
    assert len(frames) == 7
    for f in frames:
        link.on_frame(stream, f)
    np.testing.assert_array_equal(link.recv("act", 3, timeout=1), arr)


def test_out_of_order_chunk_fails_closed_and_tells_the_peer() -> None:
    link, stream = _link()
    frames = list(codec.tensor_frames("act", 0, np.ones((100, 16), np.float32), 1024))
    link.on_frame(stream, frames[0])
    link.on_frame(stream, frames[2])  # chunk 1 skipped
    with pytest.raises(FrameError, match="out of sequence"):
        link.recv("act", 0, timeout=1)
    errors = _sent_errors(stream)
    assert errors and "refused by shop.trainer: malformed frame" in errors[0]


def test_huge_announced_size_is_refused_before_any_allocation() -> None:
    link, stream = _link()
    header = pb.Frame(tensor=pb.TensorHeader(flow="act", step=0, dtype="float32", shape=[1 << 40, 16],
                                             chunk=0, chunks=1 << 20, total_bytes=(1 << 40) * 64))
    link.on_frame(stream, codec.encode_frame(header, [memoryview(b"\0" * 64)]))
    with pytest.raises(FlowRefused, match="allows at most"):
        link.recv("act", 0, timeout=1)


def test_lying_size_fields_are_malformed() -> None:
    link, stream = _link()
    header = pb.Frame(tensor=pb.TensorHeader(flow="act", step=0, dtype="float32", shape=[2, 16],
                                             chunk=0, chunks=1, total_bytes=64))  # 2x16 floats is 128 bytes
    link.on_frame(stream, codec.encode_frame(header, [memoryview(b"\0" * 64)]))
    with pytest.raises(FrameError, match="does not have 64 bytes"):
        link.recv("act", 0, timeout=1)


def test_garbage_bytes_fail_closed() -> None:
    link, stream = _link()
    link.on_frame(stream, b"\xff\xff\xff")
    with pytest.raises(FrameError):
        link.recv("act", 0, timeout=1)


def test_a_malformed_frame_is_a_refusal_naming_the_peer() -> None:
    """Like any policy violation (exit code 3 at the node), not an anonymous transport failure."""
    link, stream = _link()
    link.on_frame(stream, b"\xff\xff" + bytes(20))
    with pytest.raises(FlowRefused, match=rf"^refused a message from {A}: malformed frame: unsupported wire"):
        link.recv("act", 0, timeout=1)
    assert _sent_errors(stream) == [f"refused by {B}: malformed frame: unsupported wire type 7 in frame"]


def test_both_directions_and_concurrent_senders(pair) -> None:
    la, lb = pair.a.link(B, timeout=15), pair.b.link(A, timeout=15)
    n = 12
    big = np.ones((16 * 1024, 16), np.float32)  # 1 MiB

    def send_a(offset: int) -> None:
        for i in range(offset, n, 2):
            la.send("act", i, big * i)

    def send_b() -> None:
        for i in range(n):
            lb.send("grad", i, big * -i)

    threads = [threading.Thread(target=send_a, args=(0,)), threading.Thread(target=send_a, args=(1,)),
               threading.Thread(target=send_b)]
    for t in threads:
        t.start()
    for i in reversed(range(n)):
        assert float(lb.recv("act", i, timeout=30)[5, 5]) == i
        assert float(la.recv("grad", i, timeout=30)[5, 5]) == -i
    for t in threads:
        t.join(10)
    assert pair.a.stats["act"].messages_sent == n and pair.b.stats["act"].messages_received == n


def test_unfinished_chunked_messages_are_bounded() -> None:
    link, stream = _link()
    for step in range(17):
        first = next(iter(codec.tensor_frames("act", step, np.ones((100, 16), np.float32), 1024)))
        link.on_frame(stream, first)
    with pytest.raises(FrameError, match="more than 16 chunked messages"):
        link.recv("act", 0, timeout=1)
