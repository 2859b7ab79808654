"""Byte transfers between roles beyond one message: numbered blob channels (PSI), chunked transfers with a
receiver-side limit, and array bundles."""

from __future__ import annotations

import io
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from fldsl.artifacts import Flow
from fldsl.runtime.bundle import BundleError, BundleTooLarge, read_npz
from fldsl.runtime.roles.errors import PeerLimitExceeded, RoleError

if TYPE_CHECKING:
    from fldsl.runtime.roles.context import RoleContext


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
    parts: list[bytes] = []
    total = 0
    for i in range(n):
        part: bytes = ctx.wait(partial(_recv_part, link, flow.id, base + 1 + i), peer)
        total += len(part)
        if total > limit:
            raise PeerLimitExceeded(f"{peer} sent more than {limit:,} bytes of {what} (its limit): refusing",
                                    flow=flow.id, peer=peer)
        parts.append(part)
    return b"".join(parts)


def _recv_part(link: Any, flow_id: str, key: int, timeout: float) -> bytes:
    data: bytes = link.recv_blob(flow_id, key, timeout)
    return data


def pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    savez_named(buf, arrays)
    return buf.getvalue()


def savez_named(buf: io.BytesIO, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez(buf, **arrays)``: numpy's stubs read a ``**`` dict as possibly holding its keyword-only
    ``allow_pickle``, so the call goes through an untyped alias (the names are array names only)."""
    savez: Any = np.savez
    savez(buf, **arrays)


def unpack_arrays(data: bytes, who: str, *, limit: int, what: str) -> dict[str, np.ndarray]:
    """The arrays of a peer's bundle; refused before anything is expanded when the bundle, or what it would
    expand to, exceeds ``limit`` bytes (derived by the caller from the plan), or is not plain arrays."""
    try:
        return read_npz(data, limit=limit, what=f"{what} from {who}")
    except BundleTooLarge as e:
        raise PeerLimitExceeded(f"{e}: refusing it before expanding anything", peer=who) from None
    except BundleError as e:
        raise RoleError(f"malformed array bundle: {e}") from e
