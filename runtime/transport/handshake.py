"""The bootstrap handshake's proofs: a fresh challenge, and a signature by each side's certificate key.

Why: certificates are public. Without proofs, a captured certificate replayed at Hello replaced the pinned
one (so the genuine peer could not connect), and the dialer took whatever came back from the bootstrap port
for the peer's verdict (one flipped bit ended the run as a trust failure). RA-TLS deployments bind a
verifier challenge into the evidence. Our certificate's quote already binds its key, so a signature with
that key over a fresh nonce proves possession and freshness with the quote/claims format unchanged::

    dialer                                     acceptor
    Challenge()                          ->    challenge = issued | random | MAC(secret, issued | random)
    Hello(cert_A, ids, challenge, nonce_A,
          Sign_A(client transcript))     ->    challenge fresh and unused, Sign_A valid for cert_A's key,
                                               then the plan and the verifier; only then is cert_A pinned
                                         <-    reply (ok or refusal, field, reason), cert_B, Sign_B(server
                                               transcript): over nonce_A, so it cannot be replayed either
    Sign_B valid for cert_B's key, cert_B verified: only then is the reply the peer's verdict.

Transcripts are domain-separated (role label) and length-prefixed, so no field can slide into another and a
client signature never passes as a server one. Challenges are stateless (a MAC with a per-process secret),
so asking for many costs the acceptor nothing; a challenge is consumed only by a Hello whose signature
verified, so the set of used challenges grows only with work the sender had to sign for.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
import unicodedata
from collections.abc import Callable

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from . import fldsl_pb2 as pb

log = logging.getLogger("fldsl.transport.handshake")

PROTOCOL = b"fldsl-hello-v1"
NONCE_BYTES = 32
CHALLENGE_TTL_S = 30.0  # a dialer uses its challenge within one round trip; 30 s allows a slow enclave
MAX_USED_CHALLENGES = 50_000  # signed Hellos remembered for CHALLENGE_TTL_S (a few MB at most)
MAX_CERT_BYTES = 64 << 10  # fldsl certificates are ~10 KiB (two quotes and a chain)
PEER_TEXT_CHARS = 200  # what an unauthenticated reply may print in our error messages
VERDICT_TEXT_CHARS = 1000  # an attested peer's refusal (it names hashes and a likely cause)

# Acceptor refusals that say "ask again", not "you are not trusted": never a trust failure.
RETRY_FIELDS = frozenset({"challenge", "possession"})
# Verifier fields that say the evidence itself is not proven genuine (not a valid certificate, a key the
# quote does not bind, a quote we cannot verify): anyone can produce these, so they never decide a run.
# Every other field (node, pins, attributes, mr_enclave, ...) is checked only after the quote proved
# genuine, so it is a verdict on a real enclave.
EVIDENCE_FIELDS = frozenset({"certificate", "pubkey", "attestation_mode", "quote"})

_ISSUED_BYTES, _RANDOM_BYTES, _MAC_BYTES = 8, 16, 16
CHALLENGE_BYTES = _ISSUED_BYTES + _RANDOM_BYTES + _MAC_BYTES


class ChallengeBook:
    """Issues challenges and accepts each one once, within ``ttl_s``, from this process only."""

    def __init__(self, ttl_s: float = CHALLENGE_TTL_S, max_used: int = MAX_USED_CHALLENGES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._secret = os.urandom(32)
        self._ttl = ttl_s
        self._max_used = max_used
        self._clock = clock
        self._lock = threading.Lock()
        self._used: dict[bytes, float] = {}  # challenge -> when it would have expired anyway

    def issue(self) -> bytes:
        body = int(self._clock() * 1000).to_bytes(_ISSUED_BYTES, "big") + os.urandom(_RANDOM_BYTES)
        return body + self._mac(body)

    def check(self, challenge: bytes) -> str | None:
        """Why ``challenge`` cannot be used (None if it can). Cheap: run before any signature check."""
        if len(challenge) != CHALLENGE_BYTES:
            return "no challenge (call Challenge first)" if not challenge else "malformed challenge"
        body, mac = challenge[:-_MAC_BYTES], challenge[-_MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(body)):
            return "the challenge was not issued by this node (or by an earlier run of it)"
        age = self._clock() - int.from_bytes(body[:_ISSUED_BYTES], "big") / 1000
        if not 0 <= age <= self._ttl:
            return f"the challenge expired (older than {self._ttl:g} s)"
        with self._lock:
            return "the challenge was already used (a replayed Hello)" if challenge in self._used else None

    def consume(self, challenge: bytes) -> str | None:
        """Mark ``challenge`` used (atomically with the check: of two identical Hellos, one wins)."""
        problem = self.check(challenge)
        if problem is not None:
            return problem
        now = self._clock()
        with self._lock:
            if challenge in self._used:
                return "the challenge was already used (a replayed Hello)"
            self._purge(now)
            if len(self._used) >= self._max_used:
                return f"too many handshakes in the last {self._ttl:g} s; try again"
            self._used[challenge] = now + self._ttl
        return None

    def _purge(self, now: float) -> None:
        if len(self._used) < self._max_used // 2:
            return
        for key in [k for k, expiry in self._used.items() if expiry < now]:
            del self._used[key]

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._secret, PROTOCOL + body, hashlib.sha256).digest()[:_MAC_BYTES]


def _transcript(role: bytes, *parts: bytes) -> bytes:
    out = bytearray(PROTOCOL + b"\0" + role + b"\0")
    for part in parts:
        out += len(part).to_bytes(4, "big") + part
    return bytes(out)


def _digest(data: bytes) -> bytes:
    # The certificate exactly as sent: no parsing needed to bind it, and any change to it breaks the proof.
    return hashlib.sha256(data).digest()


def client_transcript(request: pb.HelloRequest) -> bytes:
    return _transcript(b"client", request.challenge, request.client_nonce, request.node_id.encode(),
                       request.expect_node.encode(), _digest(request.cert_pem), request.pins_digest)


def server_transcript(request: pb.HelloRequest, reply: pb.HelloReply) -> bytes:
    # The whole request (through its transcript: our nonce, the challenge, both ids, our certificate) and
    # the whole verdict: the reply answers this Hello and no other, and says exactly this.
    verdict = b"ok" if reply.ok else b"refused"
    return _transcript(b"server", _digest(client_transcript(request)), reply.node_id.encode(), verdict,
                       reply.field.encode(), reply.reason.encode(), _digest(reply.cert_pem))


def sign(key_pem: bytes, data: bytes) -> bytes:
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError("RA-TLS keys are ECDSA keys")
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


def signature_ok(cert_pem: bytes, signature: bytes, data: bytes) -> bool:
    """True only if ``signature`` over ``data`` verifies with the key of ``cert_pem`` (fail closed)."""
    if not cert_pem or not signature or len(cert_pem) > MAX_CERT_BYTES:
        return False
    try:
        key = x509.load_pem_x509_certificate(cert_pem).public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            return False
        key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    except Exception:  # hostile bytes may trip anything in a parser: not proven, so refused
        log.debug("certificate of a signed Hello message could not be read", exc_info=True)
        return False
    return True


def hello_request(cert_pem: bytes, key_pem: bytes, *, node_id: str, expect_node: str, challenge: bytes,
                  pins_digest: bytes = b"") -> pb.HelloRequest:
    """A Hello signed with ``key_pem`` over the acceptor's ``challenge`` and a fresh nonce of ours."""
    request = pb.HelloRequest(cert_pem=cert_pem, node_id=node_id, expect_node=expect_node,
                              pins_digest=pins_digest, challenge=challenge,
                              client_nonce=os.urandom(NONCE_BYTES))
    request.signature = sign(key_pem, client_transcript(request))
    return request


def client_signature_ok(request: pb.HelloRequest) -> bool:
    return len(request.client_nonce) == NONCE_BYTES and signature_ok(
        request.cert_pem, request.signature, client_transcript(request))


def signed_reply(request: pb.HelloRequest, *, me: str, cert_pem: bytes, key_pem: bytes, ok: bool,
                 field: str = "", reason: str = "") -> pb.HelloReply:
    reply = pb.HelloReply(ok=ok, field=field, reason=reason, cert_pem=cert_pem, node_id=me)
    reply.signature = sign(key_pem, server_transcript(request, reply))
    return reply


def server_signature_ok(request: pb.HelloRequest, reply: pb.HelloReply) -> bool:
    return signature_ok(reply.cert_pem, reply.signature, server_transcript(request, reply))


def printable(text: str, limit: int) -> str:
    """``text`` safe to print: control and format characters (escapes, bells, bidi overrides) replaced,
    whitespace runs collapsed, at most ``limit`` characters."""
    cleaned = "".join(
        " " if ch.isspace() else ("?" if unicodedata.category(ch)[0] == "C" else ch) for ch in text)
    cleaned = " ".join(cleaned.split())
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


def quoted(text: str, limit: int = PEER_TEXT_CHARS) -> str:
    """Unauthenticated text for an error message: printable, capped, in double quotes (none inside)."""
    return '"' + printable(text, limit).replace('"', "'") + '"'
