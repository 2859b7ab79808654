"""What every role shares: the run context, flow lookup, control messages, batching, models, export."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fldsl.runtime.bundle import BundleError, BundleTooLarge, read_npz
from fldsl.runtime.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointStore,
    RollbackDetected,
    agree_resume_step,
)
from fldsl.runtime.data import LabelRule, load_dataset
from fldsl.runtime.progress import Progress
from fldsl.runtime.transport.errors import FlowRefused, TransportError

from fldsl.artifacts import Flow, Plan, Policy, TensorSpec, dump_json

log = logging.getLogger("fldsl.node")

# Step keys of the per-(flow, step) mailboxes. Training steps are 0..total-1; control messages and evaluation
# batches use keys far above any training step so they can never collide with one.
CTRL_BASE = 1 << 50
CTRL_RESUME = CTRL_BASE + 1  # node -> coordinator: checkpoint steps it holds
CTRL_RESUME_AGREED = CTRL_BASE + 2  # coordinator -> node: the step everybody continues from
CTRL_ALIGN = CTRL_BASE + 3  # vertical: active -> passive: train / holdout positions
CTRL_INFO = CTRL_BASE + 4  # horizontal: worker -> server: number of rows
CTRL_SCHEDULE = CTRL_BASE + 5  # horizontal: server -> worker: steps per epoch
CTRL_DONE = CTRL_BASE + 6  # end of training
CTRL_ROLLBACK = CTRL_BASE + 1000  # + n: coordinator -> member: "a peer restarted, agree on a step again"
CTRL_LANDED = CTRL_BASE + (1 << 36)  # + step: node -> its resume peers: "I landed my checkpoint of step"
EVAL_BASE = 1 << 52  # + epoch * EVAL_STRIDE + batch index
EVAL_STRIDE = 1 << 24
DATA_BASE = 1 << 54  # distributed: chief -> worker shard chunks


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
            key = CTRL_ROLLBACK + self.rollbacks_seen
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

    # -- resume agreement -----------------------------------------------------------------------------------

    def agree_resume(self, coordinator: str, members: list[str]) -> int | None:
        """Exchange checkpoint steps; the coordinator picks the newest step all hold (None = fresh start).

        Rollback is checked first, on every node's own records (a recorded checkpoint whose file is gone) and
        across peers (a node holding less than a peer saw it land); either refuses the resume on every node
        unless ``allow_rollback``. The answer is checked too: a null, malformed or unknown step is refused.
        Nothing is deleted on a peer's word: the agreement only changes which checkpoints are offered, and
        the store's retention removes the others once a newer one has landed."""
        self.resume_peers = list(members) if self.node == coordinator else [coordinator]
        if self.store is not None:
            self.store.verify_files()  # a planted checkpoint of another pipeline or node is refused here
        mine = self.store.steps() if self.store else []
        if self.node == coordinator:
            agreed, line = self._coordinate(members, mine)
        else:
            agreed, line = self._follow(coordinator, mine)
        if self.store is not None:
            self.store.settle(agreed, self.resume_peers)
        self.line, self.landed_steps = line, []
        return agreed

    def _coordinate(self, members: list[str], mine: list[int]) -> tuple[int | None, str]:
        if self.rejoining is not None:
            # The other members are mid-step: ask them to agree on a step again too. A restarted
            # member is a fresh process: its rollback numbering starts again.
            self.rollbacks_sent[self.rejoining] = 0
            for peer in members:
                if peer != self.rejoining:
                    n = self.rollbacks_sent.get(peer, 0)
                    self.send_json(peer, CTRL_ROLLBACK + n, {"restarted": self.rejoining})
                    self.rollbacks_sent[peer] = n + 1
        reports = {peer: self._recv_report(peer) for peer in members}
        problems = [*self._own_evidence(), *(e for r in reports.values() for e in r.rollback),
                    *self._cross_check(reports, mine)]
        if problems:
            self._on_rollback(problems, members)
        agreed = agree_resume_step([mine, *(r.steps for r in reports.values())])
        if self.rejoining is not None:
            # Before answering: every member sends new step messages only after the answer, so what is
            # in the mailboxes now for steps >= agreed is stale.
            for peer in members:
                self.discard_stale(peer, agreed or 0)
        line = secrets.token_hex(16)
        answer = {"fresh": True, "line": line} if agreed is None else {"step": agreed, "line": line}
        for peer in members:
            self.send_json(peer, CTRL_RESUME_AGREED, answer)
        return agreed, line

    def _follow(self, coordinator: str, mine: list[int]) -> tuple[int | None, str]:
        evidence = self._own_evidence()
        seen = self.store.peers_seen().get(coordinator) if self.store else None
        self.send_json(coordinator, CTRL_RESUME, {
            "steps": mine, "seen": seen, "rollback": [] if self.allow_rollback else evidence})
        agreed, line = self._recv_answer(coordinator, mine)
        if evidence and not self.allow_rollback:  # the coordinator allowed it; this node does not
            raise RollbackDetected(_rollback_text(evidence) + _REFUSING)
        if self.rejoining is not None:
            # The restarted coordinator sends step messages only after ours: nothing new is lost here.
            self.discard_stale(self.rejoining, agreed or 0)
        return agreed, line

    def _own_evidence(self) -> list[str]:
        found = self.store.rollback_evidence() if self.store else []
        if found and self.allow_rollback:
            log.warning("%s: %s; continuing (rollback allowed)", self.node, "; ".join(found))
        return [f"{self.node}: {e}" for e in found]

    def _recv_report(self, peer: str) -> _Report:
        doc = self.recv_json(peer, CTRL_RESUME)
        try:
            return _Report.parse(doc)
        except (ValueError, TypeError) as e:
            raise ResumeRefused(f"{peer} sent a malformed resume report ({e}): refusing it") from None

    def _recv_answer(self, coordinator: str, mine: list[int]) -> tuple[int | None, str]:
        """The coordinator's answer, checked: an explicit fresh start, or one of the steps this node
        offered."""
        doc = self.recv_json(coordinator, CTRL_RESUME_AGREED)
        if not isinstance(doc, dict):
            raise ResumeRefused(f"{coordinator} answered the resume agreement with {_clip(doc)}, not an "
                                "object: refusing it (no checkpoint was touched)")
        if isinstance(doc.get("refused"), str):
            raise RollbackDetected(f"{coordinator} refused to resume: {doc['refused'][:4000]}")
        fresh = doc.get("fresh") is True and "step" not in doc
        step = doc.get("step")
        if not fresh and (type(step) is not int or step not in mine):
            offered = ", ".join(map(str, mine)) or "none"
            raise ResumeRefused(
                f"{coordinator} answered the resume agreement with step {_clip(step)}, which is neither one "
                f"of the checkpoint steps this node offered ({offered}) nor an explicit fresh start: "
                "refusing it (no checkpoint was touched)")
        line = doc.get("line")
        if not isinstance(line, str) or not _LINE.fullmatch(line):
            raise ResumeRefused(f"{coordinator} answered the resume agreement without a valid line id: "
                                "refusing it (no checkpoint was touched)")
        return (None if fresh else step), line

    def _cross_check(self, reports: dict[str, _Report], mine: list[int]) -> list[str]:
        """Each node against what the others saw it land: one holding less lost its newer checkpoints."""
        seen = self.store.peers_seen() if self.store else {}
        newest = max(mine, default=None)
        out = []
        for peer, r in reports.items():
            held = max(r.steps, default=None)
            if peer in seen and (held is None or held < seen[peer]):
                out.append(f"{peer} holds checkpoints up to {_upto(held)}, but {self.node} saw it land "
                           f"step {seen[peer]}")
            if r.seen is not None and (newest is None or newest < r.seen):
                out.append(f"{self.node} holds checkpoints up to {_upto(newest)}, but {peer} saw it land "
                           f"step {r.seen}")
        return out

    def _on_rollback(self, problems: list[str], members: list[str]) -> None:
        """Refuse the resume on every node, or (allowed) go on with a warning."""
        text = _rollback_text(problems)
        if self.allow_rollback:
            log.warning("%s; continuing from the newest step every node holds (rollback allowed)", text)
            self.progress.emit("phase", name="rollback", detail=text)
            return
        for peer in members:  # they wait for the answer: tell them why there is none
            try:
                self.send_json(peer, CTRL_RESUME_AGREED, {"refused": text})
            except (TransportError, RoleError):
                pass
        raise RollbackDetected(text + _REFUSING)

    # -- landed notices: what the cross-peer rollback check records ------------------------------------------

    def poll_landed(self, upto: int) -> None:
        """Note the peers' notices that they landed this node's recent checkpoint steps (or ``upto``), without
        waiting: they arrive before the peers' messages of the step before the next checkpoint (the
        checkpoint gate), so the records trail the peers by at most one checkpoint."""
        if self.store is None:
            return
        for peer in self.resume_peers:
            for step in [*self.landed_steps, upto]:
                if self.store.peers_seen().get(peer, -1) < step and self._take_landed(peer, step, 0) == "ok":
                    self.store.note_peer(peer, step)

    def announce_landed(self, step: int) -> None:
        """Tell the resume peers this node landed ``step`` (best effort: a lost notice only weakens their
        rollback check, so a closed or broken link is not an error here)."""
        for peer in self.resume_peers:
            try:
                self.send_json(peer, CTRL_LANDED + step, {"landed": step, "line": self.line})
            except (TransportError, RoleError) as e:
                log.debug("landed notice of step %d to %s not sent: %s", step, peer, e)

    def collect_landed(self, timeout_s: float = 5.0) -> None:
        """At the end of training: wait (bounded) for each peer's notice of the last checkpoint, so the
        records cover the final checkpoints too, and seal them."""
        if self.store is None or not self.landed_steps:
            return
        last = self.landed_steps[-1]
        self.poll_landed(last)
        deadline = time.monotonic() + timeout_s
        for peer in self.resume_peers:
            while self.store.peers_seen().get(peer, -1) < last and time.monotonic() < deadline:
                got = self._take_landed(peer, last, 0.25)
                if got == "ok":
                    self.store.note_peer(peer, last)
                elif got == "gone":
                    break
        self.store.flush()

    def wait_landed(self, step: int) -> None:
        """Block until every resume peer said it landed checkpoint ``step``. For a node that receives nothing
        per step (it only sends a raw field), the checkpoint gate of :class:`CheckpointWriter` does not hold
        by itself: without this it could land checkpoints c' and c'' while a slower peer has yet to land c,
        and a crash then would leave no step every node holds."""
        if self.store is None:
            return
        for peer in self.resume_peers:
            if self.store.peers_seen().get(peer, -1) >= step:
                continue

            def take(t: float, peer: str = peer) -> None:
                got = self._take_landed(peer, step, t)
                if got == "none":
                    raise TimeoutError
                if got == "gone":
                    raise RoleError(f"{self.node}: {peer} closed the link before it landed checkpoint {step}")

            self.wait(take, peer)
            self.store.note_peer(peer, step)

    def _take_landed(self, peer: str, step: int, timeout: float) -> Literal["ok", "none", "gone"]:
        try:
            data = self.links[peer].recv_blob(self.control_flow(peer, self.node), CTRL_LANDED + step, timeout)
        except TimeoutError:
            return "none"
        except (TransportError, RoleError):
            return "gone"
        try:
            doc = json.loads(data)
        except ValueError:
            doc = None
        # Only this line's notice of exactly the step asked for counts: a peer cannot raise its record above
        # a step this node landed itself, and notices of a line before the last agreement are stale.
        if isinstance(doc, dict) and type(doc.get("landed")) is int and doc["landed"] == step \
                and doc.get("line") == self.line:
            return "ok"
        log.debug("ignoring a stale or malformed landed notice from %s for step %d", peer, step)
        return "none"


_LINE = re.compile(r"[0-9a-f]{32}")
_MAX_REPORTED_STEPS = 64
_REFUSING = ("; refusing to resume (fldsl run --allow-rollback continues from the newest step every node "
             "still holds)")


def _rollback_text(problems: list[str]) -> str:
    return ("rollback detected: " + "; ".join(problems) + ". A newest checkpoint was deleted or an older "
            "copy restored: resuming would silently roll every node back")


def _upto(step: int | None) -> str:
    return "no checkpoint" if step is None else f"step {step}"


def _clip(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _step(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value < CTRL_BASE:
        raise ValueError(f"{what} {_clip(value)} is not a step")
    return value


@dataclass
class _Report:
    """A member's resume report: the steps it offers, the newest step of the coordinator it saw land, and
    its own rollback evidence."""

    steps: list[int]
    seen: int | None
    rollback: list[str]

    @classmethod
    def parse(cls, doc: Any) -> _Report:
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        raw = doc.get("steps")
        if not isinstance(raw, list) or len(raw) > _MAX_REPORTED_STEPS:
            raise ValueError(f"steps must be a list of at most {_MAX_REPORTED_STEPS} steps")
        seen = doc.get("seen")
        rollback = doc.get("rollback", [])
        if not isinstance(rollback, list) or len(rollback) > 16 or \
                not all(isinstance(x, str) for x in rollback):
            raise ValueError("rollback must be a list of at most 16 strings")
        steps = [_step(s, "checkpoint step") for s in raw]
        return cls(steps, None if seen is None else _step(seen, "seen step"), [x[:1000] for x in rollback])


def artifacts_digest(plan: Plan, policy: Policy) -> str:
    """What binds checkpoints where the caller gave no pins digest: this node's measured plan and policy
    (both change with the pipeline; the pins digest, which the node should pass, also covers every peer's
    measurement)."""
    h = hashlib.sha256(b"fldsl-node-artifacts/1\0")
    h.update(dump_json(plan).encode() + b"\0" + dump_json(policy).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# TensorFlow set-up, models, batching
# ---------------------------------------------------------------------------------------------------------


def configure_tf(intra: int = 1, inter: int = 2) -> None:
    """Few threads per node: several nodes share the machine's cores (inter-op >= 2 avoids deadlocks)."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError:
        pass  # already initialised (tests running several roles in one process)


def input_specs(plan: Plan, policy: Policy) -> dict[str, TensorSpec]:
    """Specs of everything the node's model reads: its data fields and the tensors it receives."""
    specs: dict[str, TensorSpec] = {}
    for ds in plan.data:
        for name, spec in ds.fields.items():
            specs[f"{ds.name}.{name}"] = spec
    produced = {op.output for op in plan.model}
    for op in plan.model:
        for ref in op.inputs:
            if ref in specs or ref in produced:
                continue
            for f in policy.flows:
                if f.dst == plan.node and f.tensor == ref and f.spec is not None:
                    specs[ref] = f.spec
                    break
            else:
                raise RoleError(f"{plan.node}: the model reads `{ref}`, which is neither a data field of "
                                "this node nor a tensor it receives")
    return specs


def build_model(plan: Plan, policy: Policy):
    from fldsl.stdlib.tf import build_segment

    return build_segment(plan.model, input_specs(plan, policy), seed=plan.train.seed)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of one epoch: identical on every node (and in the central reference)."""
    from fldsl.stdlib.tf.batching import epoch_permutation

    return epoch_permutation(n, seed, epoch)


def epoch_batch(n: int, seed: int, epoch: int, j: int, batch_size: int) -> np.ndarray:
    """Batch j of one epoch's shared row order (a view; the order itself is computed once per epoch)."""
    return epoch_order(n, seed, epoch)[j * batch_size:(j + 1) * batch_size]


def batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def cyclic_batch(order: np.ndarray, j: int, batch_size: int) -> np.ndarray:
    """Batch j of an order that wraps around (workers with fewer rows than the largest one)."""
    n = len(order)
    if n == 0:
        raise RoleError("no training rows")
    idx = (np.arange(batch_size) + j * batch_size) % n
    return order[idx]


def field_inputs(plan: Plan, tables: dict[str, Any], rows: np.ndarray | None) -> dict[str, np.ndarray]:
    """``{"<dataset>.<field>": array}`` for the given rows (all rows when None)."""
    out = {}
    for ds in plan.data:
        table = tables[ds.name]
        for name in ds.fields:
            arr = table.fields[name]
            out[f"{ds.name}.{name}"] = arr if rows is None else arr[rows]
    return out


def label_ref(plan: Plan) -> tuple[str, str]:
    if plan.loss is None:
        raise RoleError(f"{plan.node}: the plan has no loss")
    ds, _, fld = plan.loss.label.partition(".")
    return ds, fld


class Meter:
    """Examples per second over the training loop (excluding set-up)."""

    def __init__(self) -> None:
        self.examples = 0
        self.seconds = 0.0
        self._t: float | None = None

    def start(self) -> None:
        self._t = time.perf_counter()

    def stop(self, examples: int) -> None:
        if self._t is not None:
            self.seconds += time.perf_counter() - self._t
            self._t = None
        self.examples += examples

    @property
    def rate(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0


def score_metrics(loss_op: str, wanted: list[str], logits: np.ndarray,
                  labels: np.ndarray) -> dict[str, float]:
    """Holdout (or test) metrics of predictions, computed by whoever holds the labels: ``loss`` is the
    pipeline's loss on these rows, plus ``auc`` / ``accuracy`` where asked (stdlib ``evaluate_logits``)."""
    from fldsl.stdlib.tf import metrics as M

    return M.evaluate_logits(loss_op, wanted, logits, labels)


def report_epoch(ctx: RoleContext, epoch: int, metrics: dict[str, Any]) -> None:
    """An epoch's metrics: the progress event (metrics.jsonl, the summary) and TensorBoard scalars under
    ``<run-dir>/tensorboard/<node>/`` (``tensorboard --logdir runs/`` shows every node of every run). The
    event files are plain, as metrics.jsonl is: they hold the same numbers, not model or data."""
    ctx.progress.emit("epoch", epoch=epoch, metrics=metrics)
    # tf.summary.scalar is the tensorboard package's (not installed with tensorflow-cpu here); the writer
    # and write ops it wraps are TensorFlow's own. The "scalars" plugin tag is what makes TensorBoard plot
    # a tensor summary as a scalar curve, exactly as tf.summary.scalar marks it.
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2
    from tensorflow.python.ops import summary_ops_v2

    writer = ctx.cache.get("tensorboard")
    if writer is False:  # could not write before: said once, training goes on
        return
    # A copy of numbers the progress events already carry: a folder the node cannot write (a read-only
    # run folder, an enclave's manifest without it) costs the curves, never the run.
    try:
        if writer is None:  # one writer per process, kept across role re-runs (a new one opens a new file)
            logdir = ctx.run_dir / "tensorboard" / ctx.node
            logdir.mkdir(parents=True, exist_ok=True)
            writer = ctx.cache["tensorboard"] = summary_ops_v2.create_file_writer_v2(str(logdir))
        scalar = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
        with writer.as_default():
            for name, value in sorted(metrics.items()):
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    summary_ops_v2.write(name, tf.constant(float(value), tf.float32), step=epoch,
                                         metadata=scalar)
        writer.flush()  # visible while the run lasts, and complete if the node is killed
    except (OSError, tf.errors.OpError) as e:
        ctx.cache["tensorboard"] = False
        log.warning("TensorBoard curves are not written (%s: %s); the metrics are in metrics.jsonl",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")


# ---------------------------------------------------------------------------------------------------------
# Checkpoint and export helpers
# ---------------------------------------------------------------------------------------------------------


def is_checkpoint_step(plan: Plan, step_done: int, steps_per_epoch: int) -> bool:
    """Whether a checkpoint is due after ``step_done`` steps (counted from 1): every N steps, epoch ends."""
    every = plan.train.checkpoint_every_steps
    return (every is not None and every > 0 and step_done % every == 0) or step_done % steps_per_epoch == 0


def announce_training(ctx: RoleContext, total: int, steps_per_epoch: int, resumed_from: int | None) -> None:
    """The launcher's progress bar sizes itself from this event; resumed_from marks a restart."""
    ctx.progress.emit("plan", total_steps=total, steps_per_epoch=steps_per_epoch,
                      epochs=ctx.plan.train.epochs, resumed_from=resumed_from)
    ctx.progress.emit("phase", name="train")


def save_checkpoint(ctx: RoleContext, step: int, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Land checkpoint ``step`` (with the peers' landed notices read so far), then tell the resume peers."""
    if ctx.store is None:
        return
    ctx.poll_landed(step)
    path = ctx.store.save(Checkpoint(step=step, arrays=arrays, meta=meta))
    ctx.landed_steps = [*ctx.landed_steps, step][-_LANDED_WINDOW:]
    ctx.progress.emit("checkpoint", step=step, path=str(path))
    ctx.announce_landed(step)


# Own checkpoint steps whose notices from the peers are still looked for: a peer's notice of step c arrives
# before this node lands the checkpoint after c (the checkpoint gate), so a few are plenty.
_LANDED_WINDOW = 4


class CheckpointWriter:
    """Runs checkpoint writes in one background thread, one at a time, off the training loop's critical
    path (encoding, sealing and fsync of a large model take a good fraction of a second); a failure surfaces
    at the next ``wait``. Callers hand it arrays no one writes to while it runs (copies, or arrays they
    wait for before touching) and wait before leaving the role (a re-run role lists the store's checkpoints:
    a write must not land after that). See :func:`with_checkpoint_writer`.

    The checkpoint gate: a store keeps two checkpoints, so resuming needs every node to have landed
    checkpoint c before any node lands the next one, c'. A node reaches c' only with its peers' messages for
    step c' - 1, so each node waits for its pending write before it sends a message of the step just before
    a checkpoint step. The write still overlaps every step in between (all of them when checkpoints are an
    epoch apart); with a checkpoint every step it is back on the critical path."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, fn: Callable[[], None]) -> None:
        self.wait()

        def body() -> None:
            try:
                fn()
            except BaseException as e:  # handed to the role's thread at the next wait()
                self._error = e

        self._thread = threading.Thread(target=body, name=self._name)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err


def with_checkpoint_writer(ctx: RoleContext, body: Callable[[CheckpointWriter], dict[str, Any]]
                           ) -> dict[str, Any]:
    """Run a role's ``body`` with a background checkpoint writer; return only once its last write has
    landed (or failed: then raise that), also when ``body`` raises."""
    writer = CheckpointWriter(f"{ctx.node}-checkpoint")
    try:
        result = body(writer)
    except BaseException:
        try:
            writer.wait()
        except Exception:  # the exception already in flight is the one to report
            pass
        raise
    writer.wait()
    ctx.collect_landed()
    return result


def export_model(ctx: RoleContext, weights: list[np.ndarray], names: list[str], *,
                 specs: dict[str, TensorSpec] | None = None, metrics: dict[str, Any] | None = None,
                 history: list[dict[str, Any]] | None = None,
                 holdout: tuple[np.ndarray, np.ndarray] | None = None) -> Path | None:
    """Seal the node's part of the trained model under the plan's export name; when the plan names the
    owner's public key (``export_recipient``), also write it encrypted to that key (``<name>.owner``): a
    sealed file opens only inside the enclave (under SGX its key is bound to MRENCLAVE).

    Then the same part as a SavedModel with its model card (``fldsl.runtime.savedmodel.export_pack``):
    ``specs`` where the plan cannot give the model's input specs (the horizontal aggregator), ``metrics`` /
    ``history`` for the card, ``holdout`` = (ids, logits) of the label owner's last holdout evaluation."""
    if ctx.plan.export is None:
        return None
    from fldsl.runtime import sealing

    buf = io.BytesIO()
    members = {f"{i:04d}:{n}": w for i, (n, w) in enumerate(zip(names, weights, strict=True))}
    fitted = ctx.cache.get("preprocessing")
    if fitted:  # the preprocessing fitted on this node's training rows (docs/language.md, "Preprocessing")
        from fldsl.runtime.preprocess import to_bytes

        members["preprocessing"] = np.frombuffer(to_bytes(fitted), dtype=np.uint8)
    np.savez(buf, **members)
    safe = ctx.plan.export.replace("/", "_")
    dst = ctx.run_dir / "models" / f"{safe}.sealed"
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = buf.getvalue()
    sealing.seal_file(data, dst, key=ctx.seal_key, node_id=ctx.node, name=ctx.plan.export, version=1)
    ctx.exports[ctx.plan.export] = str(dst)
    owner: dict[str, str] = {}
    if ctx.plan.export_recipient is not None:
        from fldsl.runtime.owner_export import encrypt_file

        owner_dst = dst.with_name(f"{safe}.owner")
        encrypt_file(data, owner_dst, recipient_pem=ctx.plan.export_recipient, node_id=ctx.node,
                     name=ctx.plan.export)
        ctx.owner_exports[ctx.plan.export] = str(owner_dst)
        owner["owner_path"] = str(owner_dst)
    ctx.progress.emit("export", name=ctx.plan.export, path=str(dst), **owner)
    from fldsl.runtime.savedmodel import export_pack

    export_pack(ctx, weights, specs=specs, metrics=metrics, history=history, holdout=holdout)
    return dst


PSI_BASE = 1 << 53


def blob_channel(ctx: RoleContext, peer: str, kind: str, base: int = PSI_BASE
                 ) -> tuple[Callable[[bytes], None], Callable[[], bytes]]:
    """``send(bytes)`` / ``recv() -> bytes`` over the (kind) flows with a peer: what PSI runs on.

    Messages are numbered per direction so the mailbox delivers them in order.
    """
    out_id = ctx.flow(ctx.node, peer, (kind,)).id
    in_id = ctx.flow(peer, ctx.node, (kind,)).id
    link = ctx.links[peer]
    counters = {"out": 0, "in": 0}

    def send(data: bytes) -> None:
        link.send_blob(out_id, base + counters["out"], data)
        counters["out"] += 1

    def recv() -> bytes:
        data = ctx.wait(lambda t: link.recv_blob(in_id, base + counters["in"], t), peer)
        counters["in"] += 1
        return data

    return send, recv


def fit_preprocessing(ctx: RoleContext, tables: dict[str, Any], train_rows: dict[str, np.ndarray],
                      apply_to: dict[str, str] | None = None,
                      pooled: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Fit the schema blocks' preprocessing (missing values, scaling, categories) on this node's training
    rows of each data set and make the tables' ``features``; kept in ``ctx.cache["preprocessing"]`` for the
    exported model. A no-op for data sets without any (fldsl.runtime.preprocess)."""
    from fldsl.runtime.preprocess import fit_tables

    fitted = fit_tables(ctx.plan.data, tables, train_rows, apply_to, pooled)
    if fitted:
        ctx.cache["preprocessing"] = fitted
        if ctx.plan.export is None:  # a node without a model export (a horizontal worker): seal the fit alone
            seal_preprocessing(ctx, fitted)
    return fitted


def seal_preprocessing(ctx: RoleContext, fitted: dict[str, Any]) -> Path:
    """``models/<node>_preprocessing.sealed`` (name ``<node>/preprocessing``): this node's fitted
    preprocessing, where the model it trained is exported by another node (the aggregator's)."""
    from fldsl.runtime import sealing
    from fldsl.runtime.preprocess import to_bytes

    name = f"{ctx.node}/preprocessing"
    dst = ctx.run_dir / "models" / f"{name.replace('/', '_')}.sealed"
    dst.parent.mkdir(parents=True, exist_ok=True)
    sealing.seal_file(to_bytes(fitted), dst, key=ctx.seal_key, node_id=ctx.node, name=name, version=1)
    ctx.progress.emit("export", name=name, path=str(dst))
    return dst


def load_tables(plan: Plan) -> dict[str, Any]:
    """This node's data sets. Those whose labels the loss reads (its label's data set, and a separate test
    set) are checked against the loss's classes, before any alignment or training."""
    rule = label_rule(plan)
    labelled = {plan.loss.label.partition(".")[0]} if plan.loss is not None else set()
    if plan.train.validation.test_data:
        labelled.add(plan.train.validation.test_data)
    return {ds.name: load_dataset(ds, label_rule=rule if ds.name in labelled else None) for ds in plan.data}


def label_rule(plan: Plan) -> LabelRule | None:
    """The label values the plan's loss accepts: 0/1 for sigmoid cross entropy, the classes ``[0, K)`` for
    softmax cross entropy over logits of width K; None for a regression (mse) or no loss."""
    loss = plan.loss
    if loss is None or loss.op not in ("sigmoid_cross_entropy", "softmax_cross_entropy"):
        return None
    if loss.op == "sigmoid_cross_entropy":
        return LabelRule(2, f"a binary task: loss {loss.op}")
    width = next((op.spec.shape[-1] for op in plan.model if op.output == loss.logits and op.spec.shape), None)
    if width is None:  # not in this plan's model (the compiler always puts it there): nothing to check
        return None
    what = "a binary task" if width == 2 else f"{width} classes"
    return LabelRule(width, f"{what}: loss {loss.op} over logits `{loss.logits}` of width {width}")


def send_chunked(ctx: RoleContext, peer: str, flow: Flow, base: int, data: bytes) -> None:
    """Send bytes larger than the flow's per-message budget as numbered chunks (count first)."""
    limit = max(1024, flow.max_bytes - 64)
    chunks = [data[i:i + limit] for i in range(0, len(data), limit)] or [b""]
    link = ctx.links[peer]
    link.send_blob(flow.id, base, len(chunks).to_bytes(8, "little"))
    for i, c in enumerate(chunks):
        link.send_blob(flow.id, base + 1 + i, c)


def recv_chunked(ctx: RoleContext, peer: str, flow: Flow, base: int, limit: int, what: str) -> bytes:
    """What :func:`send_chunked` sent, refused (naming ``limit``) as soon as its announced chunk count or
    the bytes received would exceed ``limit`` bytes: a peer cannot make this node buffer more."""
    link = ctx.links[peer]
    head = ctx.wait(lambda t: link.recv_blob(flow.id, base, t), peer)
    if len(head) != 8:
        raise RoleError(f"{peer}: malformed chunk header on flow {flow.id}")
    n = int.from_bytes(head, "little")
    per_chunk = max(1024, flow.max_bytes - 64)  # as send_chunked cuts them
    most = max(1, -(-limit // per_chunk))
    if n > most:
        raise PeerLimitExceeded(f"{peer} announces {what} in {n:,} chunks of up to {per_chunk:,} bytes, more "
                                f"than the {most:,} its limit of {limit:,} bytes allows: refusing",
                                flow=flow.id, peer=peer)
    parts, total = [], 0
    for i in range(n):
        part = ctx.wait(lambda t, i=i: link.recv_blob(flow.id, base + 1 + i, t), peer)
        total += len(part)
        if total > limit:
            raise PeerLimitExceeded(f"{peer} sent more than {limit:,} bytes of {what} (its limit): refusing",
                                    flow=flow.id, peer=peer)
        parts.append(part)
    return b"".join(parts)


def pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def unpack_arrays(data: bytes, who: str, *, limit: int, what: str) -> dict[str, np.ndarray]:
    """The arrays of a peer's bundle; refused before anything is expanded when the bundle, or what it would
    expand to, exceeds ``limit`` bytes (derived by the caller from the plan), or is not plain arrays."""
    try:
        return read_npz(data, limit=limit, what=f"{what} from {who}")
    except BundleTooLarge as e:
        raise PeerLimitExceeded(f"{e}: refusing it before expanding anything", peer=who) from None
    except BundleError as e:
        raise RoleError(f"malformed array bundle: {e}") from e
