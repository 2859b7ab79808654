"""The resume agreement between a coordinator and its members, and the landed notices it is checked with.

Every node offers the checkpoint steps it holds; the coordinator picks the newest step all hold (None: a fresh
start). Rollback is refused unless allowed: a node's own records (a recorded checkpoint whose file is gone)
and each peer's record of what this node landed (``landed`` notices, sent after every checkpoint) catch a
deleted newest checkpoint or a restored older copy. :class:`~fldsl.runtime.roles.context.RoleContext`
exposes these as its methods (``ctx.agree_resume``, ``ctx.poll_landed``, ...).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from fldsl.runtime.checkpoint import RollbackDetected, agree_resume_step
from fldsl.runtime.roles.errors import ResumeRefused, RoleError
from fldsl.runtime.transport import keys
from fldsl.runtime.transport.errors import TransportError

if TYPE_CHECKING:
    from fldsl.runtime.roles.context import RoleContext

log = logging.getLogger("fldsl.node")


def agree_resume(ctx: RoleContext, coordinator: str, members: list[str]) -> int | None:
    """Exchange checkpoint steps; the coordinator picks the newest step all hold (None = fresh start).

    Rollback is checked first, on every node's own records (a recorded checkpoint whose file is gone) and
    across peers (a node holding less than a peer saw it land); either refuses the resume on every node
    unless ``allow_rollback``. The answer is checked too: a null, malformed or unknown step is refused.
    Nothing is deleted on a peer's word: the agreement only changes which checkpoints are offered, and
    the store's retention removes the others once a newer one has landed."""
    ctx.resume_peers = list(members) if ctx.node == coordinator else [coordinator]
    if ctx.store is not None:
        ctx.store.verify_files()  # a planted checkpoint of another pipeline or node is refused here
    mine = ctx.store.steps() if ctx.store else []
    if ctx.node == coordinator:
        agreed, line = _coordinate(ctx, members, mine)
    else:
        agreed, line = _follow(ctx, coordinator, mine)
    if ctx.store is not None:
        ctx.store.settle(agreed, ctx.resume_peers)
    ctx.line, ctx.landed_steps = line, []
    return agreed


def _coordinate(ctx: RoleContext, members: list[str], mine: list[int]) -> tuple[int | None, str]:
    if ctx.rejoining is not None:
        # The other members are mid-step: ask them to agree on a step again too. A restarted
        # member is a fresh process: its rollback numbering starts again.
        ctx.rollbacks_sent[ctx.rejoining] = 0
        for peer in members:
            if peer != ctx.rejoining:
                n = ctx.rollbacks_sent.get(peer, 0)
                ctx.send_json(peer, keys.rollback(n), {"restarted": ctx.rejoining})
                ctx.rollbacks_sent[peer] = n + 1
    reports = {peer: _recv_report(ctx, peer) for peer in members}
    problems = [*_own_evidence(ctx), *(e for r in reports.values() for e in r.rollback),
                *_cross_check(ctx, reports, mine)]
    if problems:
        _on_rollback(ctx, problems, members)
    agreed = agree_resume_step([mine, *(r.steps for r in reports.values())])
    if ctx.rejoining is not None:
        # Before answering: every member sends new step messages only after the answer, so what is
        # in the mailboxes now for steps >= agreed is stale.
        for peer in members:
            ctx.discard_stale(peer, agreed or 0)
    line = secrets.token_hex(16)
    answer = {"fresh": True, "line": line} if agreed is None else {"step": agreed, "line": line}
    for peer in members:
        ctx.send_json(peer, keys.control(keys.Control.RESUME_AGREED), answer)
    return agreed, line


def _follow(ctx: RoleContext, coordinator: str, mine: list[int]) -> tuple[int | None, str]:
    evidence = _own_evidence(ctx)
    seen = ctx.store.peers_seen().get(coordinator) if ctx.store else None
    ctx.send_json(coordinator, keys.control(keys.Control.RESUME), {
        "steps": mine, "seen": seen, "rollback": [] if ctx.allow_rollback else evidence})
    agreed, line = _recv_answer(ctx, coordinator, mine)
    if evidence and not ctx.allow_rollback:  # the coordinator allowed it; this node does not
        raise RollbackDetected(_rollback_text(evidence) + _REFUSING)
    if ctx.rejoining is not None:
        # The restarted coordinator sends step messages only after ours: nothing new is lost here.
        ctx.discard_stale(ctx.rejoining, agreed or 0)
    return agreed, line


def _own_evidence(ctx: RoleContext) -> list[str]:
    found = ctx.store.rollback_evidence() if ctx.store else []
    if found and ctx.allow_rollback:
        log.warning("%s: %s; continuing (rollback allowed)", ctx.node, "; ".join(found))
    return [f"{ctx.node}: {e}" for e in found]


def _recv_report(ctx: RoleContext, peer: str) -> _Report:
    doc = ctx.recv_json(peer, keys.control(keys.Control.RESUME))
    try:
        return _Report.parse(doc)
    except (ValueError, TypeError) as e:
        raise ResumeRefused(f"{peer} sent a malformed resume report ({e}): refusing it") from None


def _recv_answer(ctx: RoleContext, coordinator: str, mine: list[int]) -> tuple[int | None, str]:
    """The coordinator's answer, checked: an explicit fresh start, or one of the steps this node
    offered."""
    doc = ctx.recv_json(coordinator, keys.control(keys.Control.RESUME_AGREED))
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


def _cross_check(ctx: RoleContext, reports: dict[str, _Report], mine: list[int]) -> list[str]:
    """Each node against what the others saw it land: one holding less lost its newer checkpoints."""
    seen = ctx.store.peers_seen() if ctx.store else {}
    newest = max(mine, default=None)
    out = []
    for peer, r in reports.items():
        held = max(r.steps, default=None)
        if peer in seen and (held is None or held < seen[peer]):
            out.append(f"{peer} holds checkpoints up to {_upto(held)}, but {ctx.node} saw it land "
                       f"step {seen[peer]}")
        if r.seen is not None and (newest is None or newest < r.seen):
            out.append(f"{ctx.node} holds checkpoints up to {_upto(newest)}, but {peer} saw it land "
                       f"step {r.seen}")
    return out


def _on_rollback(ctx: RoleContext, problems: list[str], members: list[str]) -> None:
    """Refuse the resume on every node, or (allowed) go on with a warning."""
    text = _rollback_text(problems)
    if ctx.allow_rollback:
        log.warning("%s; continuing from the newest step every node holds (rollback allowed)", text)
        ctx.progress.emit("phase", name="rollback", detail=text)
        return
    for peer in members:  # they wait for the answer: tell them why there is none
        try:
            ctx.send_json(peer, keys.control(keys.Control.RESUME_AGREED), {"refused": text})
        except (TransportError, RoleError):
            pass
    raise RollbackDetected(text + _REFUSING)


def poll_landed(ctx: RoleContext, upto: int) -> None:
    """Note the peers' notices that they landed this node's recent checkpoint steps (or ``upto``), without
    waiting: they arrive before the peers' messages of the step before the next checkpoint (the
    checkpoint gate), so the records trail the peers by at most one checkpoint."""
    if ctx.store is None:
        return
    for peer in ctx.resume_peers:
        for step in [*ctx.landed_steps, upto]:
            if ctx.store.peers_seen().get(peer, -1) < step and _take_landed(ctx, peer, step, 0) == "ok":
                ctx.store.note_peer(peer, step)


def announce_landed(ctx: RoleContext, step: int) -> None:
    """Tell the resume peers this node landed ``step`` (best effort: a lost notice only weakens their
    rollback check, so a closed or broken link is not an error here)."""
    for peer in ctx.resume_peers:
        try:
            ctx.send_json(peer, keys.landed(step), {"landed": step, "line": ctx.line})
        except (TransportError, RoleError) as e:
            log.debug("landed notice of step %d to %s not sent: %s", step, peer, e)


def collect_landed(ctx: RoleContext, timeout_s: float = 5.0) -> None:
    """At the end of training: wait (bounded) for each peer's notice of the last checkpoint, so the
    records cover the final checkpoints too, and seal them."""
    if ctx.store is None or not ctx.landed_steps:
        return
    last = ctx.landed_steps[-1]
    ctx.poll_landed(last)
    deadline = time.monotonic() + timeout_s
    for peer in ctx.resume_peers:
        while ctx.store.peers_seen().get(peer, -1) < last and time.monotonic() < deadline:
            got = _take_landed(ctx, peer, last, 0.25)
            if got == "ok":
                ctx.store.note_peer(peer, last)
            elif got == "gone":
                break
    ctx.store.flush()


def wait_landed(ctx: RoleContext, step: int) -> None:
    """Block until every resume peer said it landed checkpoint ``step``. For a node that receives nothing
    per step (it only sends a raw field), the checkpoint gate of :class:`CheckpointWriter` does not hold
    by itself: without this it could land checkpoints c' and c'' while a slower peer has yet to land c,
    and a crash then would leave no step every node holds."""
    if ctx.store is None:
        return
    for peer in ctx.resume_peers:
        if ctx.store.peers_seen().get(peer, -1) >= step:
            continue

        def take(t: float, peer: str = peer) -> None:
            got = _take_landed(ctx, peer, step, t)
            if got == "none":
                raise TimeoutError
            if got == "gone":
                raise RoleError(f"{ctx.node}: {peer} closed the link before it landed checkpoint {step}")

        ctx.wait(take, peer)
        ctx.store.note_peer(peer, step)


def _take_landed(ctx: RoleContext, peer: str, step: int, timeout: float) -> Literal["ok", "none", "gone"]:
    try:
        data = ctx.links[peer].recv_blob(ctx.control_flow(peer, ctx.node), keys.landed(step), timeout)
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
            and doc.get("line") == ctx.line:
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
    if type(value) is not int or not 0 <= value < keys.STEP_LIMIT:
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
