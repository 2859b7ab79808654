"""Unit tests of the handshake proofs: challenges, transcripts, signatures, printable peer text."""

from __future__ import annotations

import pytest

from fldsl.runtime.transport import fldsl_pb2 as pb
from fldsl.runtime.transport import handshake

from .conftest import A, B, make_test_identity


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_challenge_is_accepted_once_within_its_lifetime_and_only_by_its_issuer() -> None:
    clock = Clock()
    book = handshake.ChallengeBook(ttl_s=30, clock=clock)
    c = book.issue()
    assert book.check(c) is None and book.consume(c) is None
    assert "already used" in (book.consume(c) or "")
    late = book.issue()
    clock.now += 31
    assert "expired" in (book.check(late) or "")
    assert "not issued by this node" in (handshake.ChallengeBook(clock=clock).check(book.issue()) or "")
    assert "no challenge" in (book.check(b"") or "")
    tampered = bytearray(book.issue())
    tampered[0] ^= 1  # claims another issue time
    assert "not issued by this node" in (book.check(bytes(tampered)) or "")


def test_used_challenges_are_bounded() -> None:
    clock = Clock()
    book = handshake.ChallengeBook(ttl_s=30, max_used=4, clock=clock)
    for _ in range(4):
        assert book.consume(book.issue()) is None
    assert "too many handshakes" in (book.consume(book.issue()) or "")
    clock.now += 31  # the used ones expire, and their room with them
    assert book.consume(book.issue()) is None


def _exchange() -> tuple[pb.HelloRequest, pb.HelloReply]:
    a, b = make_test_identity(A), make_test_identity(B)
    request = handshake.hello_request(a.cert_pem, a.key_pem, node_id=A, expect_node=B, challenge=b"c" * 40)
    reply = handshake.signed_reply(request, me=B, cert_pem=b.cert_pem, key_pem=b.key_pem, ok=False,
                                   field="mr_enclave", reason="refused by shop.trainer: mr_enclave")
    return request, reply


@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")  # flipped serials
def test_every_bit_of_the_reply_and_of_our_request_is_bound() -> None:
    request, reply = _exchange()
    assert handshake.client_signature_ok(request) and handshake.server_signature_ok(request, reply)
    raw = reply.SerializeToString()
    for i in range(0, len(raw), 7):  # a bit flipped anywhere: unparseable, or the signature fails
        flipped = bytearray(raw)
        flipped[i] ^= 1
        try:
            forged = pb.HelloReply.FromString(bytes(flipped))
        except Exception:
            continue
        assert not handshake.server_signature_ok(request, forged), f"bit flip at byte {i} went unnoticed"
    for change in ({"node_id": "evil.node"}, {"expect_node": "other.node"}, {"challenge": b"d" * 40},
                   {"client_nonce": b"\0" * 32}):
        altered = pb.HelloRequest()
        altered.CopyFrom(request)
        for key, value in change.items():
            setattr(altered, key, value)
        assert not handshake.client_signature_ok(altered), change
        assert not handshake.server_signature_ok(altered, reply), change  # the reply is bound to our request


def test_a_copied_certificate_signed_with_another_key_proves_nothing() -> None:
    victim, attacker = make_test_identity(A), make_test_identity(A)
    request = handshake.hello_request(victim.cert_pem, attacker.key_pem, node_id=A, expect_node=B,
                                      challenge=b"c" * 40)
    assert not handshake.client_signature_ok(request)
    assert not handshake.signature_ok(b"not a certificate", request.signature, b"x")


@pytest.mark.parametrize(("text", "expected"), [
    ("plain", '"plain"'),
    ("esc\x1b[2J bell\x07 nl\r\nend", '"esc?[2J bell? nl end"'),
    ('say "hi"', "\"say 'hi'\""),
    ("bidi \u202eevil", '"bidi ?evil"'),
])
def test_peer_text_is_printable_quoted_and_capped(text: str, expected: str) -> None:
    assert handshake.quoted(text) == expected
    long = handshake.quoted("A" * 5000)
    assert len(long) == handshake.PEER_TEXT_CHARS + 2 and long.endswith('…"')
