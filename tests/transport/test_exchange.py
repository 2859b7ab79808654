"""Two attested transports in one process exchange tensors, lists of arrays, blobs and markers."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from fldsl.runtime.transport import RecvTimeout, TransportError

from .conftest import A, B, Pair


def test_tensors_both_ways(pair: Pair) -> None:
    la = pair.a.link(B, timeout=15)
    lb = pair.b.link(A, timeout=15)
    act = np.arange(32 * 16, dtype=np.float32).reshape(32, 16)
    la.send("act", 0, act)
    got = lb.recv("act", 0, timeout=10)
    np.testing.assert_array_equal(got, act)
    assert got.dtype == np.float32 and got.shape == (32, 16)
    lb.send("grad", 0, -got)
    np.testing.assert_array_equal(la.recv("grad", 0, timeout=10), -act)
    assert la.generation == 1 and lb.generation == 1


def test_big_tensor_is_chunked_and_arrives_intact(pair: Pair) -> None:
    la, lb = pair.a.link(B, timeout=15), pair.b.link(A, timeout=15)
    rng = np.random.default_rng(0)
    big = rng.standard_normal((20 * 1024 * 1024 // 64, 16), dtype=np.float32)  # 20 MiB > 4 MiB limit
    la.send("act", 7, big)
    got = lb.recv("act", 7, timeout=30)
    np.testing.assert_array_equal(got, big)
    stats = pair.b.stats["act"]
    assert stats.messages_received == 1 and stats.bytes_received == big.nbytes
    assert pair.a.stats["act"].bytes_sent == big.nbytes


def test_array_list_round_trip_out_of_order_steps(pair: Pair) -> None:
    la, lb = pair.a.link(B, timeout=15), pair.b.link(A, timeout=15)
    arrays = [np.ones((3, 5), np.float32), np.arange(7, dtype=np.int64), np.zeros((0, 4), np.float64),
              np.array(2.5, np.float32), np.random.default_rng(1).random((300, 300)).astype(np.float32)]
    big = [np.full((1024, 1024), i, np.float32) for i in range(6)]  # 24 MiB: chunked across arrays
    la.send_arrays("weights", 2, big)
    la.send_arrays("weights", 1, arrays)
    got1 = lb.recv_arrays("weights", 1, timeout=10)  # asked for first although sent second
    assert len(got1) == len(arrays)
    for x, y in zip(got1, arrays, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)
    got2 = lb.recv_arrays("weights", 2, timeout=30)
    for i, x in enumerate(got2):
        assert x.shape == (1024, 1024) and float(x[0, 0]) == i and float(x[-1, -1]) == i


def test_blobs(pair: Pair) -> None:
    la, lb = pair.a.link(B, timeout=15), pair.b.link(A, timeout=15)
    la.send_blob("psi", 0, b"\x00hello\xff" * 1000)
    assert lb.recv_blob("psi", 0, timeout=5) == b"\x00hello\xff" * 1000
    lb.send_blob("psi_back", 0, b"")
    assert la.recv_blob("psi_back", 0, timeout=5) == b""


def test_recv_waits_for_a_later_send(pair: Pair) -> None:
    la, lb = pair.a.link(B, timeout=15), pair.b.link(A, timeout=15)
    out: list[np.ndarray] = []
    t = threading.Thread(target=lambda: out.append(lb.recv("act", 3, timeout=10)))
    t.start()
    la.send("act", 3, np.ones((2, 16), np.float32))
    t.join(10)
    assert out and out[0].shape == (2, 16)


def test_close_delivers_everything_sent_before_it(pair: Pair) -> None:
    la, lb = pair.a.link(B, timeout=15), pair.b.link(A, timeout=15)
    big = np.random.default_rng(2).standard_normal((2 * 1024 * 1024, 4), dtype=np.float32)  # 32 MiB
    la.send("act", 0, big[:, :1].repeat(16, axis=1)[:100_000])
    la.send_arrays("weights", 0, [big])
    pair.a.close()  # returns once B acknowledged having read both messages
    assert lb.recv("act", 0, timeout=1).shape == (100_000, 16)
    np.testing.assert_array_equal(lb.recv_arrays("weights", 0, timeout=1)[0], big)
    with pytest.raises(TransportError, match=r"media\.trainer closed the link before sending flow 'act'"):
        lb.recv("act", 1, timeout=5)


def test_recv_timeout_names_flow_step_and_peer(pair: Pair) -> None:
    lb = pair.b.link(A, timeout=15)
    with pytest.raises(RecvTimeout, match=r"flow 'act' step 42 from media\.trainer within 0\.2 s"):
        lb.recv("act", 42, timeout=0.2)
    la = pair.a.link(B, timeout=15)
    la.send_blob("psi", 42, b"x")
    with pytest.raises(TransportError, match="'psi' step 42 as opaque bytes, but a tensor was expected"):
        lb.recv("psi", 42, timeout=5)
