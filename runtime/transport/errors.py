"""Errors of the attested transport. Every message is meant for an operator: who, which flow, why."""

from __future__ import annotations


class TransportError(Exception):
    """Base class: the link cannot do what was asked (peer unreachable, stream broken, timeout)."""


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
