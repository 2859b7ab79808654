"""The attested gRPC transport (ARCHITECTURE.md, "Transport"; docs/trust.md).

Bootstrap attestation (``Hello`` exchanges RA-TLS certificates, each side verifies the other with the
trust layer's ``PeerVerifier``) → mutual TLS pinned to exactly the verified certificates → one policed
bidirectional stream per peer pair carrying raw tensors, lists of arrays and opaque blobs, each under a
typed message key (``keys.py``). See ``transport.py`` for the handshake, ``link.py`` for delivery
semantics, ``guard.py`` for the policy checks, ``channel.py`` for how the streams are secured.

Regenerate the protobuf modules after editing ``fldsl.proto`` (grpcio-tools < 1.82, see pyproject)::

    cd runtime/transport && /work/venv/bin/python -m grpc_tools.protoc -I. --python_out=. \\
        --grpc_python_out=. --pyi_out=. fldsl.proto && \\
    sed -i 's/^import fldsl_pb2 as/from . import fldsl_pb2 as/' fldsl_pb2_grpc.py
"""

from .addresses import Addresses, NodeAddress, check_host_port, load_addresses, save_addresses
from .errors import FlowRefused, FrameError, PeerUnreachable, RecvTimeout, RemoteRefused, TransportError
from .guard import FlowGuard
from .identity import LocalIdentityLike, PeerVerifierLike, is_trust_failure
from .link import FlowStats, PeerLink
from .transport import Transport

__all__ = [
    "Addresses",
    "FlowGuard",
    "FlowRefused",
    "FlowStats",
    "FrameError",
    "LocalIdentityLike",
    "NodeAddress",
    "PeerLink",
    "PeerUnreachable",
    "PeerVerifierLike",
    "RecvTimeout",
    "RemoteRefused",
    "Transport",
    "TransportError",
    "check_host_port",
    "is_trust_failure",
    "load_addresses",
    "save_addresses",
]
