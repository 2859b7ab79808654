"""The run context a role works in: its plan and policy, links, checkpoint store and progress; flow lookup,
JSON control messages, waiting on peers (noticing Ctrl-C, restarts and rollback requests), and the resume
agreement (delegated to :mod:`fldsl.runtime.roles.resume_agreement`)."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fldsl.artifacts import Flow, Plan, Policy, dump_json
from fldsl.runtime.checkpoint import CheckpointStore
from fldsl.runtime.progress import Progress
from fldsl.runtime.roles import resume_agreement
from fldsl.runtime.roles.errors import Interrupted, PeerRestarted, RoleError, RollbackRequested
from fldsl.runtime.transport import keys

log = logging.getLogger("fldsl.node")


@dataclass
class RoleContext:
    plan: Plan
    policy: Policy
    links: dict[str, Any]  # peer node id -> PeerLink
    progress: Progress
    store: CheckpointStore | None
    run_dir: Path
    seal_key: bytes
    stop: threading.Event = field(default_factory=threading.Event)
    recv_timeout_s: float = 300.0
    exports: dict[str, str] = field(default_factory=dict)
    owner_exports: dict[str, str] = field(default_factory=dict)  # export name -> file encrypted to its owner
    # Link generations seen when the role (re)started, the peer whose restart is being handled, and the
    # highest step this node has worked on (bounds the stale messages to drop after a restart).
    generations: dict[str, int] = field(default_factory=dict)
    rejoining: str | None = None
    last_step: int = 0
    rollbacks_seen: int = 0  # rollback requests received (numbers the next expected one)
    rollbacks_sent: dict[str, int] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)  # kept across role re-runs (e.g. a received shard)
    # The message keys a role uses for step k, where that is not just k (FedAvg sends a round's weights as
    # several messages): discard_stale must find all of them. Set by the role; kept across re-runs.
    step_keys: Callable[[int], Iterable[int]] | None = None
    # Rollback (docs/trust.md "Sealed storage"): resume from older checkpoints than this node's or its peers'
    # records show only when the user says so (fldsl run --allow-rollback).
    allow_rollback: bool = False
    # Set by the resume agreement: the peers it runs with, the id of the line of history it started (landed
    # notices of an earlier line are stale), and this node's checkpoint steps landed since.
    resume_peers: list[str] = field(default_factory=list)
    line: str | None = None
    landed_steps: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        # A store the caller did not bind to the pins digest is bound to this node's measured artifacts,
        # so checkpoints are never read or written unbound.
        if self.store is not None and self.store.pipeline_digest is None:
            self.store.bind(artifacts_digest(self.plan, self.policy))

    def mark_links(self) -> None:
        self.generations = {p: g for p, link in self.links.items()
                            if (g := getattr(link, "generation", None)) is not None}

    def check_peer(self, peer: str) -> None:
        gen = getattr(self.links[peer], "generation", None)
        if gen is not None and peer in self.generations and gen != self.generations[peer]:
            raise PeerRestarted(peer)

    def check_rollback(self, peer: str) -> None:
        from fldsl.runtime.transport import TransportError

        if not any(f.src == peer and f.dst == self.node and f.kind == "control" for f in self.policy.flows):
            return
        try:
            key = keys.rollback(self.rollbacks_seen)
            self.links[peer].recv_blob(self.control_flow(peer, self.node), key, 0)
        except (TimeoutError, TransportError):
            return
        self.rollbacks_seen += 1
        raise RollbackRequested(peer)

    def discard_stale(self, peer: str, start: int) -> None:
        """Drop what a peer's previous process sent for steps >= ``start`` (it will send them again)."""
        from fldsl.runtime.transport import TransportError

        link = self.links[peer]
        flows = [f for f in self.policy.flows if f.src == peer and f.dst == self.node
                 and f.kind in ("activation", "gradient", "gradients", "weights", "metrics")]
        dropped = 0
        keys = [key for k in range(max(0, start), self.last_step + 3)
                for key in (self.step_keys(k) if self.step_keys else (k,))]
        for f in flows:
            for key in keys:
                while True:
                    try:
                        link.recv_blob(f.id, key, 0)  # any kind: a mismatch still removes the message
                        dropped += 1
                    except (TimeoutError, TransportError):
                        break
        if dropped:
            log.info("dropped %d stale message(s) of %s's previous process", dropped, peer)

    @property
    def node(self) -> str:
        return self.plan.node

    # -- flows ----------------------------------------------------------------------------------------------

    def flow(self, src: str, dst: str, kinds: tuple[str, ...], tensor: str | None = None) -> Flow:
        for f in self.policy.flows:
            if f.src == src and f.dst == dst and f.kind in kinds and (tensor is None or f.tensor == tensor):
                return f
        what = f"{'/'.join(kinds)} flow" + (f" `{tensor}`" if tensor else "")
        raise RoleError(f"the policy of {self.node} has no {what} from {src} to {dst}; "
                        "recompile the pipeline (`fldsl compile`)")

    def flows_in(self, kind: str) -> list[Flow]:
        return [f for f in self.policy.flows if f.dst == self.node and f.kind == kind]

    def control_flow(self, src: str, dst: str) -> str:
        """The protocol channel between two nodes (the compiler emits ``control`` flows both ways)."""
        for f in self.policy.flows:
            if f.src == src and f.dst == dst and f.kind == "control" and f.tensor == "control":
                return f.id
        return self.flow(src, dst, ("control",)).id

    def holdout_flow(self, src: str, dst: str) -> Flow:
        """The flow sized for the train/holdout positions (``holdout``), else the control flow."""
        for f in self.policy.flows:
            if f.src == src and f.dst == dst and f.kind == "control" and f.tensor == "holdout":
                return f
        return self.flow(src, dst, ("control",))

    # -- control messages (small JSON documents over the peer's control flow) -------------------------------

    def send_json(self, peer: str, step: int, obj: Any) -> None:
        data = json.dumps(obj, sort_keys=True).encode()
        self.links[peer].send_blob(self.control_flow(self.node, peer), step, data)

    def recv_json(self, peer: str, step: int) -> Any:
        data = self.wait(lambda t: self.links[peer].recv_blob(self.control_flow(peer, self.node), step, t),
                         peer)
        try:
            return json.loads(data)
        except ValueError as e:
            raise RoleError(f"malformed control message from {peer}: {e}") from e

    def wait(self, fn: Callable[[float], Any], peer: str | None = None) -> Any:
        """Call a blocking receive in short slices so Ctrl-C (and a restart of ``peer``) is noticed while
        waiting on a peer."""
        deadline = time.monotonic() + self.recv_timeout_s
        while True:
            self.check_stop()
            if peer is not None:
                self.check_peer(peer)
                self.check_rollback(peer)
            try:
                return fn(0.5)
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise RoleError(f"{self.node}: no message from the peer for {self.recv_timeout_s:.0f} s"
                                    ) from None

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise Interrupted()

    # -- resume agreement and landed notices (fldsl.runtime.roles.resume_agreement) --------------------------

    def agree_resume(self, coordinator: str, members: list[str]) -> int | None:
        """Agree on the step to resume from (None: a fresh start); see :mod:`resume_agreement`."""
        return resume_agreement.agree_resume(self, coordinator, members)

    def poll_landed(self, upto: int) -> None:
        resume_agreement.poll_landed(self, upto)

    def announce_landed(self, step: int) -> None:
        resume_agreement.announce_landed(self, step)

    def collect_landed(self, timeout_s: float = 5.0) -> None:
        resume_agreement.collect_landed(self, timeout_s)

    def wait_landed(self, step: int) -> None:
        resume_agreement.wait_landed(self, step)


def artifacts_digest(plan: Plan, policy: Policy) -> str:
    """What binds checkpoints where the caller gave no pins digest: this node's measured plan and policy
    (both change with the pipeline; the pins digest, which the node should pass, also covers every peer's
    measurement)."""
    h = hashlib.sha256(b"fldsl-node-artifacts/1\0")
    h.update(dump_json(plan).encode() + b"\0" + dump_json(policy).encode())
    return h.hexdigest()
