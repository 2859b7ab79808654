"""The server's aggregation rules behind one interface: :class:`Aggregator` runs a round (take every worker's
upload, aggregate, send the result back) and holds the global weights between rounds.

* :class:`SyncMean` (``with sync``, a parameter server every step): the weighted mean of the workers'
  gradients, applied by the server's optimiser; the new weights go back to every worker.
* :class:`FedAvgMean` (``with fedavg``): the weighted mean of the workers' locally trained weights, folded
  and sent back piece by piece (:mod:`fldsl.runtime.roles.hwire`), so upload, averaging and download
  overlap and the server holds the average plus the pieces in flight.

Both fold with :class:`Average`: a float32 running weighted mean into one accumulator reused every round, in
the workers' fixed order (deterministic), so the server never holds float64 temporaries of every upload.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, NamedTuple

import numpy as np

from fldsl.runtime.roles.common import RoleContext, RoleError
from fldsl.runtime.roles.hwire import Part, Seg, SparseRows, parse_piece, parse_upload, piece_layout, seg_view
from fldsl.runtime.roles.optstate import training_arrays
from fldsl.runtime.transport import keys


class Average:
    """Weighted mean of the workers' uploads, folded in one upload at a time (a running mean).

    After uploads ``0..k`` the accumulator holds ``sum(w_i u_i) / sum(w_i)``: the first upload is copied
    in, each later one is folded as ``acc += (w_k / W_k) * (u_k - acc)`` with ``W_k = w_0 + ... + w_k``. The
    math is float32 (the dtype of the weights), block by block through a small scratch buffer, so no float64
    or full-size temporaries exist; the accumulator arrays are reused round after round. Compared with the
    earlier float64 ``sum(c * u)`` the result differs by a few float32 ulps. The fold order is the fixed
    order of the workers (not arrival order), so the result is deterministic.

    A :class:`SparseRows` part is the dense array that is zero outside its rows: the same fold is
    ``acc *= 1 - c`` then ``acc[indices] += c * rows``. ``touched(i)`` is the union of the indices folded into
    variable i this round, or None once any upload sent it dense.
    """

    BLOCK = 1 << 18  # elements per block: the scratch (1 MiB in float32) stays in cache

    def __init__(self) -> None:
        self.acc: list[np.ndarray] = []
        self._scratch: dict[np.dtype, np.ndarray] = {}
        self._rows: list[list[np.ndarray] | None] = []
        self._total = 0.0
        self._k = 0

    def reset(self) -> None:
        self._total, self._k = 0.0, 0

    def touched(self, i: int) -> np.ndarray | None:
        rows = self._rows[i] if i < len(self._rows) else None
        return None if rows is None else np.unique(np.concatenate(rows))

    def coef(self, weight: float) -> tuple[int, float]:
        """Count in the next upload's weight: (its position k this round, its fold coefficient
        ``w_k / W_k``). While every weight so far is zero (e.g. examples weighting with empty workers) the
        coefficient is ``1 / (k + 1)``: a plain mean of what has arrived."""
        weight = max(float(weight), 0.0)
        self._total += weight
        k, self._k = self._k, self._k + 1
        return k, (weight / self._total if self._total > 0 else 1.0 / (k + 1))

    def fold(self, parts: Sequence[Part], weight: float) -> None:
        k, c = self.coef(weight)
        if k == 0:
            shapes = [tuple(p.shape) for p in parts]
            dtypes = [acc_dtype(p.rows.dtype if isinstance(p, SparseRows) else p.dtype) for p in parts]
            if len(self.acc) != len(parts) or any(a.shape != sh or a.dtype != dt for a, sh, dt
                                                  in zip(self.acc, shapes, dtypes, strict=True)):
                self.acc = [np.empty(sh, dt) for sh, dt in zip(shapes, dtypes, strict=True)]
            self._rows = [[p.indices] if isinstance(p, SparseRows) else None for p in parts]
            for a, p in zip(self.acc, parts, strict=True):
                if isinstance(p, SparseRows):
                    a.fill(0)
                    np.add.at(a, p.indices, p.rows)
                else:
                    np.copyto(a, p, casting="same_kind")
            return
        for i, p in enumerate(parts):
            rows = self._rows[i]
            if rows is not None:
                if isinstance(p, SparseRows):
                    rows.append(p.indices)
                else:
                    self._rows[i] = None
        if c == 0.0:
            return
        for a, p in zip(self.acc, parts, strict=True):
            if isinstance(p, SparseRows):
                a *= a.dtype.type(1.0 - c)
                np.add.at(a, p.indices, np.multiply(p.rows, a.dtype.type(c), dtype=a.dtype))
            else:
                self.fold_block(a, p, c)

    def fold_block(self, acc: np.ndarray, up: np.ndarray, c: float) -> None:
        """``acc += c * (up - acc)`` in place, block by block (one array of one upload)."""
        if acc.size == 0:
            return
        flat_a = acc.reshape(-1)
        flat_u = np.asarray(up).reshape(-1)
        scratch = self._scratch.get(acc.dtype)
        if scratch is None:
            scratch = self._scratch[acc.dtype] = np.empty(self.BLOCK, acc.dtype)
        cc = acc.dtype.type(c)
        for i in range(0, flat_a.size, self.BLOCK):
            a = flat_a[i:i + self.BLOCK]
            t = scratch[:a.size]
            np.subtract(flat_u[i:i + self.BLOCK], a, out=t, casting="same_kind")
            t *= cc
            a += t


def acc_dtype(dtype: np.dtype) -> np.dtype:
    """Floating uploads are averaged in their own precision; anything else in float64."""
    return np.dtype(dtype) if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)


def send_all(pool: ThreadPoolExecutor, jobs: list[Callable[[], None]]) -> None:
    """Send to every worker at once (each link has its own stream and TLS session; one after the other, the
    last worker would wait for every earlier transfer). Returns once every send is done; raises the first
    failure after all have finished, so no send is left running behind an error."""
    if len(jobs) < 2:
        for job in jobs:
            job()
        return
    futures = [pool.submit(job) for job in jobs[1:]]
    first: BaseException | None = None
    try:
        jobs[0]()
    except BaseException as e:
        first = e
    for f in futures:
        try:
            f.result()
        except BaseException as e:
            first = first or e
    if first is not None:
        raise first


class Links(NamedTuple):
    """The server's flow ids per worker: uploads in (gradients or weights), weights out."""

    up: dict[str, str]
    down: dict[str, str]


class Aggregator(ABC):
    """The server's side of the rounds of one aggregation rule (module docstring).

    ``first_arrival`` is called once per round when the first worker's upload is in, before anything is
    written into the accumulator: the server starts its busy meter and waits for the last round's
    checkpoint, which may still be reading the weights."""

    def __init__(self, ctx: RoleContext, links: Links, pool: ThreadPoolExecutor, by_examples: bool,
                 shapes: list[tuple[int, ...]], names: list[str]) -> None:
        self.ctx, self.links, self.pool, self.by_examples = ctx, links, pool, by_examples
        self.workers = list(links.up)
        self.shapes, self.names = shapes, names
        self.avg = Average()

    def weight_of(self, count: int) -> float:
        """An upload's weight in the mean: its example count (``weighting examples``) or 1 (``mean``)."""
        return float(count) if self.by_examples else 1.0

    def send_all(self, key: int, arrays: list[np.ndarray]) -> None:
        send_all(self.pool, [partial(self.ctx.links[w].send_arrays, self.links.down[w], key, arrays)
                             for w in self.workers])

    @abstractmethod
    def round(self, r: int, first_arrival: Callable[[], None]) -> int:
        """Aggregate round ``r`` and send the result to every worker; returns the round's examples."""

    @abstractmethod
    def weights(self) -> list[np.ndarray]:
        """The global weights (after the last round, or as built / resumed)."""

    @abstractmethod
    def checkpoint_arrays(self) -> dict[str, np.ndarray]:
        """What a checkpoint of the server holds now (weights, optimiser state): the optimiser state is
        copied (the next round changes it), the weights are not (the next round's first fold waits for the
        write)."""


class SyncMean(Aggregator):
    """Sync: average the gradients of one batch per worker, apply them with the server's optimiser."""

    def __init__(self, ctx: RoleContext, links: Links, pool: ThreadPoolExecutor, by_examples: bool,
                 model: Any, opt: Any) -> None:
        import tensorflow as tf

        self.model, self.opt = model, opt
        self.variables = list(model.trainable_variables)
        super().__init__(ctx, links, pool, by_examples, [tuple(v.shape) for v in self.variables],
                         model.weight_names)
        self._weights: list[np.ndarray] | None = None
        variables = self.variables

        @tf.function(reduce_retracing=True)
        def apply(grads):
            opt.apply(grads, variables)

        self._apply = apply

    def round(self, r: int, first_arrival: Callable[[], None]) -> int:
        import tensorflow as tf

        ctx, avg = self.ctx, self.avg
        avg.reset()
        total = 0
        for k, w in enumerate(self.workers):
            arrays = ctx.wait(partial(ctx.links[w].recv_arrays, self.links.up[w], r), w)
            parts, count = parse_upload(arrays, self.shapes, self.names, w, r)
            del arrays
            total += count
            if k == 0:
                first_arrival()
            avg.fold(parts, self.weight_of(count))
            del parts  # the upload's buffer is freed here, before the next worker's is taken
        self._apply(server_grads(tf, avg, self.opt.sparse_is_exact()))
        self._weights = self.model.get_weights()
        self.send_all(r, self._weights)
        return total

    def weights(self) -> list[np.ndarray]:
        if self._weights is None:  # no round yet: the model's (kept out of memory until needed)
            self._weights = self.model.get_weights()
        return self._weights

    def checkpoint_arrays(self) -> dict[str, np.ndarray]:
        return training_arrays(self.weights(), self.opt, self.variables)


class FedAvgMean(Aggregator):
    """FedAvg: the global weights are the average itself (numpy, ``acc``); the TensorFlow model only
    supplied the initial values, names and shapes and is not kept (no second copy of the weights)."""

    def __init__(self, ctx: RoleContext, links: Links, pool: ThreadPoolExecutor, by_examples: bool,
                 weights: list[np.ndarray], names: list[str]) -> None:
        super().__init__(ctx, links, pool, by_examples, [tuple(a.shape) for a in weights], names)
        self.acc = weights
        self.layout = piece_layout(self.shapes, [a.dtype.itemsize for a in weights])

    def round(self, r: int, first_arrival: Callable[[], None]) -> int:
        """One round piece by piece: fold piece p of every worker into ``acc`` (in the workers' fixed
        order: deterministic), send the averaged piece to every worker, go on with piece p + 1."""
        ctx, avg, acc = self.ctx, self.avg, self.acc
        counts: list[int] = []
        coefs: list[float] = []
        avg.reset()
        for p, piece in enumerate(self.layout):
            key = keys.piece(r, p)
            for k, w in enumerate(self.workers):
                arrays = ctx.wait(partial(ctx.links[w].recv_arrays, self.links.up[w], key), w)
                parts, count = parse_piece(arrays, piece, self.shapes, self.names, w, r, p)
                del arrays
                if p == 0:
                    counts.append(count)
                    coefs.append(avg.coef(self.weight_of(count))[1])
                    if k == 0:
                        first_arrival()
                elif count != counts[k]:
                    raise RoleError(f"{w} sent a malformed piece {p} at round {r}: example count {count}, "
                                    f"piece 0 said {counts[k]}")
                self._fold_piece(piece, parts, k, coefs[k])
                del parts  # the upload piece's buffer
            self.send_all(key, [*(seg_view(acc, s) for s in piece), np.array([sum(counts)], np.int64)])
        return sum(counts)

    def _fold_piece(self, piece: list[Seg], parts: Sequence[np.ndarray], k: int, coef: float) -> None:
        """Worker k's segments of a piece into the accumulator (the running mean, element by element)."""
        for s, part in zip(piece, parts, strict=True):
            view = seg_view(self.acc, s)
            if k == 0:
                np.copyto(view, part, casting="same_kind")
            elif coef != 0.0:
                self.avg.fold_block(view, part, coef)

    def weights(self) -> list[np.ndarray]:
        return self.acc

    def checkpoint_arrays(self) -> dict[str, np.ndarray]:
        return training_arrays(self.acc, None, [])


def server_grads(tf: Any, avg: Average, sparse_ok: bool) -> list[Any]:
    """The averaged gradients as the optimiser takes them: row-wise (IndexedSlices of the rows any worker
    touched) where every upload of that variable was sparse and the optimiser's row-wise update is exact,
    else dense."""
    out = []
    for i, a in enumerate(avg.acc):
        rows = avg.touched(i) if sparse_ok else None
        if rows is not None:
            out.append(tf.IndexedSlices(tf.convert_to_tensor(a[rows]), tf.convert_to_tensor(rows),
                                        tf.constant(a.shape, tf.int64)))
        else:
            out.append(tf.convert_to_tensor(a))
    return out
