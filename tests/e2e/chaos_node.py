"""A hostile peer for the property test (not a test module): a real, attested node running the honest role,
whose outgoing messages are perturbed as a script says.

    python chaos_node.py SCRIPT <arguments of python -m fldsl.runtime.node>

Like ``rogue_node.py``, the process loads the build, attests with the deployment's trust material and the
same measured plan, policy and code as the node it stands for (this file is not part of the measured
package) and talks over the attested, policed links. ``SCRIPT`` is a JSON file written by
``test_hostile_peer.py``::

    {"seed": int, "events": {"<n>": [action, arg], ...}}

applies ``action`` (``ACTIONS``) to the n-th message the role's thread sends (n = 0, 1, ...) or, for n = -1,
-2, ..., to the checkpoint writer's landed notices (see ``ChaosLink``). What was done is appended to
``SCRIPT.applied``, one JSON object a line, ending with ``{"end": ..., "sent": ...}``. Whatever happens to
it, this node ends with exit 0 once its peer is gone, so the launcher never interrupts the honest node
before that node gives its own verdict.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# Perturbations that leave the protocol intact (copies at keys the peer never reads or reads once, messages
# in another order): the peer must train exactly as with an honest node.
BENIGN = ("defer", "dup", "replay", "past", "future", "burst")
# Sent on the same flow and key just before the genuine message: the peer must refuse them, or (where its
# role reads that key leniently, e.g. a landed notice) go on unharmed.
HOSTILE = ("garbage", "truncate", "dtype", "shape", "oversize", "badflow", "junkframe", "chunks", "header",
           "lie")
# "flood": ARG blobs of the psi flow's full size at keys nobody reads (refused once over the receive budget);
# "stop": end the role before this message (the node closes its links cleanly).
ACTIONS = (*BENIGN, *HOSTILE, "flood", "stop")
FAR = 10**9  # a key offset no role reads (steps, control, evaluation and PSI keys alike)


@dataclass(frozen=True)
class _Msg:
    kind: str  # "tensor", "blob" or "arrays"
    flow: str
    step: int
    value: Any  # np.ndarray, bytes or a list of arrays


class _Stop(Exception):
    pass


class ChaosLink:
    """A ``PeerLink`` seen through a hostile peer: every message the honest role sends is numbered and may
    be perturbed; receives go to the real link (after what was held back). Perturbed copies bypass this
    node's own flow guard (``PeerLink._send``): the peer's guard and role are what is tested.

    * ``defer``: the message goes after the next one (or before the role's next receive);
    * ``dup``: sent twice; ``replay``: sent again ARG messages later; ``past``: a copy at the key before
      (its own message is already there or read); ``future`` / ``burst``: 1 / ARG copies at keys no role
      reads;
    * ``garbage`` (random content), ``truncate`` (half the rows or bytes), ``dtype`` (another dtype; a blob
      as a tensor), ``shape`` (one more column; a blob as a list of arrays), ``oversize`` (past the flow's
      limit), ``badflow`` (an undeclared flow, or one declared the other way), ``junkframe`` (bytes that
      are not a frame), ``chunks`` (a chunk missing), ``header`` (1 TiB announced), ``lie`` (a header
      counting more bytes than it carries): sent on the message's flow and key before the message itself;
    * ``flood``: ARG psi-flow-sized blobs at keys no role reads; ``stop``: end the role here.
    """

    def __init__(self, ctx: Any, link: Any, events: dict[int, tuple[str, int]], seed: int,
                 log: Callable[[dict[str, Any]], None]) -> None:
        self._ctx, self._link, self._events, self._seed, self._log = ctx, link, events, seed, log
        self._role_thread = threading.current_thread()
        self._lock = threading.RLock()
        self.sent = 0  # messages of the role's thread
        self.sent_aside = 0  # of other threads (the checkpoint writer's landed notices)
        self._deferred: list[_Msg] = []
        self._later: list[list[Any]] = []  # [messages still to go, message]: replays

    def __getattr__(self, name: str) -> Any:  # generation, on_reconnect, peer_id, ...
        return getattr(self._link, name)

    # the role's sends
    def send(self, flow_id: str, step: int, array: Any) -> None:
        import numpy as np

        self._out(_Msg("tensor", flow_id, step, np.array(array, copy=True)))

    def send_arrays(self, flow_id: str, step: int, arrays: list[Any]) -> None:
        import numpy as np

        self._out(_Msg("arrays", flow_id, step, [np.array(a, copy=True) for a in arrays]))

    def send_blob(self, flow_id: str, step: int, data: bytes) -> None:
        self._out(_Msg("blob", flow_id, step, bytes(data)))

    # the role's receives: what was held back goes first (the role may be waiting for its answer)
    def recv(self, *a: Any, **kw: Any) -> Any:
        self.flush()
        return self._link.recv(*a, **kw)

    def recv_blob(self, *a: Any, **kw: Any) -> Any:
        self.flush()
        return self._link.recv_blob(*a, **kw)

    def recv_arrays(self, *a: Any, **kw: Any) -> Any:
        self.flush()
        return self._link.recv_arrays(*a, **kw)

    def flush(self) -> None:
        with self._lock:
            deferred, self._deferred = self._deferred, []
            for m in deferred:
                self._genuine(m)

    def finish(self) -> None:
        """At the end of the role: what is still held back or due for a replay goes now."""
        with self._lock:
            self.flush()
            for _, m in self._later:
                self._raw(m)
            self._later = []

    # sending
    def _genuine(self, m: _Msg) -> None:
        if m.kind == "tensor":
            self._link.send(m.flow, m.step, m.value)
        elif m.kind == "arrays":
            self._link.send_arrays(m.flow, m.step, m.value)
        else:
            self._link.send_blob(m.flow, m.step, m.value)

    def _raw(self, m: _Msg) -> None:
        from fldsl.runtime.transport import codec

        link, v = self._link, m.value
        if m.kind == "tensor":
            arr = codec.as_wire_array(v)
            link._send(m.flow, arr.nbytes, lambda: codec.tensor_frames(m.flow, m.step, arr, link._chunk))
        elif m.kind == "arrays":
            packed = codec.pack_arrays([codec.as_wire_array(a) for a in v])
            link._send(m.flow, packed.total, lambda: codec.arrays_frames(m.flow, m.step, packed, link._chunk))
        else:
            link._send(m.flow, len(v), lambda: codec.blob_frames(m.flow, m.step, v, link._chunk))

    def _frames(self, frames: list[bytes]) -> None:
        self._link._send("chaos", 0, lambda: frames, count=False)

    def _out(self, m: _Msg) -> None:
        with self._lock:
            self._perturb(m)

    def _perturb(self, m: _Msg) -> None:
        # Numbered per thread, so the numbers do not depend on how the threads interleave.
        if threading.current_thread() is self._role_thread:
            n = self.sent
            self.sent += 1
        else:
            self.sent_aside += 1
            n = -self.sent_aside
        for entry in self._later:
            entry[0] -= 1
        for entry in [e for e in self._later if e[0] <= 0]:
            self._later.remove(entry)
            self._raw(entry[1])
        action, arg = self._events.get(n, ("send", 0))
        if action != "send":
            self._log({"n": n, "action": action, "arg": arg, "kind": m.kind, "flow": m.flow, "step": m.step})
        if action == "stop":
            raise _Stop(n)
        if action in HOSTILE:
            self._hostile(action, arg, m, random.Random(self._seed * 1000 + n))
        elif action == "future":
            self._raw(replace(m, step=m.step + FAR + arg))
        elif action == "burst":
            for j in range(arg):
                self._raw(replace(m, step=m.step + FAR + j))
        elif action == "flood":
            from fldsl.runtime.roles.common import PSI_BASE

            psi = self._ctx.flow(self._ctx.node, self._link.peer_id, ("psi",))
            for j in range(arg):
                self._raw(_Msg("blob", psi.id, PSI_BASE + FAR + j, bytes(psi.max_bytes)))
        if action == "defer":
            self._deferred.append(m)
            return
        self._genuine(m)
        self.flush()
        if action == "dup":
            self._raw(m)
        elif action == "past" and m.step > 0:
            self._raw(replace(m, step=m.step - 1))
        elif action == "replay":
            self._later.append([arg, m])

    def _hostile(self, action: str, arg: int, m: _Msg, rng: random.Random) -> None:
        import numpy as np

        from fldsl.runtime.transport import codec
        from fldsl.runtime.transport import fldsl_pb2 as pb

        ctx, peer = self._ctx, self._link.peer_id
        flow = next(f for f in ctx.policy.flows if f.id == m.flow)
        if m.kind == "arrays":  # (not sent by the vertical roles) perturb its first array
            m = replace(m, kind="tensor", value=m.value[0])
        tensor = m.kind == "tensor"
        v = m.value
        if action == "garbage":
            raw = rng.randbytes(v.nbytes if tensor else max(1, len(v)))
            value = np.frombuffer(raw, v.dtype).reshape(v.shape).copy() if tensor else raw
            self._raw(replace(m, value=value))
        elif action == "truncate":
            self._raw(replace(m, value=v[: len(v) // 2]))
        elif action == "dtype":
            if tensor:
                self._raw(replace(m, value=v.astype(np.int32 if v.dtype == np.float64 else np.float64)))
            else:
                self._raw(replace(m, kind="tensor", value=np.frombuffer(v, np.uint8).copy()))
        elif action == "shape":
            self._raw(replace(m, value=np.concatenate([v, v[..., :1]], axis=-1)) if tensor
                      else replace(m, kind="arrays", value=[np.frombuffer(v, np.uint8).copy()]))
        elif action == "oversize":
            if tensor:
                row = max(1, v[0].nbytes if v.ndim and len(v) else v.itemsize)
                self._raw(replace(m, value=np.zeros((flow.max_bytes // row + 1, *v.shape[1:]), v.dtype)))
            else:
                self._raw(replace(m, value=bytes(flow.max_bytes + 1)))
        elif action == "badflow":
            other = f"{ctx.node}->{peer}:chaos" if arg % 2 else \
                next(f.id for f in ctx.policy.flows if f.src == peer and f.dst == ctx.node)
            self._raw(replace(m, flow=other))
        elif action == "junkframe":
            self._frames([b"\xff\xff" + rng.randbytes(arg * 7)])
        elif action == "chunks":
            heads = [pb.Frame(blob=pb.BlobHeader(flow=m.flow, step=m.step, chunk=i, chunks=3, total_bytes=30,
                                                 offset=10 * i)) for i in (0, 2)]
            self._frames([codec.encode_frame(h, [bytes(10)]) for h in heads])
        elif action == "header":
            h = pb.Frame(blob=pb.BlobHeader(flow=m.flow, step=m.step, chunk=0, chunks=1 << 20,
                                            total_bytes=1 << 40, offset=0))
            self._frames([codec.encode_frame(h, [bytes(16)])])
        elif action == "lie":
            data = (v.tobytes() if tensor else v) or b"x"
            h = pb.Frame(blob=pb.BlobHeader(flow=m.flow, step=m.step, chunk=0, chunks=1,
                                            total_bytes=len(data) + arg, offset=0))
            self._frames([codec.encode_frame(h, [data])])


def _linger(ctx: Any, peer: str, seconds: float = 60.0) -> None:
    """Keep the link up until the peer gives up on it (or ``seconds`` pass)."""
    from fldsl.runtime.transport import TransportError

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            ctx.links[peer].recv_blob(ctx.control_flow(peer, ctx.node), 1 << 62, 1.0)
        except TimeoutError:
            continue
        except TransportError:
            return


def main() -> int:
    script, argv = Path(sys.argv[1]), sys.argv[2:]
    from fldsl.runtime import node, roles

    honest = roles.role_main
    doc = json.loads(script.read_text())
    events = {int(k): (str(a), int(n)) for k, (a, n) in doc["events"].items()}
    applied = script.with_name(script.name + ".applied")

    def log(entry: dict[str, Any]) -> None:
        with applied.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        print(f"CHAOS {entry}", file=sys.stderr, flush=True)

    def chaos(ctx: Any) -> dict[str, Any]:
        peer = ctx.plan.peers[0].id
        link = ChaosLink(ctx, ctx.links[peer], events, int(doc["seed"]), log)
        ctx.links[peer] = link
        result: dict[str, Any] = {"metrics": {}, "steps": 0}
        try:
            result = honest(ctx.plan)(ctx)
            link.finish()
            end = "finished"
        except _Stop:
            end = "stopped"
        except Exception as e:  # refused by the peer, or the peer gone: wait for it to end, then exit 0
            end = f"{type(e).__name__}: {e}"
            ctx.links[peer] = link._link
            _linger(ctx, peer)
        log({"end": end, "sent": link.sent, "sent_aside": link.sent_aside})
        return result

    roles.role_main = lambda plan: chaos  # node.run_node imports it when the links are up
    return node.main(argv)


if __name__ == "__main__":
    from fldsl.runtime.node import _exit

    _exit(main())  # as the node does: flush, exit, and force it if gRPC threads linger
