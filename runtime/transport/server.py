"""A node's gRPC servers: the bootstrap port (Challenge, Hello) and the mutual-TLS port (Exchange).

Why two servers, not two ports of one: a gRPC server serves every registered service on every port, so
one server would also offer ``Exchange`` on the insecure port. Separate servers keep the insecure port to
the bootstrap RPCs (the per-call certificate check would refuse Exchange anyway: defence in depth). The
bootstrap server, and how it stays available under abuse, is in ``bootstrap.py``.

The secure port uses ``grpc.dynamic_ssl_server_credentials``: gRPC asks ``CertRegistry.fetch`` at each new
TLS handshake for the current configuration, whose client roots are exactly the RA-TLS certificates that
passed Hello (a fresh challenge signed with the certificate's key, then ``PeerVerifier.verify``), plus our
own certificate, so the root list is never empty. A peer certificate is self-signed with CA:FALSE;
BoringSSL (grpcio 1.85) accepts such a leaf as its own trust anchor when it is in the root list (checked by
tests/transport/test_tls.py), so no CA extensions are needed.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, NoReturn

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from .bootstrap import BootstrapServer, HelloPolicy, HelloService, RefusalNote
from .channel import MUTUAL_TLS, ChannelSecurity
from .identity import LocalIdentityLike, PeerVerifierLike
from .link import MAX_STREAMS_PER_PEER

log = logging.getLogger("fldsl.transport.server")

EXCHANGE_METHOD = "/fldsl.transport.v1.Peer/Exchange"


def cert_fingerprint(pem_or_der: bytes) -> str:
    """SHA-256 of the certificate's DER encoding (PEM formatting differences do not matter)."""
    # Strip only to recognise PEM: DER is binary and may legitimately end in a byte that looks like space.
    if pem_or_der.lstrip().startswith(b"-----BEGIN"):
        der = x509.load_pem_x509_certificate(pem_or_der.strip()).public_bytes(Encoding.DER)
    else:
        der = pem_or_der
    return hashlib.sha256(der).hexdigest()


class CertRegistry:
    """Verified peer certificates: client roots of the secure port and the caller map of every RPC.

    Exactly ONE certificate per peer node: the last one verified at Hello (a restarted peer brings a fresh
    one). Why not keep a few: every certificate of a node has the same subject (CN = node id) and no
    authority key identifier, and BoringSSL picks the trust anchor by subject name, so with two
    certificates of one node in the roots the handshake of the newer one fails ("self signed
    certificate"). That is why only a Hello signed with the certificate's key over a fresh, unused
    challenge may replace the pin (bootstrap.HelloService): a replayed certificate, or a replayed Hello,
    never does.
    """

    def __init__(self, identity: LocalIdentityLike) -> None:
        self._identity = identity
        self._lock = threading.Lock()
        self._by_node: dict[str, tuple[str, bytes]] = {}  # node -> (fingerprint, PEM)
        self._version = 0
        self._served = -1

    def set_identity(self, identity: LocalIdentityLike) -> None:
        """Serve TLS with a renewed key and certificate from the next handshake on."""
        with self._lock:
            self._identity = identity
            self._version += 1

    def add(self, node_id: str, cert_pem: bytes) -> None:
        fp = cert_fingerprint(cert_pem)
        with self._lock:
            if self._by_node.get(node_id, ("", b""))[0] == fp:
                return
            self._by_node[node_id] = (fp, cert_pem)
            self._version += 1

    def verified(self, node_id: str) -> bool:
        """Whether ``node_id`` passed Hello (holds a pinned certificate)."""
        with self._lock:
            return node_id in self._by_node

    def node_of(self, cert_pem: bytes) -> str | None:
        try:
            fp = cert_fingerprint(cert_pem)
        except ValueError:
            return None
        with self._lock:
            return next((node for node, (f, _) in self._by_node.items() if f == fp), None)

    def roots(self) -> bytes:
        with self._lock:
            own, peers = self._identity.cert_pem, [pem for _, pem in self._by_node.values()]
        return b"".join(_pem_line_end(c) for c in [own, *peers])

    def initial_config(self) -> Any:
        with self._lock:
            ident = self._identity  # one read: key and certificate of the same identity
        return grpc.ssl_server_certificate_configuration(
            [(ident.key_pem, ident.cert_pem)], root_certificates=self.roots())

    def fetch(self) -> Any:
        """gRPC's cert_config_fetcher: a new configuration when the verified set changed, else None."""
        with self._lock:
            if self._served == self._version:
                return None
            self._served = self._version
        return self.initial_config()


def _pem_line_end(pem: bytes) -> bytes:
    return pem if pem.endswith(b"\n") else pem + b"\n"


StreamHandler = Callable[[str, Iterator[bytes], grpc.ServicerContext], Iterator[bytes]]


class NodeServer:
    """Both servers of one node. Ports 0 pick free ports (``bound_port``/``bound_bootstrap_port``)."""

    def __init__(
        self, *, node_id: str, identity: LocalIdentityLike, verifier: PeerVerifierLike, host: str, port: int,
        bootstrap_port: int, peers: frozenset[str], admissible: HelloPolicy, note_refusal: RefusalNote,
        on_stream: StreamHandler, max_message_bytes: int, stream_workers: int,
        security: ChannelSecurity = MUTUAL_TLS,
    ) -> None:
        self.node_id = node_id
        self.registry = CertRegistry(identity)
        self._security = security
        self._on_stream = on_stream
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Notice dead peers on a quiet link, and let dialers ping us.
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.so_reuseport", 0),
            # HTTP/2 streams one connection may hold open here; a dialer needs one. Above the per-peer limit
            # (link.MAX_STREAMS_PER_PEER), so that a peer breaching it is seen and refused, and low, so that
            # what one connection can make this node hold before that is small.
            ("grpc.max_concurrent_streams", MAX_STREAMS_PER_PEER + 2),
        ]
        self._secure = grpc.server(
            futures.ThreadPoolExecutor(max_workers=stream_workers, thread_name_prefix=f"peer-{node_id}"),
            options=options)
        handler = grpc.method_handlers_generic_handler("fldsl.transport.v1.Peer", {
            "Exchange": grpc.stream_stream_rpc_method_handler(self._exchange),
        })
        self._secure.add_generic_rpc_handlers((handler,))
        creds = grpc.dynamic_ssl_server_credentials(
            self.registry.initial_config(), self.registry.fetch, require_client_authentication=True)
        self.bound_port = security.add_port(self._secure, host, port, creds)
        self._hello = hello = HelloService(me=node_id, identity=identity, verifier=verifier, peers=peers,
                             admissible=admissible, note_refusal=note_refusal, pin=self.registry.add)
        try:
            self._boot = BootstrapServer(hello, host=host, port=bootstrap_port)
        except BaseException:
            self._secure.stop(0)
            raise
        self.bound_bootstrap_port = self._boot.bound_port

    def start(self) -> None:
        self._boot.start()
        self._secure.start()

    def set_identity(self, identity: LocalIdentityLike) -> None:
        """A renewed key and certificate for every later Hello and TLS handshake (streams up stay up)."""
        self._hello.identity = identity
        self.registry.set_identity(identity)

    def stop(self, grace: float = 0.5) -> None:
        self._secure.stop(grace).wait()
        self._boot.stop(grace)

    def _exchange(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        node = self._security.caller(self.registry, context)  # MutualTls: the verified client certificate
        if node is None:
            log.warning("%s: Exchange from %s with an unverified certificate refused",
                        self.node_id, context.peer())
            abort(context, grpc.StatusCode.UNAUTHENTICATED,
                  f"{self.node_id}: the client certificate was not verified at Hello")
        return self._on_stream(node, request_iterator, context)


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    """``context.abort``, which always raises (grpc's type stubs do not say so)."""
    context.abort(code, details)
    raise AssertionError("grpc.ServicerContext.abort returned")  # pragma: no cover
