"""The horizontal roles' wire format: what a sync upload and a FedAvg piece look like, and how a round's
weights are cut into pieces. Both sides derive everything here from the model's shapes (no negotiation).

Sync upload: ``[*parts, layout, count]`` where ``layout[i]`` = 1 when variable i travels sparse as
(indices, rows) (:class:`SparseRows`), else its dense gradient. FedAvg: a round's weights travel as the
pieces of :func:`piece_layout`, piece p under ``keys.piece(round, p)``, each ``[*segments, count]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from fldsl.runtime.roles.common import RoleError
from fldsl.runtime.transport import keys

# FedAvg pieces: at most PIECE_BYTES each (a few transport chunks: small enough to overlap the directions,
# large enough that per-message costs stay negligible). Piece p of round r travels under keys.piece(r, p),
# apart from the plain step keys of other flows.
PIECE_BYTES = 8 << 20
MAX_PIECES = keys.LAYOUT[keys.Namespace.PIECE].index_limit


class Seg(NamedTuple):
    """Rows ``rows[0]:rows[1]`` (axis 0) of variable ``var``, or the whole variable when ``rows`` is None."""

    var: int
    rows: tuple[int, int] | None


def piece_layout(shapes: Sequence[tuple[int, ...]], itemsizes: Sequence[int],
                 limit: int | None = None) -> list[list[Seg]]:
    """The pieces a FedAvg round's weights travel in, in order; both sides derive it from the model's
    shapes, so it needs no negotiation. Always at least one piece (it carries the example count)."""
    limit = PIECE_BYTES if limit is None else limit
    pieces: list[list[Seg]] = []
    cur: list[Seg] = []
    cur_bytes = 0
    for i, (shape, size) in enumerate(zip(shapes, itemsizes, strict=True)):
        nbytes = math.prod(shape) * size
        if nbytes <= limit or not shape or shape[0] < 2:
            if cur and cur_bytes + nbytes > limit:
                pieces.append(cur)
                cur, cur_bytes = [], 0
            cur.append(Seg(i, None))
            cur_bytes += nbytes
            continue
        if cur:
            pieces.append(cur)
            cur, cur_bytes = [], 0
        per = max(1, limit // (nbytes // shape[0]))
        pieces += [[Seg(i, (lo, min(lo + per, shape[0])))] for lo in range(0, shape[0], per)]
    if cur or not pieces:
        pieces.append(cur)
    if len(pieces) > MAX_PIECES:
        raise RoleError(f"the model needs {len(pieces)} pieces of {limit} bytes; at most {MAX_PIECES}")
    return pieces


def seg_shape(shapes: Sequence[tuple[int, ...]], s: Seg) -> tuple[int, ...]:
    shape = shapes[s.var]
    return shape if s.rows is None else (s.rows[1] - s.rows[0], *shape[1:])


def seg_view(arrays: Sequence[np.ndarray] | Mapping[int, np.ndarray], s: Seg) -> np.ndarray:
    a = arrays[s.var]
    return a if s.rows is None else a[s.rows[0]:s.rows[1]]


def piece_keys(n: int) -> Callable[[int], list[int]]:
    """ctx.step_keys for FedAvg: round k's piece keys (stale ones are dropped after a peer restarts)."""
    return lambda k: [k, *(keys.piece(k, p) for p in range(n))]


class SparseRows(NamedTuple):
    """A sparse gradient of a ``shape`` variable: ``rows[j]`` is row ``indices[j]``, every other row zero."""

    indices: np.ndarray
    rows: np.ndarray
    shape: tuple[int, ...]


Part = np.ndarray | SparseRows


def parse_upload(arrays: list[np.ndarray], shapes: list[tuple[int, ...]], names: list[str], who: str,
                  r: int) -> tuple[list[Part], int]:
    """A sync worker's upload ``[*parts, layout, count]`` (module docstring) -> (one part per variable,
    example count); checks it against the model's shapes."""
    nvar = len(shapes)

    def bad(why: str) -> RoleError:
        return RoleError(f"{who} sent a malformed upload at round {r}: {why}")

    if len(arrays) < nvar + 2:
        raise bad(f"{len(arrays)} arrays for {nvar} variables")
    count = int(np.asarray(arrays[-1]).reshape(-1)[0]) if np.asarray(arrays[-1]).size else 0
    layout = np.asarray(arrays[-2])
    body = arrays[:-2]
    if layout.shape != (nvar,) or not np.isin(layout, (0, 1)).all():
        raise bad(f"layout {layout.tolist()!r} does not describe {nvar} variables")
    if len(body) != nvar + int(layout.sum()):
        raise bad(f"{len(body)} arrays for {nvar} variables ({int(layout.sum())} sparse)")
    parts: list[Part] = []
    j = 0
    for i, shape in enumerate(shapes):
        if layout[i]:
            idx, rows = np.asarray(body[j]), body[j + 1]
            j += 2
            if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) or \
                    tuple(rows.shape) != (len(idx), *shape[1:]) or not shape:
                raise bad(f"sparse {names[i]}: indices {idx.dtype}{list(idx.shape)} and rows "
                          f"{list(rows.shape)} do not fit {list(shape)}")
            if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= shape[0]):
                raise bad(f"sparse {names[i]}: row index out of range 0..{shape[0] - 1}")
            parts.append(SparseRows(idx, rows, shape))
        else:
            a = body[j]
            j += 1
            if tuple(a.shape) != shape:
                raise bad(f"array {i} ({names[i]}) has shape {tuple(a.shape)}, the model's is {shape}")
            parts.append(a)
    return parts, count


def parse_piece(arrays: list[np.ndarray], piece: list[Seg], shapes: list[tuple[int, ...]], names: list[str],
                 who: str, r: int, p: int) -> tuple[list[np.ndarray], int]:
    """Piece ``p`` of a FedAvg message -> (its segments, the example count it carries), checked against the
    layout (uploads at the server; the server's averaged pieces at a worker)."""
    def bad(why: str) -> RoleError:
        return RoleError(f"{who} sent a malformed piece {p} at round {r}: {why}")

    if len(arrays) != len(piece) + 1:
        raise bad(f"{len(arrays)} arrays for {len(piece)} segments and the example count")
    cnt = np.asarray(arrays[-1])
    if cnt.shape != (1,) or not np.issubdtype(cnt.dtype, np.integer):
        raise bad(f"the example count is {cnt.dtype}{list(cnt.shape)}, not one integer")
    for s, a in zip(piece, arrays, strict=False):
        want = seg_shape(shapes, s)
        if tuple(a.shape) != want:
            rows = "" if s.rows is None else f" rows {s.rows[0]}:{s.rows[1]}"
            raise bad(f"{names[s.var]}{rows} has shape {tuple(a.shape)}, expected {want}")
    return arrays[:-1], int(cnt[0])


def encode_grads(grads: list[Any], variables: list[Any]) -> list[np.ndarray]:
    """``[*parts, layout]`` of a sync upload: a variable's (indices, rows) where that is smaller than its
    dense gradient (then the message also stays within the flow's size limit, which is sized for dense),
    else the dense gradient."""
    out: list[np.ndarray] = []
    layout = np.zeros(len(variables), np.int8)
    for i, (g, v) in enumerate(zip(grads, variables, strict=True)):
        if isinstance(g, tuple):
            idx, rows = g[0].numpy(), g[1].numpy()
            dense_bytes = int(np.prod(v.shape)) * rows.dtype.itemsize
            if idx.nbytes + rows.nbytes + 32 < dense_bytes:  # 32: the second array's alignment padding
                out += [idx, rows]
                layout[i] = 1
                continue
            dense = np.zeros(tuple(v.shape), rows.dtype)
            dense[idx] = rows  # unique indices: plain assignment is the sum
            out.append(dense)
        else:
            out.append(g.numpy())
    out.append(layout)
    return out
