"""Run-time policing of flows (ARCHITECTURE.md, "Transport": every message is checked against the declared
flows).

Every tensor or blob a node receives must match a flow of its ``policy.json``: the flow exists, goes from
the authenticated peer to this node, has the declared dtype and shape (``None`` = batch dimension, any
size) and fits the flow's per-message byte budget. The sender runs the same checks on its own sends so a
bug fails fast, on the right machine, with the same message.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from fldsl.artifacts import Flow, Policy, TensorSpec

from .errors import FlowRefused

log = logging.getLogger("fldsl.transport.guard")

Kind = Literal["tensor", "arrays", "blob"]
# Flow specs with these dtypes describe opaque bytes; they can only travel as blobs.
_OPAQUE = ("bytes", "string")


@dataclass(frozen=True)
class WireSpec:
    dtype: str
    shape: tuple[int, ...]


def _fmt_wire(w: WireSpec) -> str:
    return f"{w.dtype}[{', '.join(str(d) for d in w.shape)}]"


def _matches(spec: TensorSpec, w: WireSpec) -> bool:
    if spec.dtype != w.dtype or len(spec.shape) != len(w.shape):
        return False
    return all(d is None or d == got for d, got in zip(spec.shape, w.shape, strict=True))


class FlowGuard:
    """Checks messages of node ``me`` against ``policy.flows``."""

    def __init__(self, policy: Policy, me: str) -> None:
        if policy.node != me:
            raise ValueError(f"policy.json is for {policy.node}, not {me}")
        self.me = me
        self.flows: dict[str, Flow] = {f.id: f for f in policy.flows}

    def check_send(self, peer: str, flow_id: str, kind: Kind, specs: Sequence[WireSpec], nbytes: int) -> Flow:
        return self._check("send", peer, flow_id, kind, specs, nbytes)

    def check_recv(self, peer: str, flow_id: str, kind: Kind, specs: Sequence[WireSpec], nbytes: int) -> Flow:
        return self._check("recv", peer, flow_id, kind, specs, nbytes)

    def _check(
        self, direction: Literal["send", "recv"], peer: str, flow_id: str, kind: Kind,
        specs: Sequence[WireSpec], nbytes: int,
    ) -> Flow:
        src, dst = (self.me, peer) if direction == "send" else (peer, self.me)

        def refuse(why: str) -> FlowRefused:
            return FlowRefused(why, flow=flow_id, peer=peer)

        flow = self.flows.get(flow_id)
        if flow is None:
            declared = sorted(f.id for f in self.flows.values() if f.src == src and f.dst == dst)
            hint = f"declared {src} -> {dst} flows: {', '.join(declared)}" if declared else (
                f"the policy declares no flow {src} -> {dst}")
            raise refuse(
                f"flow {flow_id!r} ({src} -> {dst}) is not declared in the policy of {self.me}; {hint}")
        if flow.src != src or flow.dst != dst:
            raise refuse(
                f"flow {flow_id!r} is declared {flow.src} -> {flow.dst} (rule {flow.rule!r}), "
                f"but this message goes {src} -> {dst}")
        if nbytes > flow.max_bytes:
            raise refuse(
                f"flow {flow_id!r} allows at most {flow.max_bytes} bytes per message, this one has {nbytes}")
        spec = flow.spec
        if kind == "blob":
            if spec is not None and spec.dtype not in _OPAQUE:
                raise refuse(f"flow {flow_id!r} carries tensors {spec.text()}, not opaque bytes")
            return flow
        if spec is not None:
            if spec.dtype in _OPAQUE:
                raise refuse(f"flow {flow_id!r} carries opaque bytes, not tensors")
            for i, w in enumerate(specs):
                if not _matches(spec, w):
                    which = f"array {i} " if kind == "arrays" else ""
                    raise refuse(
                        f"flow {flow_id!r} expects {spec.text()}, {which}got {_fmt_wire(w)}")
        return flow
