"""The exceptions a role raises (the node maps them to exit codes and one-line messages)."""

from __future__ import annotations

from fldsl.runtime.checkpoint import CheckpointError
from fldsl.runtime.transport.errors import FlowRefused


class Interrupted(Exception):
    """SIGINT/SIGTERM asked the node to stop at the next step boundary."""


class RoleError(Exception):
    """A user-facing failure of the role (bad plan shape, peer protocol violation)."""


class PeerLimitExceeded(RoleError, FlowRefused):
    """A peer sent or announced more than the plan allows (bundle bytes, rows, chunks): refused before
    anything is allocated for it. A policy violation, like a message outside the flows (exit code 3)."""


class PeerProtocolError(RoleError, FlowRefused):
    """A peer's message passed its flow's policy (flow, dtype, size) but does not fit the protocol where the
    role reads it (activations or gradients for another number of rows than the step's batch): refused
    before it is used, like a message outside the flows (exit code 3)."""


class ResumeRefused(RoleError, CheckpointError):
    """A resume agreement message that does not follow the protocol (a step this node does not hold, a
    null or malformed one): refused, and no checkpoint is touched."""


class PeerRestarted(Exception):
    """The link to ``peer`` came back with a new generation: the peer process restarted (fresh attestation)
    and will ask to resume from a checkpoint. The node re-runs its role, which agrees on the step again."""

    def __init__(self, peer: str) -> None:
        super().__init__(f"{peer} reconnected (restarted)")
        self.peer = peer


class RollbackRequested(PeerRestarted):
    """The coordinator asks this node to agree on a resume step again (another member restarted)."""
