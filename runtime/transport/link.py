"""``PeerLink``: the mailbox-style, policed, reconnecting end of one peer pair's bidirectional stream.

A link outlives the gRPC streams that carry it: when the peer disconnects the link waits for a new stream
(the dialer re-attests and reconnects; the acceptor waits to be dialled again) and bumps ``generation`` so
the executor can resynchronise iteration ids (``on_reconnect``). Receives are keyed by (flow, step) so
out-of-order arrival and pipelining work.

Delivery semantics: in order within one stream; at a reconnect, frames queued on the broken stream may be
lost (the generation counter tells the executor), a message whose sending was interrupted is sent again
on the new stream. A policy violation in either direction is fatal for the link (fail closed): every
pending and later call raises :class:`FlowRefused` with the reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from . import codec, handshake
from . import fldsl_pb2 as pb
from .errors import (
    FlowRefused,
    FrameError,
    MalformedFrame,
    PeerUnreachable,
    ReceiveBudgetExceeded,
    RecvTimeout,
    StreamLimitExceeded,
    TransportError,
)
from .guard import FlowGuard, WireSpec
from .keys import STEP_LIMIT

if TYPE_CHECKING:
    from fldsl.artifacts import Flow
    from fldsl.runtime.audit import LinkAudit

log = logging.getLogger("fldsl.transport.link")


@dataclass
class FlowStats:
    """Traffic of one flow on this node (for the run summary)."""

    messages_sent: int = 0
    bytes_sent: int = 0
    messages_received: int = 0
    bytes_received: int = 0


class StatsBook:
    """Thread-safe ``flow id -> FlowStats``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.flows: dict[str, FlowStats] = {}

    def sent(self, flow: str, nbytes: int) -> None:
        with self._lock:
            s = self.flows.setdefault(flow, FlowStats())
            s.messages_sent += 1
            s.bytes_sent += nbytes

    def received(self, flow: str, nbytes: int) -> None:
        with self._lock:
            s = self.flows.setdefault(flow, FlowStats())
            s.messages_received += 1
            s.bytes_received += nbytes

    def snapshot(self) -> dict[str, FlowStats]:
        with self._lock:
            return {k: FlowStats(**vars(v)) for k, v in self.flows.items()}


class StreamClosed(Exception):
    """Internal: the stream an outbox belongs to has ended."""


class Outbox:
    """Byte-bounded FIFO of encoded frames feeding one gRPC stream (gives senders back-pressure)."""

    def __init__(self, limit_bytes: int) -> None:
        self._limit = limit_bytes
        self._q: deque[bytes] = deque()
        self._bytes = 0
        self._cv = threading.Condition()
        self._closed = False

    def put(self, frame: bytes, *, urgent: bool = False) -> None:
        with self._cv:
            # One frame is always admitted when the queue is empty, whatever its size.
            while not urgent and not self._closed and self._bytes and self._bytes + len(frame) > self._limit:
                self._cv.wait()
            if self._closed:
                raise StreamClosed
            self._q.append(frame)
            self._bytes += len(frame)
            self._cv.notify_all()

    def close(self) -> None:
        """No more puts; the frames already queued still leave (the iterator drains, then ends)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def abort(self) -> None:
        """The stream is gone: drop what is queued and wake everyone."""
        with self._cv:
            self._closed = True
            self._q.clear()
            self._bytes = 0
            self._cv.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def pending(self) -> int:
        return len(self._q)

    def __iter__(self) -> Iterator[bytes]:
        while True:
            with self._cv:
                while not self._q and not self._closed:
                    self._cv.wait()
                if not self._q:
                    return
                frame = self._q.popleft()
                self._bytes -= len(frame)
                self._cv.notify_all()
            yield frame


@dataclass
class _Assembly:
    kind: str
    flow: str
    step: int
    chunks: int
    total: int
    buf: bytearray
    next_chunk: int = 1
    written: int = 0
    meta: Any = None  # tensor: (dtype, shape); arrays: list[ArraySpec]


@dataclass
class Stream:
    """One gRPC Exchange call carrying a link (either direction of dialling)."""

    outbox: Outbox
    cancel: Callable[[], Any] = lambda: None
    ready: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    end_reason: str = ""
    assemblies: dict[tuple[str, str, int], _Assembly] = field(default_factory=dict)


# Chunked messages being reassembled at once on one stream (each up to its flow's max_bytes): bounds the
# memory a peer can make us reserve with first chunks it never completes.
_MAX_OPEN_ASSEMBLIES = 16

# Receive budget. A message waits in the mailbox until the role asks for its (flow, step), and the protocols
# read at most a step or two ahead; without a bound, a peer sending messages nobody reads (far-future steps)
# grows this node's memory until it dies. So each link may hold, unread, BUDGET_STEPS messages of every flow
# from that peer at the flow's policy size (bulk transfers, the PSI sets, a data shard, the alignment
# positions, are each sized by the compiler to fit their flow's maximum) plus a floor; every held message
# counts at least MESSAGE_CHARGE bytes (its bookkeeping), so a flood of tiny ones is bounded
# too. A peer that exceeds it is refused: the link fails closed, as for any policy violation.
BUDGET_STEPS = 4
BUDGET_FLOOR = 64 << 20
MESSAGE_CHARGE = 4096
# Role keys below this are training steps (fldsl.runtime.transport.keys); the highest one read says where the
# role is, in a refusal.
_STEP_KEYS = STEP_LIMIT


# Exchange streams a peer may open (acceptor side). A genuine dialer opens one stream at a time, and the next
# one only after it saw the last one end; this node may not have noticed that end yet (a restart racing the
# connection reset, a half-open connection until the keepalive gives up), so two in flight at once is normal,
# more is not. Each stream holds one of the server's worker threads while it lasts.
MAX_STREAMS_PER_PEER = 2
# A new stream that replaces one this node still holds as up bumps the link's generation, which makes the role
# agree with the peer again where to resume (the node re-runs its role at most 10 times). A genuine peer does
# that after a restart or a dead connection; a peer that keeps doing it churns the run.
MAX_LIVE_REPLACEMENTS = 8


def receive_budget(flows: Iterable[Flow], peer: str, me: str) -> int:
    """Bytes a link from ``peer`` may hold that ``me``'s role has not read yet (see BUDGET_STEPS)."""
    per_step = sum(max(f.max_bytes, MESSAGE_CHARGE) for f in flows if f.src == peer and f.dst == me)
    return BUDGET_STEPS * per_step + BUDGET_FLOOR


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"




class PeerLink:
    """This node's end of the link with ``peer_id``. Created and driven by :class:`Transport`."""

    def __init__(
        self, *, me: str, peer_id: str, dial: bool, guard: FlowGuard, stats: StatsBook, chunk_bytes: int,
        send_buffer_bytes: int, connect_timeout_s: float,
    ) -> None:
        self.me = me
        self.peer_id = peer_id
        self.dial = dial
        self._guard = guard
        self._stats = stats
        self._chunk = chunk_bytes
        self._send_buffer = send_buffer_bytes
        self._connect_timeout = connect_timeout_s
        self._cv = threading.Condition()
        self._stream: Stream | None = None
        self._generation = 0
        self._down_since: float | None = time.monotonic()
        self._peer_closed = False
        self._close_acked = False
        self._failure: Exception | None = None
        self._closed = False
        self._mailbox: dict[tuple[str, int], deque[tuple[str, Any, int]]] = {}  # (kind, value, charge)
        self._budget = receive_budget(getattr(guard, "flows", {}).values(), peer_id, me)
        self._held_bytes = 0  # charged bytes of what arrived and the role has not read (under _cv)
        self._held_count = 0
        self._read_step: int | None = None  # the highest training step the role took from this link
        self._callbacks: list[Callable[[int], None]] = []
        self._open_streams = 0  # acceptor side: Exchange calls of this peer being served (under _cv)
        self._replacements = 0  # streams that replaced one still up (under _cv)
        self.peer_summary: str = ""  # the verifier's one-line summary of the peer, set at attestation
        # Acceptor side: why the last Hello claiming to be this peer was refused (for the timeout message;
        # a refusal does not fail the link, or anyone could cut us off with one bad Hello).
        self.last_refusal: str = ""
        # Acceptor side: our verifier's refusal of the last Hello that proved possession of its key; the
        # link's failure if the peer is still missing at the connect timeout (see note_refusal).
        self._refused_evidence: Exception | None = None
        # The audit record of this link (fldsl.runtime.audit), when the node keeps one.
        self.audit: LinkAudit | None = None

    # ------------------------------------------------------------------------------------------------
    # Public API
    # ------------------------------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """1 after the first connection, +1 at each reconnection (re-attested stream)."""
        return self._generation

    @property
    def connected(self) -> bool:
        return self._stream is not None

    def on_reconnect(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(generation)`` (in a helper thread) after every reconnection."""
        with self._cv:
            self._callbacks.append(callback)

    def send(self, flow_id: str, step: int, array: np.ndarray) -> None:
        arr = codec.as_wire_array(array)
        spec = WireSpec(arr.dtype.name, arr.shape)
        self._check_send(flow_id, "tensor", [spec], arr.nbytes)
        self._send(flow_id, arr.nbytes, lambda: codec.tensor_frames(flow_id, step, arr, self._chunk))
        if self.audit is not None:
            self.audit.message("send", flow_id, step, "tensor", [(spec.dtype, spec.shape)], arr.nbytes,
                               [memoryview(arr.reshape(-1)).cast("B")] if arr.size else [])  # type: ignore[arg-type]

    def send_arrays(self, flow_id: str, step: int, arrays: list[np.ndarray]) -> None:
        wire = [codec.as_wire_array(a) for a in arrays]
        packed = codec.pack_arrays(wire)
        specs = [WireSpec(a.dtype.name, a.shape) for a in wire]
        self._check_send(flow_id, "arrays", specs, packed.total)
        self._send(flow_id, packed.total, lambda: codec.arrays_frames(flow_id, step, packed, self._chunk))
        if self.audit is not None:
            self.audit.message("send", flow_id, step, "arrays", [(w.dtype, w.shape) for w in specs],
                               packed.total, packed.segments)

    def send_blob(self, flow_id: str, step: int, data: bytes) -> None:
        self._check_send(flow_id, "blob", [], len(data))
        self._send(flow_id, len(data), lambda: codec.blob_frames(flow_id, step, data, self._chunk))
        if self.audit is not None:
            self.audit.message("send", flow_id, step, "blob", [], len(data), [data])

    def note_peer_cert(self, cert_pem: bytes) -> None:
        """The transport verified and pinned this certificate of the peer (dialled or accepted): the
        identity every later message of the link is recorded with."""
        if self.audit is not None:
            self.audit.attested(cert_pem)

    def recv(self, flow_id: str, step: int, timeout: float | None = None) -> np.ndarray:
        """The tensor of (flow, step). Read-only when it arrived in one frame (zero copy)."""
        return self._take(flow_id, step, "tensor", timeout)

    def recv_arrays(self, flow_id: str, step: int, timeout: float | None = None) -> list[np.ndarray]:
        return self._take(flow_id, step, "arrays", timeout)

    def recv_blob(self, flow_id: str, step: int, timeout: float | None = None) -> bytes:
        return self._take(flow_id, step, "blob", timeout)

    def note_refusal(self, reason: str, refusal: Exception | None) -> None:
        """Acceptor side: a Hello claiming to be this peer was refused. ``refusal`` is our verifier's verdict
        when that Hello proved possession of its certificate's key over our fresh challenge (so it came from
        a live holder of that key, not a replay). It fails nothing now; if the peer is still missing at the
        connect timeout it is the reason (a trust failure, as on the dialer's side), not "unreachable"."""
        with self._cv:
            self.last_refusal = handshake.printable(reason, handshake.VERDICT_TEXT_CHARS)  # names its claims
            if refusal is not None:
                self._refused_evidence = refusal

    def wait_connected(self, timeout: float | None = None) -> None:
        """Block until a stream is up (raises the link's failure, or PeerUnreachable on timeout)."""
        with self._cv:
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._stream is None:
                self._raise_if_failed(pending_ok=False)
                if not self.dial and self._refused_evidence is not None:
                    self._check_down_too_long()  # the dialer's side gives up in Transport._dial_loop
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise PeerUnreachable(
                        f"no attested connection with {self.peer_id} within {timeout:g} s "
                        f"({'dialling it' if self.dial else 'waiting for it to dial'})"
                        + self._refusal_note())
                self._cv.wait(timeout=0.5 if remaining is None else min(remaining, 0.5))

    # ------------------------------------------------------------------------------------------------
    # Sending
    # ------------------------------------------------------------------------------------------------

    def _send(
        self, flow: str, nbytes: int, frames: Callable[[], Iterable[bytes]], count: bool = True,
    ) -> None:
        while True:
            stream = self._current_stream_for_send()
            try:
                for frame in frames():
                    stream.outbox.put(frame)
            except StreamClosed:
                log.info("link %s -> %s: stream ended while sending %s; sending again on the next stream",
                         self.me, self.peer_id, flow)
                continue
            if count:
                self._stats.sent(flow, nbytes)
            return

    def _check_send(self, flow_id: str, kind: Any, specs: list[WireSpec], nbytes: int) -> None:
        try:
            self._guard.check_send(self.peer_id, flow_id, kind, specs, nbytes)
        except FlowRefused as e:
            if self.audit is not None:
                self.audit.refused("send", flow_id, str(e))
            raise

    def _current_stream_for_send(self) -> Stream:
        with self._cv:
            while True:
                self._raise_if_failed(pending_ok=False)
                if self._peer_closed:
                    raise TransportError(f"{self.peer_id} closed the link; nothing more can be sent to it")
                if self._stream is not None:
                    return self._stream
                self._check_down_too_long()
                self._cv.wait(timeout=0.5)

    def _send_urgent(self, stream: Stream, frame: bytes) -> None:
        try:
            stream.outbox.put(frame, urgent=True)
        except StreamClosed:
            pass

    # ------------------------------------------------------------------------------------------------
    # Receiving
    # ------------------------------------------------------------------------------------------------

    def _take(self, flow: str, step: int, kind: str, timeout: float | None) -> Any:
        key = (flow, step)

        def hit() -> bool:
            return bool(self._mailbox.get(key))

        with self._cv:
            self._wait(hit, f"flow {flow!r} step {step}", timeout)
            q = self._mailbox[key]
            got_kind, value, charge = q.popleft()
            if not q:
                del self._mailbox[key]
            self._release(charge)
            if step < _STEP_KEYS and (self._read_step is None or step > self._read_step):
                self._read_step = step
        if got_kind != kind:
            raise TransportError(
                f"{self.peer_id} sent flow {flow!r} step {step} as {_KIND_WORDS[got_kind]}, "
                f"but {_KIND_WORDS[kind]} was expected")
        return value

    def _wait(self, ready: Callable[[], bool], what: str, timeout: float | None) -> None:
        """Wait (holding ``_cv``) until ``ready()``; fail on link failure, peer close or timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ready():
            self._raise_if_failed(pending_ok=False)
            if self._peer_closed:
                raise TransportError(f"{self.peer_id} closed the link before sending {what}")
            self._check_down_too_long()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                state = "connected" if self._stream is not None else "disconnected"
                raise RecvTimeout(
                    f"nothing for {what} from {self.peer_id} within {timeout:g} s "
                    f"(link generation {self._generation}, {state})")
            self._cv.wait(timeout=0.5 if remaining is None else min(remaining, 0.5))
        # A refusal is fatal even for messages that already arrived: the peer misbehaved.
        self._raise_if_failed(pending_ok=False)

    def _hold(self, flow: str, nbytes: int, *, commit: bool = True) -> int:
        """Count ``nbytes`` the role has not read against the receive budget (``_cv`` held); refuse the peer
        instead when it would exceed it. Returns the charge to release when the role reads it."""
        charge = max(nbytes, MESSAGE_CHARGE)
        if self._held_bytes + charge > self._budget:
            where = "its first step" if self._read_step is None else f"step {self._read_step:,}"
            raise ReceiveBudgetExceeded(
                f"{self.peer_id} sent {self._held_count + 1:,} messages ({_mib(self._held_bytes + charge)}) "
                f"that {self.me} has not read, ahead of {where} (limit {_mib(self._budget)} per link: "
                f"{BUDGET_STEPS} messages of each flow from {self.peer_id} at its policy size, plus "
                f"{_mib(BUDGET_FLOOR)}): refusing", flow=flow, peer=self.peer_id)
        if commit:
            self._held_bytes += charge
            self._held_count += 1
        return charge

    def _release(self, charge: int) -> None:
        self._held_bytes -= charge
        self._held_count -= 1

    def _refusal_note(self) -> str:
        return f"; the last Hello claiming to be {self.peer_id} was refused: {self.last_refusal}" \
            if self.last_refusal else ""

    def _raise_if_failed(self, pending_ok: bool) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closed and not pending_ok:
            raise TransportError(f"the link to {self.peer_id} is closed")

    def _check_down_too_long(self) -> None:
        if self._down_since is not None:
            down = time.monotonic() - self._down_since
            if down > self._connect_timeout:
                what = "lost the link to" if self._generation else "no attested connection with"
                self._failure = self._refused_evidence or PeerUnreachable(
                    f"{what} {self.peer_id}; it did not come (back) within {self._connect_timeout:g} s"
                    + self._refusal_note())
                self._cv.notify_all()
                raise self._failure

    # ------------------------------------------------------------------------------------------------
    # Stream life cycle (called by the Transport / server threads)
    # ------------------------------------------------------------------------------------------------

    def open_stream(self) -> None:
        """Acceptor side: count one more Exchange call of this peer in flight (``stream_closed``: it ended).

        A call beyond ``MAX_STREAMS_PER_PEER`` raises :class:`StreamLimitExceeded` and fails the link closed;
        on a link that failed already, every call raises :class:`TransportError` at once (no thread waits)."""
        with self._cv:
            if self._failure is not None:
                raise TransportError(f"{self.me} refused {self.peer_id}: {self._failure}")
            if self._open_streams >= MAX_STREAMS_PER_PEER:
                limit = MAX_STREAMS_PER_PEER
                self._failure = StreamLimitExceeded(
                    f"{self.peer_id} opened more than {limit} Exchange streams to {self.me} at once (limit "
                    f"{limit} per peer: a node dials one stream at a time, and its last one may still be "
                    "closing): refusing", peer=self.peer_id)
                self._cv.notify_all()
                log.error("%s", self._failure)
                raise self._failure
            self._open_streams += 1

    def stream_closed(self) -> None:
        """Acceptor side: an Exchange call counted by ``open_stream`` has ended."""
        with self._cv:
            self._open_streams = max(0, self._open_streams - 1)

    @property
    def failure(self) -> Exception | None:
        """Why the link failed closed (a refusal, a policy violation), or None."""
        return self._failure

    def attach(self, stream: Stream) -> int:
        """Make ``stream`` the link's stream; returns the new generation. A stream that replaces one still up
        is counted: beyond ``MAX_LIVE_REPLACEMENTS`` the link fails (:class:`StreamLimitExceeded`)."""
        with self._cv:
            if self._closed:
                stream.outbox.close()
                stream.cancel()
                raise TransportError(f"link to {self.peer_id} is closed")
            if self._stream is not None:
                if self._replacements >= MAX_LIVE_REPLACEMENTS:
                    self._failure = StreamLimitExceeded(
                        f"{self.peer_id} replaced its Exchange stream to {self.me} while it was up "
                        f"{self._replacements + 1} times (limit {MAX_LIVE_REPLACEMENTS} per link: a node "
                        "opens a new stream once its last one ended): refusing", peer=self.peer_id)
                    self._cv.notify_all()
                    log.error("%s", self._failure)
                    stream.outbox.close()
                    stream.cancel()
                    raise self._failure
                self._replacements += 1
            old = self._stream
            self._stream = stream
            self._generation += 1
            gen = self._generation
            self._down_since = None
            self._peer_closed = False
            self._refused_evidence = None  # whatever was refused, the peer came: it decides nothing now
            callbacks = list(self._callbacks) if gen > 1 else []
            self._cv.notify_all()
        if old is not None:
            old.outbox.abort()
            old.cancel()
        log.info("link %s <-> %s up (generation %d)", self.me, self.peer_id, gen)
        for cb in callbacks:
            threading.Thread(target=cb, args=(gen,), name=f"on-reconnect-{self.peer_id}", daemon=True).start()
        return gen

    def detach(self, stream: Stream, reason: str) -> None:
        stream.outbox.abort()
        stream.end_reason = stream.end_reason or reason
        stream.done.set()
        with self._cv:
            if self._stream is not stream:
                return
            self._stream = None
            self._down_since = time.monotonic()
            self._cv.notify_all()
        if self._closed or self._peer_closed:
            log.info("link %s <-> %s closed: %s", self.me, self.peer_id, reason)
        else:
            log.warning("link %s <-> %s lost: %s", self.me, self.peer_id, reason)

    def fail(self, exc: Exception) -> None:
        """Fatal: every pending and later call raises ``exc``."""
        with self._cv:
            if self._failure is None:
                self._failure = exc
            self._cv.notify_all()

    def begin_close(self) -> None:
        """Send CLOSE after everything queued; later calls on this link raise."""
        with self._cv:
            self._closed = True
            stream = self._stream
            self._cv.notify_all()
        if stream is not None:
            self._send_urgent(stream, codec.control_frame(pb.Control.CLOSE, 0))

    def finish_close(self, deadline: float) -> bool:
        """Wait (until ``deadline``, monotonic) for the peer's CLOSE_ACK, then end our side of the stream.

        The ACK means the peer has read every frame we sent before CLOSE, so nothing in flight is lost
        when the process exits right after. Returns False if the peer did not acknowledge in time.
        """
        with self._cv:
            while not self._close_acked and self._stream is not None and time.monotonic() < deadline:
                self._cv.wait(timeout=max(0.0, min(0.2, deadline - time.monotonic())))
            acked = self._close_acked
            stream = self._stream
        if stream is not None:
            stream.outbox.close()
        return acked

    def close(self, timeout: float = 5.0) -> bool:
        self.begin_close()
        return self.finish_close(time.monotonic() + timeout)

    def reset_down_clock(self) -> None:
        """Start counting the connect timeout now (called when the transport starts)."""
        with self._cv:
            if self._stream is None:
                self._down_since = time.monotonic()

    def wait_stream_done(self, timeout: float) -> None:
        stream = self._stream
        if stream is not None:
            stream.done.wait(timeout)

    def flush(self, timeout: float) -> bool:
        """Wait (bounded) until the frames queued so far have been handed to gRPC; True if they were."""
        stream = self._stream
        deadline = time.monotonic() + timeout
        while stream is not None and stream.outbox.pending() and not stream.done.is_set():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    # ------------------------------------------------------------------------------------------------
    # Incoming frames (reader thread of the current stream)
    # ------------------------------------------------------------------------------------------------

    def on_frame(self, stream: Stream, data: bytes) -> None:
        try:
            header, payload = codec.decode_frame(data)
            which = header.WhichOneof("kind")
            if self._failure is not None and which != "control":
                return  # fail closed: no data is accepted on a refused link (housekeeping still works)
            if which == "control":
                self._on_control(stream, header.control)
            elif which == "error":
                e = header.error
                msg = f"{self.peer_id} refused what we sent on flow {e.flow!r} step {e.step}: {e.reason}"
                log.error("%s", msg)
                if self.audit is not None:
                    self.audit.refused("peer", e.flow, msg)
                self.fail(FlowRefused(msg, flow=e.flow, peer=self.peer_id))
            elif which in ("tensor", "arrays", "blob"):
                self._on_data(stream, which, getattr(header, which), payload)
            else:
                raise FrameError("frame without a kind")
        except FlowRefused as e:
            self._refuse(stream, e.flow or "", str(e), e)
        except FrameError as e:
            why = str(e) if str(e).startswith("malformed frame") else f"malformed frame: {e}"
            self._refuse(stream, "", why, MalformedFrame(why, peer=self.peer_id))

    def _refuse(self, stream: Stream, flow: str, reason: str, exc: Exception) -> None:
        # Log the reason, never the payload.
        log.error("%s refused a message from %s: %s", self.me, self.peer_id, reason)
        if self.audit is not None:
            self.audit.refused("recv", flow, reason)
        self._send_urgent(stream, codec.error_frame(flow, 0, f"refused by {self.me}: {reason}"))
        if isinstance(exc, FlowRefused):
            msg = f"refused a message from {self.peer_id}: {reason}"
            exc = type(exc)(msg, flow=flow, peer=self.peer_id)  # keeps the kind (e.g. a budget refusal)
        self.fail(exc)

    def _on_control(self, stream: Stream, c: pb.Control) -> None:
        if c.kind == pb.Control.READY:
            if not stream.ready.is_set():
                stream.ready.set()
                try:
                    self.attach(stream)
                except TransportError:  # we are closing: drop the late stream
                    stream.cancel()
            return
        if c.kind == pb.Control.CLOSE:
            with self._cv:
                self._peer_closed = True
                self._cv.notify_all()
            self._send_urgent(stream, codec.control_frame(pb.Control.CLOSE_ACK, 0))
            return
        if c.kind == pb.Control.CLOSE_ACK:
            with self._cv:
                self._close_acked = True
                self._cv.notify_all()
            return
        # START / COMMIT / ABORT (iteration markers) are in the wire format but no role sends them: the
        # roles' control messages are JSON blobs under typed message keys (fldsl.runtime.transport.keys).
        raise FrameError(f"unexpected control kind {c.kind}")

    def _on_data(self, stream: Stream, kind: str, h: Any, payload: memoryview) -> None:
        key = (kind, h.flow, h.step)
        if h.chunk == 0:
            if key in stream.assemblies:
                raise FrameError(f"flow {h.flow!r} step {h.step}: a new message began before the last ended")
            if h.chunks < 1:
                raise FrameError(f"flow {h.flow!r} step {h.step}: chunk count {h.chunks}")
            meta = self._admit(kind, h)
            with self._cv:
                self._hold(h.flow, h.total_bytes, commit=False)  # room for it, before reassembling it
            if h.chunks == 1:
                if h.offset != 0 or len(payload) != h.total_bytes:
                    raise FrameError(f"flow {h.flow!r} step {h.step}: {len(payload)} payload bytes, "
                                     f"header says {h.total_bytes}")
                self._deliver(kind, h.flow, h.step, meta, payload)
                return
            if len(stream.assemblies) >= _MAX_OPEN_ASSEMBLIES:
                raise FrameError(f"more than {_MAX_OPEN_ASSEMBLIES} chunked messages in progress at once")
            asm = _Assembly(
                kind, h.flow, h.step, h.chunks, h.total_bytes, bytearray(h.total_bytes), meta=meta)
            stream.assemblies[key] = asm
        else:
            open_asm = stream.assemblies.get(key)
            if (open_asm is None or h.chunk != open_asm.next_chunk or h.chunks != open_asm.chunks
                    or h.total_bytes != open_asm.total):
                raise FrameError(f"flow {h.flow!r} step {h.step}: chunk {h.chunk}/{h.chunks} out of sequence")
            asm = open_asm
            asm.next_chunk += 1
        if h.offset != asm.written or asm.written + len(payload) > asm.total:
            raise FrameError(f"flow {h.flow!r} step {h.step}: chunk {h.chunk} at a wrong offset or too long")
        asm.buf[asm.written : asm.written + len(payload)] = payload
        asm.written += len(payload)
        if h.chunk == asm.chunks - 1:
            del stream.assemblies[key]
            if asm.written != asm.total:
                raise FrameError(f"flow {h.flow!r} step {h.step}: {asm.written} of {asm.total} bytes arrived")
            self._deliver(kind, h.flow, h.step, asm.meta, memoryview(asm.buf))

    def _admit(self, kind: str, h: Any) -> Any:
        """Policy check on a message's first chunk, before any buffer is allocated for it."""
        if kind == "tensor":
            if h.dtype not in codec.DTYPES:
                raise FrameError(f"flow {h.flow!r}: unknown dtype {h.dtype!r}")
            shape = tuple(int(d) for d in h.shape)
            self._guard.check_recv(self.peer_id, h.flow, "tensor", [WireSpec(h.dtype, shape)], h.total_bytes)
            if any(d < 0 for d in shape) or codec.nbytes_of(h.dtype, shape) != h.total_bytes:
                raise FrameError(
                    f"flow {h.flow!r}: {h.dtype}{list(shape)} does not have {h.total_bytes} bytes")
            return (h.dtype, shape)
        if kind == "arrays":
            specs = []
            for a in h.arrays:
                if a.dtype not in codec.DTYPES:
                    raise FrameError(f"flow {h.flow!r}: unknown dtype {a.dtype!r}")
                shape = tuple(int(d) for d in a.shape)
                if any(d < 0 for d in shape) or codec.nbytes_of(a.dtype, shape) != a.nbytes \
                        or a.offset + a.nbytes > h.total_bytes:
                    raise FrameError(f"flow {h.flow!r}: inconsistent array index")
                specs.append(WireSpec(a.dtype, shape))
            self._guard.check_recv(self.peer_id, h.flow, "arrays", specs, h.total_bytes)
            return list(h.arrays)
        self._guard.check_recv(self.peer_id, h.flow, "blob", [], h.total_bytes)
        return None

    def _deliver(self, kind: str, flow: str, step: int, meta: Any, buf: memoryview) -> None:
        if kind == "tensor":
            dtype, shape = meta
            value: Any = codec.array_from_buffer(dtype, shape, buf)
        elif kind == "arrays":
            value = [
                codec.array_from_buffer(a.dtype, a.shape, buf[a.offset : a.offset + a.nbytes]) for a in meta]
        else:
            value = bytes(buf)
        self._stats.received(flow, len(buf))
        if self.audit is not None:  # before it is readable: the record precedes any use of the message
            self._audit_received(kind, flow, step, meta, buf)
        with self._cv:
            charge = self._hold(flow, len(buf))
            self._mailbox.setdefault((flow, step), deque()).append((kind, value, charge))
            self._cv.notify_all()

    def _audit_received(self, kind: str, flow: str, step: int, meta: Any, buf: memoryview) -> None:
        assert self.audit is not None
        if kind == "tensor":
            specs = [(meta[0], meta[1])]
        else:
            specs = [(a.dtype, tuple(a.shape)) for a in meta] if kind == "arrays" else []
        self.audit.message("recv", flow, step, kind, specs, len(buf), [buf])


_KIND_WORDS = {"tensor": "a tensor", "arrays": "a list of arrays", "blob": "opaque bytes"}
