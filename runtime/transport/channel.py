"""How a node's Exchange streams are secured: an argument of :class:`Transport`, not a module to patch.

:class:`MutualTls` is the only security ``fldsl run`` and the node's command line can reach: the listening
port takes TLS with client certificates (the roots being the certificates verified at Hello), the dialer
pins the peer's verified certificate, and every call is attributed by its client certificate. The bench
(``fldsl.bench.node``, plain mode) passes its own implementation from Python; there is no flag, setting or
environment variable that selects one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import grpc

from .errors import cannot_listen
from .identity import LocalIdentityLike

if TYPE_CHECKING:
    from .server import CertRegistry


class ChannelSecurity(Protocol):
    """The three places where the transport's streams are secured."""

    def add_port(self, server: grpc.Server, host: str, port: int, creds: grpc.ServerCredentials) -> int:
        """Bind the Exchange port (``creds``: the mutual-TLS credentials of the verified peers); the port."""
        ...

    def caller(self, registry: CertRegistry, context: grpc.ServicerContext) -> str | None:
        """The node an Exchange call comes from, or None to refuse it."""
        ...

    def channel(self, target: str, peer_id: str, peer_cert: bytes, identity: LocalIdentityLike,
                options: list[tuple[str, Any]]) -> Any:
        """A channel to ``peer_id`` at ``target`` whose only trust root is its verified ``peer_cert``."""
        ...


def bind(server: grpc.Server, host: str, port: int, add: Any) -> int:
    """``add(target)`` -> bound port, with the transport's error where binding fails."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = int(add(target))
    except RuntimeError as e:
        raise cannot_listen(host, port, str(e)) from None
    if bound == 0:
        raise cannot_listen(host, port)
    return bound


class MutualTls:
    """RA-TLS certificates on both sides, pinned: the node's security (module docstring)."""

    def add_port(self, server: grpc.Server, host: str, port: int, creds: grpc.ServerCredentials) -> int:
        return bind(server, host, port, lambda target: server.add_secure_port(target, creds))

    def caller(self, registry: CertRegistry, context: grpc.ServicerContext) -> str | None:
        # Every RPC re-checks the caller: the TLS client certificate must be one verified at Hello.
        pems = context.auth_context().get("x509_pem_cert") or []
        return registry.node_of(pems[0]) if pems else None

    def channel(self, target: str, peer_id: str, peer_cert: bytes, identity: LocalIdentityLike,
                options: list[tuple[str, Any]]) -> Any:
        creds = grpc.ssl_channel_credentials(
            root_certificates=peer_cert, private_key=identity.key_pem, certificate_chain=identity.cert_pem)
        return grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", peer_id),
                                                           *options])


MUTUAL_TLS = MutualTls()
