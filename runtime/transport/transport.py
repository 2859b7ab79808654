"""``Transport``: a node's attested links to all its peers (DESIGN §5 "Attested gRPC").

Connection set-up, for a peer this node dials (``PeerRef.dial``):

1. ``Hello`` on the peer's bootstrap port with our RA-TLS certificate; the peer verifies it
   (``PeerVerifier.verify``), adds it to the client roots of its mutual-TLS port and answers with its own
   certificate (or with the reason it refused us, e.g. which identity field mismatched).
2. We verify the peer's certificate the same way (expect_node = the peer id).
3. We open the mutual-TLS channel whose ONLY trust root is that verified certificate (and whose server
   name must be the peer's node id), presenting our own key and certificate, and call ``Exchange``.
   The peer checks our TLS certificate on the call against the set verified at Hello and answers with
   READY: the link is up. A copied certificate is useless without its enclave's private key.

Start order does not matter (dialling retries with exponential backoff, bounded by
``connect_timeout_s``); a broken stream is redialled from step 1, so a restarted peer, which has a fresh
key and certificate, is attested again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import grpc

from fldsl.artifacts import PeerRef, Policy

from . import codec
from . import fldsl_pb2 as pb
from . import fldsl_pb2_grpc as pb_grpc
from .addresses import Addresses, NodeAddress
from .errors import PeerUnreachable, RemoteRefused, TransportError
from .guard import FlowGuard
from .identity import LocalIdentityLike, PeerVerifierLike
from .link import FlowStats, Outbox, PeerLink, StatsBook, Stream
from .server import EXCHANGE_METHOD, NodeServer

log = logging.getLogger("fldsl.transport")

_HELLO_TIMEOUT_S = 10.0
_READY_TIMEOUT_S = 15.0
_BACKOFF_START_S = 0.05
_BACKOFF_MAX_S = 2.0


class _Retry(Exception):
    """Internal: a transient failure while dialling (peer not up yet, handshake interrupted)."""


class Transport:
    """One node's server plus a :class:`PeerLink` per peer of its plan."""

    def __init__(
        self, *, node_id: str, policy: Policy, peers: list[PeerRef], identity: LocalIdentityLike,
        verifier: PeerVerifierLike, addresses: Addresses, listen_host: str = "127.0.0.1",
        connect_timeout_s: float = 120.0, send_buffer_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self.node_id = node_id
        self.policy = policy
        self._identity = identity
        self._verifier = verifier
        self._addresses = addresses
        self._listen_host = listen_host
        self._connect_timeout = connect_timeout_s
        self._send_buffer = send_buffer_bytes
        self._guard = FlowGuard(policy, node_id)
        self._stats = StatsBook()
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: NodeServer | None = None
        self._max_message = policy.max_message_bytes + codec.HEADER_ALLOWANCE
        not_accepted = [p.id for p in peers if p.id not in policy.accept_peers]
        if not_accepted:
            raise TransportError(
                f"plan of {node_id} lists peers {', '.join(not_accepted)} that its policy does not accept "
                f"(accept_peers: {', '.join(policy.accept_peers) or 'none'}); recompile the pipeline")
        self._links = {
            p.id: PeerLink(
                me=node_id, peer_id=p.id, dial=p.dial, guard=self._guard, stats=self._stats,
                chunk_bytes=policy.max_message_bytes, send_buffer_bytes=send_buffer_bytes,
                connect_timeout_s=connect_timeout_s)
            for p in peers
        }

    # ------------------------------------------------------------------------------------------------
    # Public API
    # ------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind both ports (``addresses[node_id]``) and start dialling the peers we dial."""
        if self._server is not None:
            raise TransportError("transport already started")
        me = self._addresses[self.node_id]
        missing = [p for p, link in self._links.items() if link.dial and p not in self._addresses]
        if missing:
            raise TransportError(f"addresses.json has no address for {', '.join(missing)}")
        self._server = NodeServer(
            node_id=self.node_id, identity=self._identity, verifier=self._verifier, host=self._listen_host,
            port=me.port, bootstrap_port=me.bootstrap_port, admissible=self._admissible,
            note_refusal=self._note_refusal,
            on_stream=self._on_stream, max_message_bytes=self._max_message,
            stream_workers=4 + 3 * len(self._links))
        self._server.start()
        log.info("%s listening on %s (mutual TLS) and %s (bootstrap)", self.node_id,
                 self._server.bound_port, self._server.bound_bootstrap_port)
        for link in self._links.values():
            link.reset_down_clock()
            if link.dial:
                t = threading.Thread(target=self._dial_loop, args=(link,), name=f"dial-{link.peer_id}",
                                     daemon=True)
                t.start()
                self._threads.append(t)

    @property
    def port(self) -> int:
        """The bound mutual-TLS port (useful when addresses.json said 0)."""
        return self._require_server().bound_port

    @property
    def bootstrap_port(self) -> int:
        return self._require_server().bound_bootstrap_port

    def link(self, peer_id: str, timeout: float | None = None) -> PeerLink:
        """The link to ``peer_id`` once attested and connected (waits ``timeout`` or the connect timeout)."""
        link = self._links.get(peer_id)
        if link is None:
            peers = ", ".join(sorted(self._links)) or "none"
            raise TransportError(f"{peer_id} is not a peer of {self.node_id} (peers: {peers})")
        link.wait_connected(self._connect_timeout if timeout is None else timeout)
        return link

    @property
    def links(self) -> dict[str, PeerLink]:
        return dict(self._links)

    @property
    def stats(self) -> dict[str, FlowStats]:
        """Messages and bytes per flow id, both directions."""
        return self._stats.snapshot()

    def close(self, flush_timeout: float = 5.0) -> None:
        """Tell peers we leave on purpose (after everything sent so far), wait (bounded by
        ``flush_timeout``) until each has acknowledged reading it all, then stop dialling and serving."""
        if self._closing.is_set():
            return
        self._closing.set()
        for link in self._links.values():
            link.begin_close()
        deadline = time.monotonic() + flush_timeout
        for link in self._links.values():
            if not link.finish_close(deadline):
                log.info("%s: %s did not acknowledge the close; frames in flight may be lost",
                         self.node_id, link.peer_id)
        for link in self._links.values():
            link.wait_stream_done(1.0)
        if self._server is not None:
            self._server.stop(grace=0.5)
        for t in self._threads:
            t.join(timeout=2.0)

    def __enter__(self) -> Transport:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------
    # Acceptor side
    # ------------------------------------------------------------------------------------------------

    def _require_server(self) -> NodeServer:
        if self._server is None:
            raise TransportError("transport not started")
        return self._server

    def _admissible(self, claimed: str, expect_node: str) -> str | None:
        link = self._links.get(claimed)
        if link is None:
            return f"{claimed!r} is not a peer of {self.node_id} in its plan"
        if claimed not in self.policy.accept_peers:
            return f"{claimed} is not in the accept_peers of {self.node_id}'s policy"
        if link.dial:
            return (f"{self.node_id} dials {claimed}, not the other way round "
                    "(are both nodes built from the same compile?)")
        if expect_node and expect_node != self.node_id:
            return f"this is {self.node_id}, not {expect_node} (addresses.json points to the wrong node?)"
        return None

    def _note_refusal(self, claimed: str, reason: str) -> None:
        link = self._links.get(claimed)
        if link is not None:
            link.last_refusal = reason

    def _on_stream(
        self, node: str, request_iterator: Iterator[bytes], context: grpc.ServicerContext,
    ) -> Iterator[bytes]:
        link = self._links.get(node)
        if link is None or link.dial or self._closing.is_set():
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{self.node_id} takes no stream from {node}")
        stream = Stream(outbox=Outbox(self._send_buffer), cancel=context.cancel)
        stream.ready.set()
        stream.outbox.put(codec.control_frame(pb.Control.READY, 0))
        try:
            link.attach(stream)
        except TransportError as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))

        def read() -> None:
            reason = f"{node} ended the stream"
            try:
                for data in request_iterator:
                    link.on_frame(stream, data)
            except grpc.RpcError as e:
                reason = _rpc_reason(e)
            except Exception as e:  # a bug in frame handling must not kill the process silently
                log.exception("reader for %s failed", node)
                reason = f"internal error: {e}"
            finally:
                link.detach(stream, reason)

        threading.Thread(target=read, name=f"read-{node}", daemon=True).start()
        context.add_callback(lambda: link.detach(stream, "stream closed"))
        return iter(stream.outbox)

    # ------------------------------------------------------------------------------------------------
    # Dialer side
    # ------------------------------------------------------------------------------------------------

    def _dial_loop(self, link: PeerLink) -> None:
        addr = self._addresses[link.peer_id]
        delay = _BACKOFF_START_S
        deadline = time.monotonic() + self._connect_timeout
        last = "not tried"
        while not self._closing.is_set():
            try:
                peer_cert = self._hello(link, addr)
                self._run_stream(link, addr, peer_cert)
                delay = _BACKOFF_START_S  # the stream was up: a fresh budget for reconnecting
                deadline = time.monotonic() + self._connect_timeout
                continue
            except _Retry as e:
                last = str(e)
            except Exception as e:  # refusals (ours or theirs) are final: fail closed
                log.error("%s: link to %s refused: %s", self.node_id, link.peer_id, e)
                link.fail(e)
                return
            if time.monotonic() > deadline:
                link.fail(PeerUnreachable(
                    f"{self.node_id} could not connect to {link.peer_id} at {addr.bootstrap_target()} "
                    f"(bootstrap) / {addr.secure_target()} (TLS) within {self._connect_timeout:.0f} s; "
                    f"last error: {last}"))
                return
            self._closing.wait(delay)
            delay = min(delay * 2, _BACKOFF_MAX_S)

    def _hello(self, link: PeerLink, addr: NodeAddress) -> bytes:
        target = addr.bootstrap_target()
        request = pb.HelloRequest(
            cert_pem=self._identity.cert_pem, node_id=self.node_id, expect_node=link.peer_id,
            pins_digest=_pins_digest(self._verifier))
        with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            try:
                reply = pb_grpc.BootstrapStub(channel).Hello(request, timeout=_HELLO_TIMEOUT_S)
            except grpc.RpcError as e:
                raise _Retry(f"Hello to {target}: {_rpc_reason(e)}") from None
        if not reply.ok:
            raise RemoteRefused(reply.reason or f"refused by {link.peer_id}", peer=link.peer_id,
                                field=reply.field or None)
        if reply.node_id != link.peer_id:
            raise RemoteRefused(
                f"{target} answers as {reply.node_id!r}, not {link.peer_id} (addresses.json wrong?)",
                peer=link.peer_id, field="node")
        verdict = self._verifier.verify(reply.cert_pem, link.peer_id)  # raises PeerRefused
        link.peer_summary = str(getattr(verdict, "summary", ""))
        return reply.cert_pem

    def _run_stream(self, link: PeerLink, addr: NodeAddress, peer_cert: bytes) -> None:
        """Open the mutual-TLS stream pinned to ``peer_cert``; return when it ends (_Retry if never up)."""
        creds = grpc.ssl_channel_credentials(
            root_certificates=peer_cert, private_key=self._identity.key_pem,
            certificate_chain=self._identity.cert_pem)
        options = [
            ("grpc.ssl_target_name_override", link.peer_id),
            ("grpc.max_receive_message_length", self._max_message),
            ("grpc.max_send_message_length", self._max_message),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # Never share a connection with an older channel to a previous incarnation of the peer.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        channel = grpc.secure_channel(addr.secure_target(), creds, options=options)
        stream = Stream(outbox=Outbox(self._send_buffer))
        try:
            call = channel.stream_stream(EXCHANGE_METHOD)(iter(stream.outbox))
            stream.cancel = call.cancel

            def read() -> None:
                reason = f"{link.peer_id} ended the stream"
                try:
                    for data in call:
                        link.on_frame(stream, data)
                except grpc.RpcError as e:
                    reason = _rpc_reason(e)
                except Exception as e:
                    log.exception("reader for %s failed", link.peer_id)
                    reason = f"internal error: {e}"
                finally:
                    if stream.ready.is_set():
                        link.detach(stream, reason)
                    else:
                        stream.end_reason = reason
                        stream.outbox.abort()
                        stream.done.set()

            threading.Thread(target=read, name=f"read-{link.peer_id}", daemon=True).start()
            deadline = time.monotonic() + _READY_TIMEOUT_S
            while not stream.ready.is_set() and not stream.done.is_set():
                if time.monotonic() > deadline or self._closing.is_set():
                    call.cancel()
                    stream.done.wait(2.0)
                    raise _Retry(f"no READY from {link.peer_id} on {addr.secure_target()}")
                stream.ready.wait(0.05)
            if not stream.ready.is_set():
                raise _Retry(f"mutual TLS stream to {addr.secure_target()}: {stream.end_reason}")
            while not stream.done.wait(0.2):
                if self._closing.is_set():
                    if not stream.done.wait(2.0):
                        call.cancel()
                    break
        finally:
            channel.close()


def _rpc_reason(e: grpc.RpcError) -> str:
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else str(e)
    return f"{code.name if code else 'error'}: {details}"


def _pins_digest(verifier: PeerVerifierLike) -> bytes:
    # Informational only (the attested digest is inside the certificate); absent on test verifiers.
    value = getattr(verifier, "own_pins_digest", b"")
    if isinstance(value, str):
        try:
            return bytes.fromhex(value)
        except ValueError:
            return b""
    return value if isinstance(value, bytes) else b""
