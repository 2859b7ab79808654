"""A node process whose role is replaced (not a test module): a red team's peer, or an honest node run with a
switch ``fldsl run`` does not pass yet.

    python rogue_node.py MODE <arguments of python -m fldsl.runtime.node>

The process is a real node: it loads the build, attests with the deployment's trust material and the same
measured plan, policy and code as the node it stands for (this file is not part of the measured package), and
talks over the attested, policed links. Only the role differs:

* ``flood``: (passive) sends valid PSI-sized blobs at keys far beyond any step the peer will read;
* ``bomb``: (active) agrees and aligns honestly, then sends a 1 GiB deflate bomb as the alignment bundle;
* ``null-resume``: (active) answers the resume agreement with ``step: null``;
* ``streams``: (the dialer) once its link is up, opens ``STREAMS`` more Exchange calls at once to its peer's
  mutual-TLS port with its own attested key and certificate, then reports on stderr how they ended;
* ``allow-rollback``: the honest role with ``RoleContext.allow_rollback`` set
  (what ``fldsl run --allow-rollback`` will pass).
"""

from __future__ import annotations

import asyncio
import io
import sys
import time
import zipfile
from collections.abc import Callable
from typing import Any

FLOOD_MESSAGES = 3000  # 1 MiB each: 3 GiB if nobody stops it
BOMB_BYTES = 1 << 30
STREAMS = 2000

_transport: Any = None  # the node's Transport (streams mode), captured as run_node creates it
_peer_certs: dict[str, bytes] = {}  # peer id -> the certificate verified at Hello (streams mode)


def _peer(ctx: Any) -> str:
    return ctx.plan.peers[0].id


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


def flood(ctx: Any) -> dict[str, Any]:
    from fldsl.runtime.roles.common import PSI_BASE
    from fldsl.runtime.transport import TransportError

    peer = _peer(ctx)
    flow = ctx.flow(ctx.node, peer, ("psi",)).id
    blob = bytes(1 << 20)
    sent = 0
    try:
        for i in range(FLOOD_MESSAGES):
            ctx.links[peer].send_blob(flow, PSI_BASE + 10**9 + i, blob)
            sent += 1
    except TransportError as e:
        print(f"ROGUE stopped after {sent} messages: {e}", file=sys.stderr, flush=True)
    _linger(ctx, peer)
    return {"metrics": {}, "steps": 0}


def _deflate_bomb(nbytes: int) -> bytes:
    """An .npz whose "train" member is ``nbytes`` of int64 zeros, deflated to about a thousandth."""
    import numpy as np

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("train.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False,
                                                     "shape": (nbytes // 8,)})
            zero = bytes(1 << 20)
            for _ in range(nbytes // len(zero)):
                f.write(zero)
        with zf.open("holdout.npy", "w") as f:
            np.lib.format.write_array(f, np.zeros(1, np.int64))
    return buf.getvalue()


def bomb(ctx: Any) -> dict[str, Any]:
    from fldsl.runtime.roles.common import load_tables, send_chunked
    from fldsl.runtime.roles.vertical import _align_peer
    from fldsl.runtime.transport import keys

    peer = _peer(ctx)
    payload = _deflate_bomb(BOMB_BYTES)
    print(f"ROGUE bomb: {len(payload):,} bytes expanding to {BOMB_BYTES:,}", file=sys.stderr, flush=True)
    ctx.agree_resume(ctx.node, [peer])
    table = next(iter(load_tables(ctx.plan).values()))
    _align_peer(ctx, peer, [str(i) for i in table.ids.tolist()], leader=True)
    send_chunked(ctx, peer, ctx.holdout_flow(ctx.node, peer), keys.control(keys.Control.ALIGN), payload)
    _linger(ctx, peer)
    return {"metrics": {}, "steps": 0}


def null_resume(ctx: Any) -> dict[str, Any]:
    from fldsl.runtime.transport import keys

    peer = _peer(ctx)
    ctx.recv_json(peer, keys.control(keys.Control.RESUME))
    ctx.send_json(peer, keys.control(keys.Control.RESUME_AGREED), {"step": None})
    _linger(ctx, peer)
    return {"metrics": {}, "steps": 0}


async def _open_streams(target: str, peer: str, cert: bytes, ident: Any, n: int) -> dict[str, int]:
    """Open ``n`` Exchange calls at once over one mutual-TLS channel; how each ended, counted by outcome."""
    import grpc

    from fldsl.runtime.transport import codec
    from fldsl.runtime.transport import fldsl_pb2 as pb
    from fldsl.runtime.transport.server import EXCHANGE_METHOD

    creds = grpc.ssl_channel_credentials(root_certificates=cert, private_key=ident.key_pem,
                                         certificate_chain=ident.cert_pem)
    options = [("grpc.ssl_target_name_override", peer), ("grpc.use_local_subchannel_pool", 1)]
    outcomes: dict[str, int] = {}
    async with grpc.aio.secure_channel(target, creds, options=options) as channel:
        method = channel.stream_stream(EXCHANGE_METHOD)

        async def one() -> str:
            call = method()
            try:
                data = await asyncio.wait_for(call.read(), 20.0)
                if data is grpc.aio.EOF:
                    return "ended"
                header, _ = codec.decode_frame(data)
                ready = header.WhichOneof("kind") == "control" and header.control.kind == pb.Control.READY
                return "READY" if ready else "other frame"
            except grpc.aio.AioRpcError as e:
                return f"{e.code().name}: {e.details()}"
            except TimeoutError:
                return "no answer in 20 s"
            finally:
                call.cancel()

        for outcome in await asyncio.gather(*(one() for _ in range(n))):
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes


def streams(ctx: Any) -> dict[str, Any]:
    peer = _peer(ctx)
    target = _transport._addresses[peer].secure_target()
    outcomes = asyncio.run(_open_streams(target, peer, _peer_certs[peer], _transport._identity, STREAMS))
    for outcome, count in sorted(outcomes.items(), key=lambda kv: -kv[1]):
        print(f"ROGUE streams: {count} x {outcome}", file=sys.stderr, flush=True)
    _linger(ctx, peer)
    return {"metrics": {}, "steps": 0}


def _capture_transport() -> None:
    """Keep the node's Transport and each peer certificate it verified at Hello (for ``streams``)."""
    from fldsl.runtime import transport

    class Captured(transport.Transport):
        def __init__(self, *args: Any, **kw: Any) -> None:
            global _transport
            super().__init__(*args, **kw)
            _transport = self

        def _hello(self, link: Any, addr: Any) -> bytes:
            cert = super()._hello(link, addr)
            _peer_certs[link.peer_id] = cert
            return cert

    transport.Transport = Captured  # type: ignore[misc]  # node.run_node imports it when it starts


def allow_rollback(ctx: Any) -> dict[str, Any]:
    ctx.allow_rollback = True
    return _honest(ctx.plan)(ctx)


MODES: dict[str, Callable[[Any], dict[str, Any]]] = {
    "flood": flood, "bomb": bomb, "null-resume": null_resume, "allow-rollback": allow_rollback,
    "streams": streams}
_honest: Callable[[Any], Callable[[Any], dict[str, Any]]]


def main() -> int:
    global _honest
    mode, argv = sys.argv[1], sys.argv[2:]
    from fldsl.runtime import node, roles

    _honest = roles.role_main
    if mode == "streams":
        _capture_transport()
    roles.role_main = lambda plan: MODES[mode]  # node.run_node imports it when the links are up
    return node.main(argv)


if __name__ == "__main__":
    from fldsl.runtime.node import _exit

    _exit(main())  # as the node does: flush, exit, and force it if gRPC threads linger
