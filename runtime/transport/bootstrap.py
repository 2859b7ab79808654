"""The bootstrap port (Challenge, Hello), served so that no client can deny it to the genuine peers.

Why an asyncio server: gRPC's thread-pool server hands a unary call to a worker thread *before* its body
arrives, and the worker then waits for the body for as long as the client likes. One connection with four
calls whose body never came blocked every Hello of the node (the red team's finding 1). Here a call costs no
thread while it waits: each method is registered as a client-streaming handler so that it runs as soon as
the call opens, before the body, and it

1. takes a slot of its source address (``PER_SOURCE_CALLS``), or is refused at once with RESOURCE_EXHAUSTED;
2. reads the one request message within ``READ_DEADLINE_S``, or is ended with DEADLINE_EXCEEDED;
3. only then does any work: a challenge inline, a Hello (signature check, plan, verifier) on a small thread
   pool, as the verifier blocks (Intel QVL).

The server also bounds what a connection can hold: ``grpc.max_concurrent_streams`` calls at a time,
``grpc.max_connection_age_ms`` of life (a dialer opens a fresh channel per Hello), an idle limit, pings
(keepalive probes dead clients; ``max_ping_strikes`` closes a connection that pings abusively), the message
and metadata sizes, and ``maximum_concurrent_rpcs`` over all sources.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent import futures
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from . import fldsl_pb2 as pb
from . import handshake
from .errors import TransportError, cannot_listen
from .identity import LocalIdentityLike, PeerVerifierLike, refusal_field

log = logging.getLogger("fldsl.transport.bootstrap")

SERVICE = "fldsl.transport.v1.Bootstrap"
READ_DEADLINE_S = 2.0  # a Hello is one small message; a genuine client sends it at once
PER_SOURCE_CALLS = 8  # a node dials each peer with one call at a time; headroom for restarts
MAX_CALLS = 64  # over all sources
STREAMS_PER_CONNECTION = 4
MAX_MESSAGE_BYTES = 2 * handshake.MAX_CERT_BYTES  # a certificate, two nonces, a signature, names
VERIFY_WORKERS = 4
_LOG_EVERY_S = 10.0

HelloPolicy = Callable[[str, str], str | None]  # (claimed node, expect_node) -> refusal reason or None
# (claimed node, reason, the verifier's refusal of a Hello that proved possession of its key, else None)
RefusalNote = Callable[[str, str, Exception | None], None]
PinCert = Callable[[str, bytes], None]  # (node, certificate): the verified certificate of a peer
T = TypeVar("T")
M = TypeVar("M", pb.HelloRequest, pb.ChallengeRequest)

SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_concurrent_streams", STREAMS_PER_CONNECTION),
    ("grpc.max_connection_age_ms", 30_000),
    ("grpc.max_connection_age_grace_ms", 5_000),
    ("grpc.max_connection_idle_ms", 15_000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 2),
    ("grpc.http2.max_pings_without_data", 2),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_metadata_size", 16 << 10),
]


class SourceLimits:
    """A non-blocking counting semaphore per source address (the event loop's thread only)."""

    def __init__(self, per_source: int) -> None:
        self._per_source = per_source
        self._active: dict[str, int] = {}

    def try_acquire(self, source: str) -> bool:
        if self._active.get(source, 0) >= self._per_source:
            return False
        self._active[source] = self._active.get(source, 0) + 1
        return True

    def release(self, source: str) -> None:
        left = self._active.get(source, 0) - 1
        if left > 0:
            self._active[source] = left
        else:
            self._active.pop(source, None)


def source_of(peer: str) -> str:
    """The address part of gRPC's peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``): the source to limit."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1 : rest.find("]")]
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return peer


class _RareLog:
    """Logs a refusal kind at most once per ``_LOG_EVERY_S``: a replay flood must not flood the log."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, kind: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -_LOG_EVERY_S) < _LOG_EVERY_S:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        more = self._suppressed.pop(kind, 0)
        log.warning(msg + (f" ({more} more like it since the last report)" if more else ""), *args)


class HelloService:
    """The acceptor's side of the handshake (handshake.py), independent of how calls are served."""

    def __init__(self, *, me: str, identity: LocalIdentityLike, verifier: PeerVerifierLike,
                 peers: frozenset[str], admissible: HelloPolicy, note_refusal: RefusalNote,
                 pin: PinCert) -> None:
        self.me = me
        self.identity = identity
        self.verifier = verifier
        self.peers = peers
        self.admissible = admissible
        self.note_refusal = note_refusal
        self.pin = pin
        self.challenges = handshake.ChallengeBook()
        self._lock = threading.Lock()  # the rare log is shared by the verification threads
        self._rare = _RareLog()

    def challenge(self) -> pb.ChallengeReply:
        return pb.ChallengeReply(challenge=self.challenges.issue())

    def hello(self, request: pb.HelloRequest, peer: str) -> pb.HelloReply:
        """Pin the dialer's certificate only after a fresh challenge, proof of its key, plan and verifier."""
        claimed = request.node_id
        problem = self.challenges.check(request.challenge)
        if problem is not None:
            return self._retry(request, peer, "challenge", problem)
        if not handshake.client_signature_ok(request):
            return self._retry(request, peer, "possession", (
                "the Hello is not signed by the key of the certificate it carries over this node's "
                "fresh challenge (a replayed certificate, or a tampered Hello)"))
        problem = self.challenges.consume(request.challenge)  # after the proof: only signed work counts
        if problem is not None:
            return self._retry(request, peer, "challenge", problem)
        reason = self.admissible(claimed, request.expect_node)
        if reason is not None:
            log.warning("%s refused Hello from %r at %s: %s", self.me, claimed, peer, reason)
            return self._reply(request, ok=False, field="node", reason=f"refused by {self.me}: {reason}")
        return self._verify(request)

    def _verify(self, request: pb.HelloRequest) -> pb.HelloReply:
        claimed = request.node_id
        try:
            verdict = self.verifier.verify(request.cert_pem, claimed)
        except Exception as e:  # fail closed: any verifier error refuses the peer
            # The verifier names what the certificate claims: printable only, in the log as anywhere.
            log.warning("%s refused %s: %s", self.me, claimed,
                        handshake.printable(str(e), handshake.VERDICT_TEXT_CHARS))
            self.note_refusal(claimed, str(e), e)
            return self._reply(request, ok=False, field=refusal_field(e) or "",
                               reason=f"refused by {self.me}: {e}")
        node = getattr(verdict, "node_id", claimed)
        if node != claimed:
            why = f"the certificate is attested as {node}, not {claimed}"
            self.note_refusal(claimed, why, None)
            return self._reply(request, ok=False, field="node", reason=f"refused by {self.me}: {why}")
        self.pin(claimed, request.cert_pem)
        log.info("%s accepted %s: %s", self.me, claimed, getattr(verdict, "summary", "attested"))
        return self._reply(request, ok=True)

    def _retry(self, request: pb.HelloRequest, peer: str, field: str, why: str) -> pb.HelloReply:
        """A Hello that proved nothing: refused (the dialer retries), never pinned, never a verdict."""
        with self._lock:
            self._rare.warning(field, "%s refused a Hello claiming to be %r from %s: %s",
                               self.me, handshake.printable(request.node_id, 64), peer, why)
        if request.node_id in self.peers:
            self.note_refusal(request.node_id, f"{field}: {why}", None)
        return self._reply(request, ok=False, field=field, reason=f"refused by {self.me}: {field}: {why}")

    def _reply(self, request: pb.HelloRequest, *, ok: bool, field: str = "",
               reason: str = "") -> pb.HelloReply:
        # Peers of our plan get our certificate and a signed reply, so that they can tell our verdict from
        # a forgery; a stranger gets neither (it has no use for them).
        if request.node_id not in self.peers:
            return pb.HelloReply(ok=ok, field=field, reason=reason, node_id=self.me)
        ident = self.identity  # one read: a renewal may swap it (Transport.renew_identity)
        return handshake.signed_reply(request, me=self.me, cert_pem=ident.cert_pem, key_pem=ident.key_pem,
                                      ok=ok, field=field, reason=reason)


class BootstrapServer:
    """``HelloService`` on an asyncio gRPC server in its own thread; binds in ``__init__``."""

    def __init__(self, service: HelloService, *, host: str, port: int) -> None:
        self._service = service
        self._limits = SourceLimits(PER_SOURCE_CALLS)
        self._pool = futures.ThreadPoolExecutor(VERIFY_WORKERS, thread_name_prefix=f"hello-{service.me}")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"boot-{service.me}", daemon=True)
        self._thread.start()
        self._server: grpc.aio.Server | None = None
        try:
            self.bound_port = self._run(self._bind(host, port))
        except BaseException:
            self._shutdown()
            raise

    def start(self) -> None:
        self._run(self._require_server().start())

    def stop(self, grace: float) -> None:
        try:
            if self._server is not None:
                self._run(self._server.stop(grace), timeout=grace + 10)
        finally:
            self._shutdown()

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _require_server(self) -> grpc.aio.Server:
        if self._server is None:
            raise TransportError("bootstrap server not bound")
        return self._server

    def _shutdown(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._loop.is_running():
            self._loop.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _bind(self, host: str, port: int) -> int:
        self._server = grpc.aio.server(options=SERVER_OPTIONS, maximum_concurrent_rpcs=MAX_CALLS)
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
            "Challenge": grpc.stream_unary_rpc_method_handler(
                self._challenge, response_serializer=pb.ChallengeReply.SerializeToString),
            "Hello": grpc.stream_unary_rpc_method_handler(
                self._hello, response_serializer=pb.HelloReply.SerializeToString),
        }),))
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = self._server.add_insecure_port(target)
        except RuntimeError as e:
            raise cannot_listen(host, port, str(e)) from None
        if bound == 0:
            raise cannot_listen(host, port)
        return bound

    async def _challenge(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
        async with self._slot(context):
            await self._read_one(requests, context, pb.ChallengeRequest)
            return self._service.challenge()

    async def _hello(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
        async with self._slot(context):
            request = await self._read_one(requests, context, pb.HelloRequest)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, self._service.hello, request, context.peer())

    def _slot(self, context: grpc.aio.ServicerContext) -> _Slot:
        return _Slot(self._limits, source_of(context.peer()), context, self._service.me)

    @staticmethod
    async def _read_one(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext,
                        kind: type[M]) -> M:
        """The call's one request message, within READ_DEADLINE_S of the call opening (abort otherwise)."""
        code, why = grpc.StatusCode.INVALID_ARGUMENT, "the call carried no request"
        try:
            raw = await asyncio.wait_for(anext(requests), READ_DEADLINE_S)
            return kind.FromString(raw)
        except TimeoutError:
            code, why = grpc.StatusCode.DEADLINE_EXCEEDED, f"no request within {READ_DEADLINE_S:g} s"
        except StopAsyncIteration:
            pass
        except DecodeError:
            why = "malformed request"
        await context.abort(code, why)
        raise AssertionError("unreachable: abort raises")


class _Slot:
    """``async with``: a source's call slot, or RESOURCE_EXHAUSTED at once when it has none left."""

    def __init__(self, limits: SourceLimits, source: str, context: grpc.aio.ServicerContext, me: str) -> None:
        self._limits = limits
        self._source = source
        self._context = context
        self._me = me
        self._held = False

    async def __aenter__(self) -> None:
        if not self._limits.try_acquire(self._source):
            await self._context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self._me}: more than {PER_SOURCE_CALLS} bootstrap calls at once from {self._source}")
        self._held = True

    async def __aexit__(self, *exc: object) -> None:
        if self._held:
            self._limits.release(self._source)
