"""ECDH private set intersection on Curve25519 (the classic commutative-blinding DH-PSI, as in FATE and
SecretFlow's ECDH-PSI), over a message interface so it runs on the attested channel and in-process in tests.

Protocol (leader L: set X, secret a; follower F: set Y, secret b; H hashes an id to a u-coordinate):

    L -> F  HELLO(|X|)                 F -> L  HELLO(|Y|)
    L -> F  A  = sorted{ a·H(x) }      (F blinds its own set meanwhile)
    F -> L  B  = sorted{ b·H(y) }
    L -> F  BA = [ a·B_i ]             (same order as B)    F computes AB = [ b·A_i ]
    F -> L  AB = [ b·A_i ]             (same order as A)
    both:   intersection = ids whose doubly blinded value is in the other list, ordered by that value

Both sides return the intersection in the same order (sorted by the doubly blinded value ab·H(id)), which
is a pseudorandom order neither side chose. Values are sent in batches (``BATCH`` per message).

Why it is sound (semi-honest parties):
- ``X25519(k, u)`` is the x-only Montgomery ladder computing x([clamp(k)]P) for the point P with x = u on the
  curve OR on its quadratic twist; Curve25519 is twist-secure, so every 255-bit string is a valid input.
  Scalar multiplication is a group action, so X25519(a, X25519(b, u)) == X25519(b, X25519(a, u)) (tested).
- Clamping makes each scalar a multiple of 8, which clears the cofactor (8 on the curve, 4 on the twist):
  every blinded value lies in a prime-order subgroup, where the decisional Diffie-Hellman assumption makes
  a·H(x) for an id the other side does not hold indistinguishable from a random point (with H modelled as a
  random oracle). The few low-order inputs give an all-zero output, which ``cryptography`` rejects; we fail
  closed (probability ~2^-250 for a hashed id).
- H = SHA-256 with a domain separator, top bit masked (X25519 ignores it): ids never appear on the wire.

Limits (documented, inherent to DH-PSI): both parties learn the intersection and each other's set size;
a malicious party may put guessed ids in its set to test membership (PSI cannot prevent that, only policy
and attestation of the code can); no protection against a party that deviates from the protocol other than
strict message validation (fail closed). Cost: 2 scalar multiplications per id per side (~40 µs each with
OpenSSL on this machine); large sets are blinded in a pool of worker processes.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fldsl.runtime.cpu import worker_count

MAGIC = b"FPSI"
VERSION = 1
DOMAIN = b"fldsl-psi/x25519/v1\x00"
POINT = 32
BATCH = 65536  # values per message: 2 MiB
MAX_SET = 200_000_000  # refuse absurd announced sizes (memory exhaustion) before allocating anything
PARALLEL_THRESHOLD = 50_000  # below this a process pool costs more than it saves

_HELLO, _BLINDED, _DOUBLE = 1, 2, 3
_TYPE_NAMES = {_HELLO: "HELLO", _BLINDED: "BLINDED", _DOUBLE: "DOUBLE"}
_LEADER, _FOLLOWER = 0, 1

Send = Callable[[bytes], None]
Recv = Callable[[], bytes]


class PsiError(Exception):
    """The PSI failed or the peer sent something that does not follow the protocol (fail closed)."""


class PsiLimitExceeded(PsiError):
    """The peer announced a larger set than the caller allows (refused before any value is received)."""


# ---------------------------------------------------------------------------------------------------------
# Curve operations
# ---------------------------------------------------------------------------------------------------------


def hash_to_u(item: str) -> bytes:
    """SHA-256(domain || utf-8 id) with the top bit masked: a u-coordinate on the curve or its twist."""
    h = bytearray(hashlib.sha256(DOMAIN + item.encode("utf-8")).digest())
    h[31] &= 0x7F
    return bytes(h)


def blind(secret: bytes, u: bytes) -> bytes:
    """X25519(secret, u): raises PsiError for a low-order input (all-zero result)."""
    try:
        return X25519PrivateKey.from_private_bytes(secret).exchange(X25519PublicKey.from_public_bytes(u))
    except ValueError as e:
        raise PsiError(f"blinding failed: {e}") from None


def _blind_chunk(secret: bytes, blob: bytes) -> bytes:
    """Blind the concatenated 32-byte values of ``blob`` (top-level so process pools can pickle it)."""
    key = X25519PrivateKey.from_private_bytes(secret)
    out = bytearray(len(blob))
    pub = X25519PublicKey.from_public_bytes
    try:
        for i in range(0, len(blob), POINT):
            out[i : i + POINT] = key.exchange(pub(blob[i : i + POINT]))
    except ValueError as e:
        raise PsiError(f"blinding failed (low-order point from the peer?): {e}") from None
    return bytes(out)


def blind_all(secret: bytes, values: bytes, workers: int = 1) -> bytes:
    """Blind every 32-byte value of ``values`` with ``secret``, optionally in ``workers`` processes.

    ``cryptography`` holds the GIL during X25519, so threads do not help; worker processes do. They are
    plain ``python -c`` children fed over pipes (not multiprocessing: its spawn mode re-imports the
    caller's ``__main__``, its fork mode copies half-alive TensorFlow / gRPC threads)."""
    n = len(values) // POINT
    if workers <= 1 or n < PARALLEL_THRESHOLD:
        return _blind_chunk(secret, values)
    per = -(-n // workers) * POINT
    pieces = [values[i : i + per] for i in range(0, len(values), per)]
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in pieces]

    def run(k: int) -> bytes:
        out, err = procs[k].communicate(secret + pieces[k])
        if procs[k].returncode != 0 or len(out) != len(pieces[k]):
            tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
            raise PsiError(f"PSI worker process failed: {tail[0]}")
        return out

    try:
        with ThreadPoolExecutor(len(procs)) as pool:
            return b"".join(pool.map(run, range(len(procs))))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


_WORKER = "from fldsl.runtime.psi import _worker_main; _worker_main()"


def _worker_main() -> None:
    """Child process: read secret || values from stdin, write the blinded values to stdout."""
    data = sys.stdin.buffer.read()
    if len(data) < 32 or (len(data) - 32) % POINT:
        raise SystemExit("malformed input")
    sys.stdout.buffer.write(_blind_chunk(data[:32], data[32:]))
    sys.stdout.buffer.flush()


def default_workers(n: int) -> int:
    """Worker processes for a set of ``n`` ids: ``$FLDSL_PSI_WORKERS`` if set (1 = never spawn, e.g. in an
    enclave whose manifest does not allow child processes), else up to 4 for large sets."""
    env = os.environ.get("FLDSL_PSI_WORKERS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise PsiError(f"FLDSL_PSI_WORKERS must be an integer, got {env!r}") from None
    return 1 if n < PARALLEL_THRESHOLD else worker_count(4)


# ---------------------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------------------


def _frame(kind: int, payload: bytes) -> bytes:
    return MAGIC + bytes([VERSION, kind]) + payload


def _parse(msg: bytes, want: int) -> bytes:
    if not isinstance(msg, bytes | bytearray | memoryview):
        raise PsiError(f"expected a {_TYPE_NAMES[want]} message (bytes), got {type(msg).__name__}")
    msg = bytes(msg)
    if len(msg) < 6 or msg[:4] != MAGIC:
        raise PsiError(f"expected a {_TYPE_NAMES[want]} message: not a PSI message")
    if msg[4] != VERSION:
        raise PsiError(f"peer speaks PSI protocol version {msg[4]}, this node {VERSION}")
    if msg[5] != want:
        got = _TYPE_NAMES.get(msg[5], f"type {msg[5]}")
        raise PsiError(f"expected a {_TYPE_NAMES[want]} message, got {got}")
    return msg[6:]


def _send_hello(send: Send, role: int, n: int) -> None:
    send(_frame(_HELLO, struct.pack(">BQI", role, n, BATCH)))


def _recv_hello(recv: Recv, role: int, max_peer_ids: int | None) -> int:
    body = _parse(recv(), _HELLO)
    if len(body) != 13:
        raise PsiError("malformed HELLO message")
    peer_role, n, _batch = struct.unpack(">BQI", body)
    if peer_role != role:
        raise PsiError("both parties claim the same PSI role (leader/follower)")
    limit = MAX_SET if max_peer_ids is None else min(MAX_SET, max_peer_ids)
    if n > limit:
        raise PsiLimitExceeded(f"the peer announces {n:,} ids for PSI, more than the limit of {limit:,}")
    return n


def _send_values(send: Send, kind: int, values: bytes) -> None:
    n = len(values) // POINT
    for seq, start in enumerate(range(0, n, BATCH)):
        end = min(n, start + BATCH)
        send(_frame(kind, struct.pack(">I", seq) + values[start * POINT : end * POINT]))


def _recv_values(recv: Recv, kind: int, n: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    seq = 0
    while got < n:
        body = _parse(recv(), kind)
        if len(body) < 4 or (len(body) - 4) % POINT:
            raise PsiError(f"malformed {_TYPE_NAMES[kind]} batch: {len(body)} bytes")
        (peer_seq,) = struct.unpack(">I", body[:4])
        count = (len(body) - 4) // POINT
        if peer_seq != seq or count == 0 or count > BATCH or got + count > n:
            raise PsiError(f"{_TYPE_NAMES[kind]} batch {peer_seq} out of sequence or of the wrong size")
        parts.append(body[4:])
        got += count
        seq += 1
    return b"".join(parts)


def _split(values: bytes) -> list[bytes]:
    return [values[i : i + POINT] for i in range(0, len(values), POINT)]


# ---------------------------------------------------------------------------------------------------------
# The two roles
# ---------------------------------------------------------------------------------------------------------


def _prepare(ids: Sequence[str], secret: bytes | None) -> tuple[list[str], bytes]:
    items = [i if isinstance(i, str) else str(i) for i in ids]
    if len(set(items)) != len(items):
        raise PsiError("the id list has duplicates; ids must be unique before PSI")
    if secret is None:
        secret = os.urandom(32)
    if len(secret) != 32:
        raise PsiError("the PSI secret must be 32 bytes")
    return items, secret


def _blind_own(items: list[str], secret: bytes, workers: int) -> tuple[list[str], bytes]:
    """Blind our ids and sort by blinded value: the order we send reveals nothing about our input order."""
    blinded = _split(blind_all(secret, b"".join(hash_to_u(i) for i in items), workers))
    order = sorted(range(len(items)), key=blinded.__getitem__)
    return [items[k] for k in order], b"".join(blinded[k] for k in order)


def _intersect(own_ids: list[str], own_double: bytes, peer_double: bytes) -> list[str]:
    # Distinct ids give distinct doubly blinded values (blinding is a bijection on the group); repeats mean
    # a peer that tries, e.g., to make all our ids look common by echoing one matching value.
    peer = set(_split(peer_double))
    if len(peer) * POINT != len(peer_double):
        raise PsiError("the doubly blinded values contain duplicates (protocol violation)")
    mine = _split(own_double)
    if len(set(mine)) != len(mine):
        raise PsiError("the peer returned duplicate doubly blinded values for our ids (protocol violation)")
    hits = [(v, own_ids[k]) for k, v in enumerate(mine) if v in peer]
    hits.sort()
    return [i for _, i in hits]


def psi_leader(ids: Sequence[str], send: Send, recv: Recv, *, secret: bytes | None = None,
               workers: int | None = None, max_peer_ids: int | None = None) -> list[str]:
    """Run PSI as the leader; returns the common ids in the order both sides agree on. ``max_peer_ids``
    bounds the peer's set (what it may make this node receive and blind)."""
    items, secret = _prepare(ids, secret)
    _send_hello(send, _LEADER, len(items))
    n_peer = _recv_hello(recv, _FOLLOWER, max_peer_ids)
    w = default_workers(max(len(items), n_peer)) if workers is None else workers
    own_ids, own_blinded = _blind_own(items, secret, w)
    _send_values(send, _BLINDED, own_blinded)
    peer_blinded = _recv_values(recv, _BLINDED, n_peer)
    peer_double = blind_all(secret, peer_blinded, w)
    _send_values(send, _DOUBLE, peer_double)
    own_double = _recv_values(recv, _DOUBLE, len(items))
    return _intersect(own_ids, own_double, peer_double)


def psi_follower(ids: Sequence[str], send: Send, recv: Recv, *, secret: bytes | None = None,
                 workers: int | None = None, max_peer_ids: int | None = None) -> list[str]:
    """Run PSI as the follower; returns the same list as the leader's call."""
    items, secret = _prepare(ids, secret)
    n_peer = _recv_hello(recv, _LEADER, max_peer_ids)
    _send_hello(send, _FOLLOWER, len(items))
    w = default_workers(max(len(items), n_peer)) if workers is None else workers
    own_ids, own_blinded = _blind_own(items, secret, w)
    peer_blinded = _recv_values(recv, _BLINDED, n_peer)
    _send_values(send, _BLINDED, own_blinded)
    peer_double = blind_all(secret, peer_blinded, w)
    own_double = _recv_values(recv, _DOUBLE, len(items))
    _send_values(send, _DOUBLE, peer_double)
    return _intersect(own_ids, own_double, peer_double)

