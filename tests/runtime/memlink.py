"""An in-memory stand-in for ``fldsl.runtime.transport.PeerLink`` (same mailbox semantics, no network), and a
helper that runs several roles of one build in threads of this process."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import numpy as np

from fldsl.artifacts import Plan, Policy, load_model, node_dir
from fldsl.runtime.checkpoint import CheckpointStore
from fldsl.runtime.progress import Progress
from fldsl.runtime.roles import role_main
from fldsl.runtime.roles.common import RoleContext, artifacts_digest

KEY = bytes(range(32))


class _Box:
    def __init__(self) -> None:
        self.items: dict[tuple[str, int, str], Any] = {}
        self.cv = threading.Condition()


class MemLink:
    def __init__(self, me: str, peer: str, boxes: dict[tuple[str, str], _Box], policy: Policy,
                 trace: list[tuple[str, str, str, int]] | None = None) -> None:
        self.me, self.peer = me, peer
        # Shared by every link of a run when given: (node, "send" | "recv", flow, step) in the order the
        # messages were put or taken (list.append is atomic), so tests can check a protocol's schedule.
        self.trace = trace
        self._in = boxes.setdefault((peer, me), _Box())
        self._out = boxes.setdefault((me, peer), _Box())
        self._flows = {f.id: f for f in policy.flows}
        self.sent: dict[str, int] = {}

    def _put(self, flow: str, step: int, kind: str, value: Any, nbytes: int) -> None:
        f = self._flows.get(flow)
        # The real transport refuses undeclared flows on both ends; so does the double (send side).
        assert f is not None and f.src == self.me and f.dst == self.peer, f"undeclared flow {flow}"
        assert nbytes <= f.max_bytes, f"{flow}: {nbytes} > {f.max_bytes}"
        self.sent[flow] = self.sent.get(flow, 0) + nbytes
        with self._out.cv:
            if self.trace is not None:
                self.trace.append((self.me, "send", flow, step))
            self._out.items[(flow, step, kind)] = value
            self._out.cv.notify_all()

    def _take(self, flow: str, step: int, kind: str, timeout: float | None) -> Any:
        key = (flow, step, kind)
        with self._in.cv:
            if not self._in.cv.wait_for(lambda: key in self._in.items, timeout):
                raise TimeoutError(f"{flow}@{step}")
            if self.trace is not None:
                self.trace.append((self.me, "recv", flow, step))
            return self._in.items.pop(key)

    def send(self, flow_id: str, step: int, array: np.ndarray) -> None:
        a = np.array(array, copy=True)
        self._put(flow_id, step, "t", a, a.nbytes)

    def send_arrays(self, flow_id: str, step: int, arrays: list[np.ndarray]) -> None:
        arrs = [np.array(a, copy=True) for a in arrays]
        self._put(flow_id, step, "a", arrs, sum(a.nbytes for a in arrs))

    def send_blob(self, flow_id: str, step: int, data: bytes) -> None:
        self._put(flow_id, step, "b", bytes(data), len(data))

    def recv(self, flow_id: str, step: int, timeout: float | None = None) -> np.ndarray:
        return self._take(flow_id, step, "t", timeout)

    def recv_arrays(self, flow_id: str, step: int, timeout: float | None = None) -> list[np.ndarray]:
        return self._take(flow_id, step, "a", timeout)

    def recv_blob(self, flow_id: str, step: int, timeout: float | None = None) -> bytes:
        return self._take(flow_id, step, "b", timeout)


def store_of(build: Path, run_dir: Path, node: str) -> CheckpointStore:
    """The checkpoint store a role of ``run_in_threads`` used, bound as the role bound it."""
    d = node_dir(build, node)
    digest = artifacts_digest(load_model(Plan, d / "plan.json"), load_model(Policy, d / "policy.json"))
    return CheckpointStore(run_dir / "checkpoints" / node, node_id=node, key=KEY, pipeline_digest=digest)


def run_in_threads(build: Path, run_dir: Path, *, stop_after: dict[str, int] | None = None,
                   timeout: float = 240.0, trace: list[tuple[str, str, str, int]] | None = None,
                   allow_rollback: bool = False) -> dict[str, Any]:
    """Run every node of ``build`` as a thread; returns {node: result or exception}. ``trace``: a list
    every link appends its sends and receives to (see ``MemLink``).

    ``allow_rollback``: every node's ``RoleContext.allow_rollback`` (``fldsl run --allow-rollback``).

    ``stop_after`` = {node: step}: every node is asked to stop (``Interrupted`` at its next check) once that
    node has begun step ``step`` (``ctx.last_step >= step``). Deterministic: checkpoints are written in the
    background, so the event that one landed can come steps later; this reads the step counter instead, and a
    role's pending checkpoint write lands before the role returns."""
    ids = sorted(p.name for p in (build / "nodes").iterdir())
    plans = {i: load_model(Plan, node_dir(build, i) / "plan.json") for i in ids}
    policies = {i: load_model(Policy, node_dir(build, i) / "policy.json") for i in ids}
    boxes: dict[tuple[str, str], _Box] = {}
    results: dict[str, Any] = {}
    all_stop = threading.Event()
    contexts: dict[str, RoleContext] = {}

    class _Stop(threading.Event):
        """Set explicitly, or once the watched node of ``stop_after`` has begun its step."""

        def is_set(self) -> bool:
            if super().is_set():
                return True
            for node, step in (stop_after or {}).items():
                ctx = contexts.get(node)
                if ctx is not None and ctx.last_step >= step:
                    all_stop.set()
                    return True
            return False

    stops = {i: _Stop() for i in ids}

    def target(i: str) -> None:
        plan, policy = plans[i], policies[i]
        links = {p.id: MemLink(i, p.id, boxes, policy, trace) for p in plan.peers}
        ctx = RoleContext(plan=plan, policy=policy, links=links, progress=Progress(i, io.StringIO()),
                          store=CheckpointStore(run_dir / "checkpoints" / i, node_id=i, key=KEY),
                          run_dir=run_dir, seal_key=KEY, stop=stops[i], recv_timeout_s=60,
                          allow_rollback=allow_rollback)
        contexts[i] = ctx
        try:
            results[i] = role_main(plan)(ctx)
            results[i]["_links"] = links
        except BaseException as e:
            results[i] = e
            if not all_stop.is_set():  # a real failure: unblock the others
                for ev in stops.values():
                    ev.set()

    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return results
