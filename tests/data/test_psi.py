"""ECDH PSI: commutativity, correctness at 100k x 100k, nothing raw on the wire, same order both sides,
and fail-closed handling of a peer that breaks the protocol."""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable

import pytest

from fldsl.runtime import psi
from fldsl.runtime.psi import PsiError, blind, hash_to_u, psi_follower, psi_leader


def _run(leader_ids: list[str], follower_ids: list[str], **kw: object
         ) -> tuple[list[str], list[str], list[bytes], list[bytes]]:
    """Both roles in-process: two threads joined by queues; returns results and every message sent."""
    to_f: queue.Queue[bytes] = queue.Queue()
    to_l: queue.Queue[bytes] = queue.Queue()
    sent_l: list[bytes] = []
    sent_f: list[bytes] = []
    out: dict[str, object] = {}

    def tap(q: queue.Queue[bytes], log: list[bytes]) -> Callable[[bytes], None]:
        def send(m: bytes) -> None:
            log.append(m)
            q.put(m)
        return send

    def get(q: queue.Queue[bytes]) -> Callable[[], bytes]:
        return lambda: q.get(timeout=120)

    def follower() -> None:
        try:
            out["f"] = psi_follower(follower_ids, tap(to_l, sent_f), get(to_f), **kw)
        except BaseException as e:  # surfaced in the main thread
            out["f"] = e

    t = threading.Thread(target=follower)
    t.start()
    out["l"] = psi_leader(leader_ids, tap(to_f, sent_l), get(to_l), **kw)
    t.join(timeout=300)
    if isinstance(out["f"], BaseException):
        raise out["f"]
    return out["l"], out["f"], sent_l, sent_f  # type: ignore[return-value]


def test_x25519_blinding_commutes() -> None:
    for i in range(50):
        a, b = os.urandom(32), os.urandom(32)
        u = hash_to_u(f"user-{i}")
        assert blind(a, blind(b, u)) == blind(b, blind(a, u))
    # ... and it is RFC 7748 X25519 (section 5.2, first test vector).
    scalar = bytes.fromhex("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4")
    u = bytes.fromhex("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c")
    want = "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"
    assert blind(scalar, u).hex() == want


def test_hash_to_u_has_a_domain_separator_and_masks_the_top_bit() -> None:
    u = hash_to_u("alice")
    assert u != hashlib.sha256(b"alice").digest()
    assert u[31] & 0x80 == 0 and len(u) == 32


def test_100k_by_100k_half_overlap_is_exact_and_same_order_on_both_sides() -> None:
    n = 100_000
    leader_ids = [f"id{i}" for i in range(n)]
    follower_ids = [f"id{i}" for i in range(n // 2, n + n // 2)][::-1]
    got_l, got_f, sent_l, _ = _run(leader_ids, follower_ids, workers=2)
    assert got_l == got_f
    assert set(got_l) == {f"id{i}" for i in range(n // 2, n)}
    assert len(got_l) == n // 2
    # Batched: 100k values need two BLINDED messages of at most psi.BATCH values.
    blinded = [m for m in sent_l if m[5] == 2]
    assert len(blinded) == 2 and all(len(m) <= 10 + 32 * psi.BATCH for m in blinded)


def test_messages_never_carry_raw_ids_or_their_hashes() -> None:
    private = [f"only-leader-{i}@example.com" for i in range(300)]
    shared = [f"both-{i}@example.com" for i in range(200)]
    mine = [f"only-follower-{i}@example.com" for i in range(300)]
    got_l, got_f, sent_l, sent_f = _run(private + shared, shared + mine)
    assert got_l == got_f and set(got_l) == set(shared)
    wire = b"".join(sent_l + sent_f)
    for item in private + mine + shared:
        assert item.encode() not in wire
        assert hash_to_u(item) not in wire  # unblinded hashes would allow a dictionary attack


def test_order_is_independent_of_input_order_and_secrets_are_fresh() -> None:
    ids = [f"x{i}" for i in range(500)]
    a = _run(ids, ids[::-1])
    b = _run(ids[::-1], ids)
    assert set(a[0]) == set(b[0]) == set(ids)
    assert a[0] != b[0]  # the order is pseudorandom per run (fresh secrets), not derived from the ids
    fixed = {"secret": bytes(range(32))}
    assert _run(ids, ids[::-1], **fixed)[0] == _run(ids[::-1], ids, **fixed)[0]


def test_empty_and_disjoint_sets() -> None:
    assert _run([], ["a", "b"])[:2] == ([], [])
    assert _run(["a"], ["b"])[:2] == ([], [])


def test_duplicate_ids_are_refused() -> None:
    with pytest.raises(PsiError, match="duplicates"):
        psi_leader(["a", "a"], lambda m: None, lambda: b"")


def _hello(role: int, n: int) -> bytes:
    import struct

    return psi.MAGIC + bytes([psi.VERSION, 1]) + struct.pack(">BQI", role, n, psi.BATCH)


@pytest.mark.parametrize(("replies", "message"), [
    ([b"hello"], "not a PSI message"),
    ([psi.MAGIC + bytes([9, 1]) + b"x" * 13], "protocol version 9"),
    ([_hello(0, 1)], "both parties claim the same PSI role"),
    ([_hello(1, 10**12)], "more than the limit"),
    ([_hello(1, 1), psi.MAGIC + bytes([1, 3]) + b"\0" * 36], "expected a BLINDED message, got DOUBLE"),
    ([_hello(1, 1), psi.MAGIC + bytes([1, 2]) + b"\0\0\0\0" + b"\1" * 31], "malformed BLINDED batch"),
    ([_hello(1, 2), psi.MAGIC + bytes([1, 2]) + b"\0\0\0\5" + b"\1" * 32], "out of sequence"),
])
def test_protocol_violations_fail_closed(replies: list[bytes], message: str) -> None:
    it = iter(replies)
    with pytest.raises(PsiError) as e:
        psi_leader(["a", "b"], lambda m: None, lambda: next(it))
    assert message in str(e.value)


def test_low_order_point_from_peer_is_refused() -> None:
    with pytest.raises(PsiError, match="low-order"):
        psi._blind_chunk(os.urandom(32), bytes(32))  # u = 0 is a low-order point


def test_a_peer_echoing_one_value_cannot_make_all_our_ids_common() -> None:
    import struct

    secret_f = os.urandom(32)
    sent: list[bytes] = []
    replies: queue.Queue[bytes] = queue.Queue()

    def send(m: bytes) -> None:
        sent.append(m)
        if m[5] == 2:  # the leader's BLINDED batch: answer as a cheating follower
            own = blind(secret_f, hash_to_u("b"))
            replies.put(psi.MAGIC + bytes([psi.VERSION, 2]) + struct.pack(">I", 0) + own)
        if m[5] == 3:  # after the leader's DOUBLE: echo its one matching value for both leader ids
            echo = m[10:42]
            replies.put(psi.MAGIC + bytes([psi.VERSION, 3]) + struct.pack(">I", 0) + echo * 2)

    replies.put(_hello(1, 1))
    with pytest.raises(PsiError, match="duplicate doubly blinded values"):
        psi_leader(["a", "b"], send, lambda: replies.get(timeout=10))
