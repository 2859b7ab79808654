"""``Transport``: a node's attested links to all its peers (ARCHITECTURE.md, "Transport").

Connection set-up, for a peer this node dials (``PeerRef.dial``; the proofs are in ``handshake.py``):

1. ``Challenge`` then ``Hello`` on the peer's bootstrap port: our RA-TLS certificate, signed with its key
   over the peer's fresh challenge and a fresh nonce of ours. The peer checks the signature, its plan and
   ``PeerVerifier.verify``, adds the certificate to the client roots of its mutual-TLS port and answers
   with its own certificate and verdict, signed with its key over our nonce.
2. We check that signature, then verify the peer's certificate the same way (expect_node = the peer id).
   Only then is the reply the peer's word: an accepted Hello, or a refusal that names the field.
3. We open the mutual-TLS channel whose ONLY trust root is that verified certificate (and whose server
   name must be the peer's node id), presenting our own key and certificate, and call ``Exchange``.
   The peer checks our TLS certificate on the call against the set verified at Hello and answers with
   READY: the link is up. A copied certificate is useless without its enclave's private key.

What ends the dialling at once: the attested peer's signed refusal (``RemoteRefused``), or our verifier's
refusal of a genuine quote whose key answered our nonce (``PeerRefused`` on node, pins, measurements...).
Everything else is retried with exponential back-off until ``connect_timeout_s``: a peer not up yet, a
reply that is not signed over our nonce (corrupted or forged: its text is quoted as "peer said", never
taken for a verdict), evidence whose quote does not verify (anyone can make such a certificate). At the
deadline, a certificate our verifier kept refusing is a trust failure; anything else is ``PeerUnreachable``.

Start order does not matter; a broken stream is redialled from step 1, so a restarted peer, which has a
fresh key and certificate, is attested again.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from cryptography import x509

from fldsl.artifacts import PeerRef, Policy

from . import codec, handshake
from . import fldsl_pb2 as pb
from . import fldsl_pb2_grpc as pb_grpc
from .addresses import Addresses, NodeAddress
from .bootstrap import MAX_MESSAGE_BYTES as BOOTSTRAP_MESSAGE_BYTES
from .channel import MUTUAL_TLS, ChannelSecurity
from .errors import PeerUnreachable, RemoteRefused, StreamLimitExceeded, TransportError
from .guard import FlowGuard
from .identity import LocalIdentityLike, PeerVerifierLike, refusal_field
from .link import FlowStats, Outbox, PeerLink, StatsBook, Stream
from .server import EXCHANGE_METHOD, NodeServer, abort

log = logging.getLogger("fldsl.transport")

_HELLO_TIMEOUT_S = 10.0
_READY_TIMEOUT_S = 15.0
_BACKOFF_START_S = 0.05
_BACKOFF_MAX_S = 2.0
_RENEW_MIN_S = 1.0
_RENEW_RETRY_S = 60.0


class _Retry(Exception):
    """Internal: a transient failure while dialling (peer not up yet, handshake interrupted, a reply that
    proves nothing). ``refusal``: our verifier's refusal of the certificate that answered, which becomes
    the failure if it is still the last word at the connect deadline."""

    def __init__(self, message: str, refusal: Exception | None = None) -> None:
        super().__init__(message)
        self.refusal = refusal


class Transport:
    """One node's server plus a :class:`PeerLink` per peer of its plan."""

    def __init__(
        self, *, node_id: str, policy: Policy, peers: list[PeerRef], identity: LocalIdentityLike,
        verifier: PeerVerifierLike, addresses: Addresses, listen_host: str = "127.0.0.1",
        connect_timeout_s: float = 120.0, send_buffer_bytes: int = 32 * 1024 * 1024,
        renew_identity: Callable[[], LocalIdentityLike] | None = None,
        security: ChannelSecurity = MUTUAL_TLS,
    ) -> None:
        self.node_id = node_id
        self._security = security
        self.policy = policy
        self._identity = identity
        self._renew = renew_identity
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
            port=me.port, bootstrap_port=me.bootstrap_port, peers=frozenset(self._links),
            admissible=self._admissible, note_refusal=self._note_refusal,
            on_stream=self._on_stream, max_message_bytes=self._max_message,
            stream_workers=4 + 3 * len(self._links), security=self._security)
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
        if self._renew is not None:
            t = threading.Thread(target=self._renew_loop, name=f"renew-{self.node_id}", daemon=True)
            t.start()
            self._threads.append(t)

    def set_identity(self, identity: LocalIdentityLike) -> None:
        """Use a renewed key and certificate for every later handshake, both directions. Streams that are
        up stay up (TLS checks validity at the handshake only); peers pin the new certificate at the next
        Hello, which precedes every reconnection."""
        self._identity = identity
        if self._server is not None:
            self._server.set_identity(identity)
        log.info("%s: renewed its RA-TLS certificate (valid until %s)", self.node_id,
                 _not_after(identity.cert_pem))

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

    def attach_audit(self, audit: Any) -> None:
        """Record every message, attestation and refusal of every link in ``audit``
        (``fldsl.runtime.audit.AuditLog``); call before ``start`` so the first attestation is in it."""
        for peer, link in self._links.items():
            link.audit = audit.link(peer, self._guard.flows)

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

    def _note_refusal(self, claimed: str, reason: str, refusal: Exception | None) -> None:
        link = self._links.get(claimed)
        if link is not None:
            link.note_refusal(reason, refusal)

    def _on_stream(
        self, node: str, request_iterator: Iterator[bytes], context: grpc.ServicerContext,
    ) -> Iterator[bytes]:
        link = self._links.get(node)
        if link is None or link.dial or self._closing.is_set():
            abort(context, grpc.StatusCode.PERMISSION_DENIED, f"{self.node_id} takes no stream from {node}")
        # At most MAX_STREAMS_PER_PEER calls of one peer at once; more fails the link closed (link.py).
        try:
            link.open_stream()
        except StreamLimitExceeded as e:
            abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"refused by {self.node_id}: {e}")
        except TransportError as e:  # the link failed earlier: refused at once
            abort(context, grpc.StatusCode.PERMISSION_DENIED, str(e))
        if not context.add_callback(link.stream_closed):
            link.stream_closed()  # the call ended already
        pems = context.auth_context().get("x509_pem_cert") or []
        if pems:  # the certificate verified at Hello (the server checked it against the pins)
            link.note_peer_cert(pems[0])
        stream = Stream(outbox=Outbox(self._send_buffer), cancel=context.cancel)
        stream.ready.set()
        stream.outbox.put(codec.control_frame(pb.Control.READY, 0))
        try:
            link.attach(stream)
        except StreamLimitExceeded as e:
            abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"refused by {self.node_id}: {e}")
        except TransportError as e:
            abort(context, grpc.StatusCode.UNAVAILABLE, str(e))

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

    def _renew_loop(self) -> None:
        """Renew the certificate halfway through its remaining validity, so that a run may outlast it: peers
        refuse an expired certificate (and any certificate valid for more than 2 days) at the next Hello."""
        assert self._renew is not None
        while True:
            left = (_not_after(self._identity.cert_pem) - dt.datetime.now(dt.UTC)).total_seconds()
            if self._closing.wait(max(_RENEW_MIN_S, left / 2)):
                return
            try:
                self.set_identity(self._renew())
            except Exception:  # keep the current certificate; try again soon (it is still valid)
                log.exception("%s: renewing the RA-TLS certificate failed", self.node_id)
                if self._closing.wait(min(_RENEW_RETRY_S, max(_RENEW_MIN_S, left / 4))):
                    return

    # ------------------------------------------------------------------------------------------------
    # Dialer side
    # ------------------------------------------------------------------------------------------------

    def _dial_loop(self, link: PeerLink) -> None:
        addr = self._addresses[link.peer_id]
        delay = _BACKOFF_START_S
        deadline = time.monotonic() + self._connect_timeout
        last: _Retry = _Retry("not tried")
        while not self._closing.is_set():
            try:
                peer_cert = self._hello(link, addr)
                self._run_stream(link, addr, peer_cert)
                delay = _BACKOFF_START_S  # the stream was up: a fresh budget for reconnecting
                deadline = time.monotonic() + self._connect_timeout
                continue
            except _Retry as e:
                last = e
                log.info("%s: dialling %s: %s", self.node_id, link.peer_id, e)
            except Exception as e:  # authenticated refusals (ours or theirs) are final: fail closed
                log.error("%s: link to %s refused: %s", self.node_id, link.peer_id, e)
                link.fail(e)
                return
            if time.monotonic() > deadline:
                link.fail(self._gave_up(link, addr, last))
                return
            self._closing.wait(delay)
            delay = min(delay * 2, _BACKOFF_MAX_S)

    def _gave_up(self, link: PeerLink, addr: NodeAddress, last: _Retry) -> Exception:
        if last.refusal is not None:
            # What answered at the peer's address kept showing a certificate we refuse, for the whole
            # window: a trust failure (a peer with another deployment's trust material, or an attacker who
            # held the address that long; either way no genuine peer ever answered).
            log.error("%s: for %.0f s the certificate answering at %s as %s was refused: %s", self.node_id,
                      self._connect_timeout, addr.bootstrap_target(), link.peer_id, last)
            return last.refusal
        return PeerUnreachable(
            f"{self.node_id} could not connect to {link.peer_id} at {addr.bootstrap_target()} "
            f"(bootstrap) / {addr.secure_target()} (TLS) within {self._connect_timeout:.0f} s; "
            f"last error: {last}")

    def _hello(self, link: PeerLink, addr: NodeAddress) -> bytes:
        """Challenge + Hello; the peer's verified certificate, or the reason why not (see module doc)."""
        target = addr.bootstrap_target()
        options = [("grpc.use_local_subchannel_pool", 1),
                   ("grpc.max_receive_message_length", BOOTSTRAP_MESSAGE_BYTES)]  # whoever answers is unknown
        with grpc.insecure_channel(target, options=options) as channel:
            stub = pb_grpc.BootstrapStub(channel)
            try:
                challenge = stub.Challenge(pb.ChallengeRequest(), timeout=_HELLO_TIMEOUT_S).challenge
                ident = self._identity  # one read: a renewal may swap it
                request = handshake.hello_request(
                    ident.cert_pem, ident.key_pem, node_id=self.node_id,
                    expect_node=link.peer_id, challenge=challenge, pins_digest=_pins_digest(self._verifier))
                reply = stub.Hello(request, timeout=_HELLO_TIMEOUT_S)
            except grpc.RpcError as e:
                raise _Retry(f"Hello to {target}: {_rpc_reason(e)}") from None
        return self._judge(link, target, request, reply)

    def _judge(self, link: PeerLink, target: str, request: pb.HelloRequest, reply: pb.HelloReply) -> bytes:
        said = "" if reply.ok else f"; peer said: {handshake.quoted(reply.reason)}"
        if not handshake.server_signature_ok(request, reply):
            raise _Retry(f"the Hello reply from {target} is not signed over our nonce by the certificate it "
                         f"carries (corrupted or forged; not {link.peer_id}'s verdict){said}")
        try:
            verdict = self._verifier.verify(reply.cert_pem, link.peer_id)  # raises PeerRefused
        except Exception as e:
            field = refusal_field(e)
            if field is None or field in handshake.EVIDENCE_FIELDS:
                why = handshake.printable(str(e), handshake.VERDICT_TEXT_CHARS)
                raise _Retry(f"the certificate answering at {target} was refused: {why}{said}", e) from None
            raise  # a genuine quote, its key answered our nonce: our verdict on a real enclave
        if not reply.ok:
            return self._refused(link, reply)
        if reply.node_id != link.peer_id:
            raise RemoteRefused(
                f"{target} answers as {handshake.quoted(reply.node_id, 64)}, not {link.peer_id} "
                "(addresses.json wrong?)", peer=link.peer_id, field="node")
        link.peer_summary = str(getattr(verdict, "summary", ""))
        return reply.cert_pem

    @staticmethod
    def _refused(link: PeerLink, reply: pb.HelloReply) -> bytes:
        """The attested peer refused us (its signature and certificate verified)."""
        reason = handshake.printable(reply.reason or f"refused by {link.peer_id}",
                                     handshake.VERDICT_TEXT_CHARS)
        if reply.field in handshake.RETRY_FIELDS:  # "ask again" (our challenge expired, say): not a verdict
            raise _Retry(reason)
        raise RemoteRefused(reason, peer=link.peer_id, field=reply.field or None)

    def _run_stream(self, link: PeerLink, addr: NodeAddress, peer_cert: bytes) -> None:
        """Open the mutual-TLS stream pinned to ``peer_cert``; return when it ends (_Retry if never up)."""
        ident = self._identity  # one read: a renewal may swap it
        link.note_peer_cert(peer_cert)
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", self._max_message),
            ("grpc.max_send_message_length", self._max_message),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # Never share a connection with an older channel to a previous incarnation of the peer.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        channel = self._security.channel(addr.secure_target(), link.peer_id, peer_cert, ident, options)
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
    # Status details come from whoever answered, unauthenticated: printable and capped.
    return f"{code.name if code else 'error'}: {handshake.printable(str(details), handshake.PEER_TEXT_CHARS)}"


def _not_after(cert_pem: bytes) -> dt.datetime:
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc


def _pins_digest(verifier: PeerVerifierLike) -> bytes:
    # Informational only (the attested digest is inside the certificate); absent on test verifiers.
    value = getattr(verifier, "own_pins_digest", b"")
    if isinstance(value, str):
        try:
            return bytes.fromhex(value)
        except ValueError:
            return b""
    return value if isinstance(value, bytes) else b""
