"""Errors of the attested transport. Every message is meant for an operator: who, which flow, why."""

from __future__ import annotations


class TransportError(Exception):
    """Base class: the link cannot do what was asked (peer unreachable, stream broken, timeout)."""


def cannot_listen(host: str, port: int, detail: str = "") -> TransportError:
    """Why a node cannot bind ``host:port``, said the way an operator can act on it: the address is not one
    of this machine's (a --listen or addresses.json `listen` meant for another host), or the port is taken."""
    import errno
    import socket

    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    why = "the port is in use, or binding it is not allowed"
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
    except socket.gaierror:
        why = f"`{host}` is not an address this machine can resolve"
    except OSError as e:
        if e.errno == errno.EADDRNOTAVAIL:
            why = (f"`{host}` is not an address of this machine: listen on one of its own addresses, or "
                   "0.0.0.0 for all (--listen, or `listen` in addresses.json)")
    return TransportError(f"cannot listen on {target}: {why}" + (f" ({detail})" if detail else ""))


class FrameError(TransportError):
    """Bytes on the wire are not a well-formed frame (truncated, bad dtype/shape/size bookkeeping)."""


class FlowRefused(TransportError):
    """A tensor/blob is not allowed by the policy (on the sender before sending, or on the receiver)."""

    def __init__(self, message: str, *, flow: str | None = None, peer: str | None = None) -> None:
        super().__init__(message)
        self.flow = flow
        self.peer = peer


class MalformedFrame(FrameError, FlowRefused):
    """A peer sent bytes that are not a well-formed frame (undecodable, a chunk out of sequence, size fields
    that do not add up): refused like a message outside the policy, failing the link closed, and named as
    a refusal of that peer (exit code 3)."""


class ReceiveBudgetExceeded(FlowRefused):
    """A peer sent more than the link's receive budget allows ahead of what this node's role has read (see
    ``link.receive_budget``): refused, failing the link closed, instead of buffering without limit."""


class StreamLimitExceeded(FlowRefused):
    """A peer opened more Exchange streams than a node ever needs (too many at once, or replaced its live
    stream again and again; see ``link.MAX_STREAMS_PER_PEER``): the call is refused and the link fails closed,
    as for any policy violation, instead of serving (and resynchronising with) every stream it opens."""


class RemoteRefused(TransportError):
    """The peer refused our attestation at Hello; carries the peer's reason (e.g. which field mismatched).

    Local verification failures raise the verifier's own ``PeerRefused`` instead; both are trust failures
    (see :func:`fldsl.runtime.transport.is_trust_failure`).
    """

    def __init__(self, message: str, *, peer: str, field: str | None = None) -> None:
        super().__init__(message)
        self.peer = peer
        self.field = field


class PeerUnreachable(TransportError):
    """No connection to the peer within the connect timeout."""


class RecvTimeout(TransportError, TimeoutError):
    """Nothing arrived for (flow, step) within the timeout."""
