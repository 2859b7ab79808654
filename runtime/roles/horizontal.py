"""Horizontal federated learning: workers train the same model on their own rows, a server aggregates.

``sync`` (parameter server, every step): each worker computes the gradients of one batch and sends them with
its example count; the server averages them (weighted by examples), applies its optimiser and sends the new
weights back. ``fedavg``: each worker trains locally for N steps (or one local epoch) from the global weights,
sends its weights and example count; the server sends back the weighted average.

Set-up: resume agreement (the server coordinates), then each worker tells the server its row count and the
specs of its model inputs (the server has no data; it builds the same model from the same seed, so all start
from identical weights), and the server answers with the schedule (steps per epoch, total steps / rounds).
Workers with fewer rows than the largest one wrap around within an epoch so every step has all workers.

Aggregation is float32, folded upload by upload into one accumulator that is reused every round (a running
weighted mean, see :class:`_Average`), so the server holds one average plus the uploads that have arrived, not
float64 temporaries of all of them.

FedAvg moves a round's weights in pieces (:func:`piece_layout`: small variables grouped, large ones cut into
row ranges, each piece at most ``PIECE_BYTES``), one message each: the server folds piece p of every worker
and sends the averaged piece back while later pieces are still arriving, so upload, averaging and download
overlap, and the server holds the average plus the pieces in flight rather than every worker's whole upload.
Each piece message is ``[*segments, count]`` (the server's: the round's total count); the math is the
running mean above, element by element.

Sync: embedding tables' gradients (``IndexedSlices`` from the lookups' gathers) travel sparse, as the rows a
batch touched (summed per row) and their indices, whenever that is smaller than the dense table; the
message is ``[*parts, layout, count]`` with ``layout[i]`` = 1 where variable i is sent as (indices, rows).
The server folds them into its dense average and applies them row-wise only where the optimiser's row-wise
update is exactly its dense update (plain SGD, Adagrad: :meth:`Optimizer.sparse_is_exact`); Adam and
momentum SGD get the dense average, as before, so the math does not change with the encoding.

Checkpoints: the weights at a round boundary are the server's (every worker has just received them), so
only the server checkpoints them, in a background thread after it has sent the round's weights (it is idle
while the workers train; the next round's aggregation waits for the write). A worker's checkpoint holds what
only it has: its optimiser state (FedAvg with a stateful optimiser such as Adam: the local slots carry over
between rounds; SGD has none), its local batch cursor and its metrics history. On resume the server sends
every worker the agreed step's weights. Both sides checkpoint at the same steps, and a worker writes step s
only after the server has sent step s's weights, i.e. after the server finished writing step s - 1: nobody is
more than one checkpoint ahead of another, which the store's two kept checkpoints cover.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, NamedTuple

import numpy as np

from fldsl.artifacts import Flow, Plan, TensorSpec
from fldsl.runtime.roles.common import (
    CheckpointWriter,
    Meter,
    PeerLimitExceeded,
    PeerProtocolError,
    RoleContext,
    RoleError,
    announce_training,
    configure_tf,
    cyclic_batch,
    epoch_batch,
    epoch_order,
    export_model,
    fit_preprocessing,
    input_specs,
    is_checkpoint_step,
    label_ref,
    load_tables,
    report_epoch,
    save_checkpoint,
    score_metrics,
    with_checkpoint_writer,
)
from fldsl.runtime.roles.optstate import get_opt_state, restore_training, set_opt_state, training_arrays
from fldsl.runtime.transport import keys

# The weights the server sends each worker after a resume travel under keys.resume_weights(agreed step):
# keyed by step so that a copy left unread by an interrupted agreement is never taken for another step's.
INFO_KEY = keys.control(keys.Control.INFO)  # worker -> server: its rows and input specs
SCHEDULE_KEY = keys.control(keys.Control.SCHEDULE)  # server -> worker: steps per epoch, rounds

# The one message of each `stats` flow (its own flow: no other message shares it). A copy a restarted
# worker's previous process left unread is the same bytes (same rows, same statistics), so taking it
# instead of the new one changes nothing.
STATS_KEY = 0

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


def _seg_shape(shapes: Sequence[tuple[int, ...]], s: Seg) -> tuple[int, ...]:
    shape = shapes[s.var]
    return shape if s.rows is None else (s.rows[1] - s.rows[0], *shape[1:])


def _seg_view(arrays: Sequence[np.ndarray] | Mapping[int, np.ndarray], s: Seg) -> np.ndarray:
    a = arrays[s.var]
    return a if s.rows is None else a[s.rows[0]:s.rows[1]]


def _piece_keys(n: int) -> Callable[[int], list[int]]:
    """ctx.step_keys for FedAvg: round k's piece keys (stale ones are dropped after a peer restarts)."""
    return lambda k: [k, *(keys.piece(k, p) for p in range(n))]


def run(ctx: RoleContext) -> dict[str, Any]:
    configure_tf()
    if ctx.plan.role.endswith(".server"):
        return server(ctx)
    return worker(ctx, load_tables(ctx.plan))


def _agg(plan: Plan):
    if plan.aggregation is None:
        raise RoleError(f"{plan.node}: the plan has no aggregation section")
    return plan.aggregation


# ---------------------------------------------------------------------------------------------------------
# server
# ---------------------------------------------------------------------------------------------------------


class SparseRows(NamedTuple):
    """A sparse gradient of a ``shape`` variable: ``rows[j]`` is row ``indices[j]``, every other row zero."""

    indices: np.ndarray
    rows: np.ndarray
    shape: tuple[int, ...]


Part = np.ndarray | SparseRows


class _Average:
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
            dtypes = [_acc_dtype(p.rows.dtype if isinstance(p, SparseRows) else p.dtype) for p in parts]
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
                self._fold_one(a, p, c)

    def _fold_one(self, acc: np.ndarray, up: np.ndarray, c: float) -> None:
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


def _acc_dtype(dtype: np.dtype) -> np.dtype:
    """Floating uploads are averaged in their own precision; anything else in float64."""
    return np.dtype(dtype) if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)


def _send_all(pool: ThreadPoolExecutor, jobs: list[Callable[[], None]]) -> None:
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


def _parse_upload(arrays: list[np.ndarray], shapes: list[tuple[int, ...]], names: list[str], who: str,
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


def _parse_piece(arrays: list[np.ndarray], piece: list[Seg], shapes: list[tuple[int, ...]], names: list[str],
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
        want = _seg_shape(shapes, s)
        if tuple(a.shape) != want:
            rows = "" if s.rows is None else f" rows {s.rows[0]}:{s.rows[1]}"
            raise bad(f"{names[s.var]}{rows} has shape {tuple(a.shape)}, expected {want}")
    return arrays[:-1], int(cnt[0])


def _fedavg_round(ctx: RoleContext, r: int, layout: list[list[Seg]], acc: list[np.ndarray],
                  shapes: list[tuple[int, ...]], names: list[str], avg: _Average, by_examples: bool,
                  links: tuple[dict[str, str], dict[str, str]], pool: ThreadPoolExecutor,
                  first_arrival: Callable[[], None]) -> int:
    """One FedAvg round at the server, piece by piece (module docstring): fold piece p of every worker into
    ``acc`` (in the workers' fixed order: deterministic), send the averaged piece to every worker, go on
    with piece p + 1. The running mean is :class:`_Average`'s, element by element. Returns the examples."""
    grad_in, weights_out = links
    workers = list(grad_in)
    counts: list[int] = []
    coefs: list[float] = []
    avg.reset()
    for p, piece in enumerate(layout):
        key = keys.piece(r, p)
        for k, w in enumerate(workers):
            arrays = ctx.wait(partial(ctx.links[w].recv_arrays, grad_in[w], key), w)
            parts, count = _parse_piece(arrays, piece, shapes, names, w, r, p)
            del arrays
            if p == 0:
                counts.append(count)
                coefs.append(avg.coef(count if by_examples else 1.0)[1])
                if k == 0:
                    first_arrival()
            elif count != counts[k]:
                raise RoleError(f"{w} sent a malformed piece {p} at round {r}: example count {count}, "
                                f"piece 0 said {counts[k]}")
            for s, part in zip(piece, parts, strict=True):
                view = _seg_view(acc, s)
                if k == 0:
                    np.copyto(view, part, casting="same_kind")
                elif coefs[k] != 0.0:
                    avg._fold_one(view, part, coefs[k])
            del parts  # the upload piece's buffer
        out = [*(_seg_view(acc, s) for s in piece), np.array([sum(counts)], np.int64)]
        _send_all(pool, [partial(ctx.links[w].send_arrays, weights_out[w], key, out) for w in workers])
    return sum(counts)


def _server_grads(tf: Any, avg: _Average, sparse_ok: bool) -> list[Any]:
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


def _worker_info(ctx: RoleContext, w: str) -> tuple[int, dict[str, TensorSpec]]:
    """A worker's row count and input specs, checked. The server builds its model from these specs, so where
    the plan names the inputs (the compiler's aggregate task), a worker cannot widen them: a wider input
    would make every weight matrix it feeds, and the server's memory, grow with the announcement."""
    info = ctx.recv_json(w, INFO_KEY)
    try:
        rows, raw = info["rows"], info["specs"]
        if type(rows) is not int or rows < 0 or not isinstance(raw, dict):
            raise TypeError("rows must be a count and specs an object")
        specs = {str(k): TensorSpec.model_validate(v) for k, v in raw.items()}
    except (KeyError, TypeError, ValueError) as e:
        raise RoleError(f"{w} sent a malformed schedule request: {e}") from None
    planned = _planned_specs(ctx.plan)
    if planned is not None:
        for ref, spec in specs.items():
            want = planned.get(ref)
            if want is None or want.shape != spec.shape:
                allowed = want.text() if want is not None else "not an input of the plan"
                raise PeerLimitExceeded(f"{w} announces input {ref} as {spec.text()}, but the "
                                        f"plan allows {allowed}: refusing", peer=w)
    return rows, specs


def _planned_specs(plan: Plan) -> dict[str, TensorSpec] | None:
    """The input specs the compiler wrote into the server's aggregate task (None: a plan without them)."""
    for task in plan.tasks:
        raw = task.params.get("input_specs") if task.kind == "aggregate" else None
        if isinstance(raw, dict):
            return {str(k): TensorSpec.model_validate(v) for k, v in raw.items()}
    return None


def server(ctx: RoleContext) -> dict[str, Any]:
    pool = ThreadPoolExecutor(max_workers=max(1, len(_agg(ctx.plan).workers) - 1),
                              thread_name_prefix=f"{ctx.node}-send")
    try:
        return with_checkpoint_writer(ctx, lambda writer: _server(ctx, writer, pool))
    finally:
        pool.shutdown(wait=False)


def _server(ctx: RoleContext, writer: CheckpointWriter, pool: ThreadPoolExecutor) -> dict[str, Any]:
    import tensorflow as tf

    from fldsl.stdlib.tf import build_segment, make_optimizer

    plan = ctx.plan
    agg = _agg(plan)
    workers = list(agg.workers)
    ctx.progress.emit("phase", name="resume")
    resume = ctx.agree_resume(plan.node, workers)

    _merge_stats(ctx, workers)
    infos = {w: _worker_info(ctx, w) for w in workers}
    specs = infos[workers[0]][1]
    for w in workers[1:]:
        if infos[w][1] != specs:
            raise RoleError(f"workers {workers[0]} and {w} have different input schemas; horizontal "
                            "partitioning needs the same columns everywhere")
    rows = [infos[w][0] for w in workers]
    b = plan.train.batch_size
    spe = max(1, math.ceil(max(rows) / b))
    if agg.mode == "sync":
        rounds, local = spe * plan.train.epochs, [1] * len(workers)
    elif agg.every_epoch or not agg.every_steps:
        rounds = plan.train.epochs
        local = [max(1, math.ceil(n / b)) for n in rows]
    else:
        rounds = math.ceil(spe * plan.train.epochs / agg.every_steps)
        local = [agg.every_steps] * len(workers)
    rounds_per_epoch = spe if agg.mode == "sync" else max(1, rounds // plan.train.epochs)
    for w, n_local in zip(workers, local, strict=True):
        ctx.send_json(w, SCHEDULE_KEY, {"steps_per_epoch": spe, "rounds": rounds, "local_steps": n_local,
                                         "rounds_per_epoch": rounds_per_epoch})

    model = build_segment(plan.model, specs, seed=plan.train.seed)
    names = model.weight_names
    variables = list(model.trainable_variables)
    shapes = [tuple(v.shape) for v in variables]
    sync = agg.mode == "sync"
    opt = make_optimizer(plan.train.optimizer) if sync else None
    grad_in = {w: ctx.flow(w, plan.node, ("gradients", "weights")).id for w in workers}
    weights_out = {w: ctx.flow(plan.node, w, ("weights",)).id for w in workers}
    found = [_summary_flow(ctx, w, plan.node) for w in workers]
    summary_flows = [f for f in found if f is not None] if all(found) else []

    if opt is not None:
        @tf.function(reduce_retracing=True)
        def apply(grads):
            opt.apply(grads, variables)

    # FedAvg: the global weights are the average itself (numpy); the TensorFlow model only supplied the
    # initial values, names and shapes, and is dropped so that its 1x copy of the weights is not kept.
    # Sync: the model and the optimiser stay (the server applies the averaged gradients).
    start = 0
    weights: list[np.ndarray] | None = None
    history: list[dict[str, Any]] = []  # the combined metrics of each epoch so far
    if resume is not None:
        assert ctx.store is not None  # a resume step comes from the store
        ckpt = ctx.store.load(resume)
        restore_training(model, opt, variables, ckpt.arrays)
        start = ckpt.step
        history = list(ckpt.meta.get("history", []))
        weights = model.get_weights()
        del ckpt
        # Worker checkpoints hold no weights: every worker continues from these.
        key, sent = keys.resume_weights(resume), weights
        _send_all(pool, [partial(ctx.links[w].send_arrays, weights_out[w], key, sent) for w in workers])
    if not sync:
        if weights is None:
            weights = model.get_weights()
        model, variables = None, []
    avg = _Average()  # sync: the accumulator of the gradients; FedAvg: its fold (weights is the accumulator)
    announce_training(ctx, rounds, rounds_per_epoch, start if resume is not None else None)
    meter = Meter()
    last_emit = 0.0
    if not sync:
        assert weights is not None
        # Writes into the accumulator wait for the last round's checkpoint, which may still be reading it
        # (measured: a second, alternating buffer instead of waiting saved no time on 2 cores and cost
        # 94 MB more at the hub).
        layout = piece_layout(shapes, [a.dtype.itemsize for a in weights])
        ctx.step_keys = _piece_keys(len(layout))

        def first_arrival() -> None:
            meter.start()
            writer.wait()
    for r in range(start, rounds):
        ctx.check_stop()
        ctx.last_step = max(ctx.last_step, r)
        if not sync:
            assert weights is not None  # FedAvg: the accumulator, set above
            total = _fedavg_round(ctx, r, layout, weights, shapes, names, avg, agg.weighting == "examples",
                                  (grad_in, weights_out), pool, first_arrival)
        else:
            avg.reset()
            total = 0
            for k, w in enumerate(workers):
                arrays = ctx.wait(partial(ctx.links[w].recv_arrays, grad_in[w], r), w)
                parts, count = _parse_upload(arrays, shapes, names, w, r)
                del arrays
                total += count
                if k == 0:
                    meter.start()
                    writer.wait()  # the last round's checkpoint may still be reading the accumulator
                avg.fold(parts, count if agg.weighting == "examples" else 1.0)
                del parts  # the upload's buffer is freed here, before the next worker's is taken
            assert opt is not None and model is not None
            apply(_server_grads(tf, avg, opt.sparse_is_exact()))
            weights = model.get_weights()
            _send_all(pool, [partial(ctx.links[w].send_arrays, weights_out[w], r, weights) for w in workers])
        meter.stop(total)
        now = time.monotonic()
        if now - last_emit > 0.25 or r + 1 == rounds:
            ctx.progress.emit("step", step=r + 1, total=rounds, examples_per_s=meter.rate)
            last_emit = now
        if summary_flows and ((r + 1) % rounds_per_epoch == 0 or r + 1 == rounds):
            # The workers send their summaries right after this round's weights (before they checkpoint),
            # so waiting here holds nobody up, and this epoch's metrics are in the checkpoint below.
            epoch = (r + 1 + rounds_per_epoch - 1) // rounds_per_epoch
            metrics = _combined_metrics(ctx, summary_flows, r)
            history.append({"epoch": epoch, **metrics})
            report_epoch(ctx, epoch, metrics)
        if is_checkpoint_step(plan, r + 1, rounds_per_epoch):
            # The optimiser state (sync) is copied now (the next step changes it); the weights are not written
            # to until the next round's first fold, which waits for this write first.
            assert weights is not None  # both modes have set it by the end of a round
            arrays_now = training_arrays(weights, opt, variables)
            meta = {"history": list(history)}
            writer.submit(partial(save_checkpoint, ctx, r + 1, arrays_now, meta))
            del arrays_now
    writer.wait()
    if weights is None:  # sync, no round ran and nothing was resumed (zero rounds)
        assert model is not None
        weights = model.get_weights()
    last = history[-1] if history else {}
    # The server's model inputs are the workers' specs; its card carries the combined metrics.
    export_model(ctx, weights, names, specs=specs, metrics=last, history=history)
    return {"metrics": last, "history": history, "examples_per_s": meter.rate, "steps": rounds}


# ---------------------------------------------------------------------------------------------------------
# worker
# ---------------------------------------------------------------------------------------------------------


def _split_tables(plan: Plan, tables: dict[str, Any]) -> tuple[str, Any, Any | None]:
    train_ds, _ = label_ref(plan)
    if train_ds not in tables:
        label = plan.loss.label if plan.loss is not None else "a label"
        raise RoleError(f"{plan.node}: the loss reads `{label}` but this node holds "
                        f"{', '.join(sorted(tables)) or 'no data'}")
    test_name = plan.train.validation.test_data
    return train_ds, tables[train_ds], tables.get(test_name) if test_name else None


def worker(ctx: RoleContext, tables: dict[str, Any], specs: dict[str, TensorSpec] | None = None,
           after_setup: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train as a worker on ``tables``; ``specs`` (distributed: derived from the received shard) overrides
    the input specs of the plan's data sets."""
    import tensorflow as tf

    from fldsl.stdlib.tf import build_segment, loss_fn, make_optimizer
    from fldsl.stdlib.tf.optim import unique_rows

    plan = ctx.plan
    loss_spec = plan.loss
    if loss_spec is None:  # the compiler gives every worker the loss; a plan without one is not a worker's
        raise RoleError(f"{plan.node}: a worker's plan has no loss; recompile the pipeline")
    agg = _agg(plan)
    srv = agg.server
    ctx.progress.emit("phase", name="resume")
    resume = ctx.agree_resume(srv, [])
    train_ds, table, test_table = _split_tables(plan, tables)
    _, label_field = label_ref(plan)
    labels_all = table.fields[label_field]

    # Rows used for training and (optionally) a local stratified holdout.
    n_all = len(table.ids)
    train_rows = np.arange(n_all, dtype=np.int64)
    hold_rows = np.zeros(0, dtype=np.int64)
    frac = plan.train.validation.fraction
    if frac > 0 and test_table is None:
        from fldsl.runtime.data import stratified_split

        ids = np.asarray(table.ids)
        tr, ho = stratified_split(ids, labels_all, frac, plan.train.validation.seed)
        pos = {str(i): k for k, i in enumerate(ids.tolist())}
        train_rows = np.array([pos[str(i)] for i in tr], dtype=np.int64)
        hold_rows = np.array([pos[str(i)] for i in ho], dtype=np.int64)
    # Each worker fits the declared preprocessing on its training rows: on its own, or, for the columns
    # whose statistics the workers pool (the `stats` flows), on the aggregator's merge of everybody's. A
    # test set is transformed with the training set's statistics.
    test_name = plan.train.validation.test_data
    pooled = _pool_stats(ctx, srv, train_ds, table, train_rows)
    fit_preprocessing(ctx, tables, {train_ds: train_rows},
                      {test_name: train_ds} if test_table is not None and test_name else None, pooled=pooled)

    if specs is None:
        specs = {k: v for k, v in input_specs(plan, ctx.policy).items() if k.startswith(f"{train_ds}.")}
    refs = {r for op in plan.model for r in op.inputs if r.startswith(f"{train_ds}.")}
    specs = {k: v for k, v in specs.items() if k in refs}
    ctx.send_json(srv, INFO_KEY, {"rows": len(train_rows),
                                   "specs": {k: v.model_dump(mode="json") for k, v in sorted(specs.items())}})
    sched = ctx.recv_json(srv, SCHEDULE_KEY)
    rounds, local_steps = int(sched["rounds"]), int(sched["local_steps"])
    spe, rpe = int(sched["steps_per_epoch"]), int(sched["rounds_per_epoch"])
    if after_setup is not None:
        after_setup()

    model = build_segment(plan.model, specs, seed=plan.train.seed)
    variables = list(model.trainable_variables)
    loss = loss_fn(plan.loss)
    sync = agg.mode == "sync"
    opt = None if sync else make_optimizer(plan.train.optimizer)
    send_flow = ctx.flow(plan.node, srv, ("gradients",) if sync else ("weights",)).id
    recv_flow = ctx.flow(srv, plan.node, ("weights",)).id
    link = ctx.links[srv]
    summary_flow = _summary_flow(ctx, plan.node, srv)
    own_refs = model.input_refs
    names = model.weight_names
    srv_shapes = [tuple(v.shape) for v in variables]
    layout = [] if sync else piece_layout(srv_shapes, [v.dtype.size for v in variables])
    if not sync:
        ctx.step_keys = _piece_keys(len(layout))

    @tf.function(reduce_retracing=True)
    def grad_step(inputs, labels):
        with tf.GradientTape() as tape:
            out = model(inputs, training=True)
            value = loss(out[loss_spec.logits], labels)
        grads = tape.gradient(value, variables)
        # Embedding tables: (indices, rows summed per index); everything else dense.
        return value, [unique_rows(g) if isinstance(g, tf.IndexedSlices) else tf.convert_to_tensor(g)
                       for g in grads]

    if opt is not None:
        @tf.function(reduce_retracing=True)
        def local_step(inputs, labels):
            with tf.GradientTape() as tape:
                out = model(inputs, training=True)
                value = loss(out[loss_spec.logits], labels)
            opt.apply(tape.gradient(value, variables), variables)
            return value

    @tf.function(reduce_retracing=True)
    def predict(inputs):
        return model(inputs, training=False)[loss_spec.logits]

    def inputs_for(t: Any, rows: np.ndarray | None) -> dict[str, np.ndarray]:
        out = {}
        for ref in own_refs:
            _, fld = ref.split(".", 1)
            arr = t.fields[fld]
            out[ref] = arr if rows is None else arr[rows]
        return out

    start = 0
    local_cursor = 0  # fedavg: local steps taken so far (drives the local batch order)
    history: list[dict[str, Any]] = []
    epoch_losses: list[float] = []  # a mid-epoch checkpoint's batch losses of the epoch so far
    if resume is not None:
        assert ctx.store is not None  # a resume step comes from the store
        ckpt = ctx.store.load(resume)
        if opt is not None:
            set_opt_state(opt, variables, ckpt.arrays)
        start = ckpt.step
        local_cursor = int(ckpt.meta.get("local_cursor", 0))
        history = list(ckpt.meta.get("history", []))
        epoch_losses = [float(x) for x in ckpt.meta.get("epoch_losses", [])]
        # The weights come from the server (module docstring: worker checkpoints hold none).
        key = keys.resume_weights(resume)
        received = ctx.wait(lambda t: link.recv_arrays(recv_flow, key, t), srv)
        model.set_weights(received)
        del received
        _drop_copies(link, recv_flow, key)
    announce_training(ctx, rounds, rpe, start if resume is not None else None)
    b = plan.train.batch_size
    n = len(train_rows)
    local_spe = max(1, math.ceil(n / b))
    meter = Meter()
    last_emit = 0.0
    losses: list[float] = epoch_losses  # the epoch's training batch losses (train_loss, the summary)
    for r in range(start, rounds):
        ctx.check_stop()
        ctx.last_step = max(ctx.last_step, r)
        meter.start()
        if sync:
            e, j = divmod(r, spe)
            rows = train_rows[cyclic_batch(epoch_order(n, plan.train.seed, e), j, b)]
            value, grads = grad_step(inputs_for(table, rows), labels_all[rows])
            upload = [*_encode_grads(grads, variables), np.array([len(rows)], np.int64)]
            seen = len(rows)
            losses.append(float(value))
        else:
            seen = 0
            for _ in range(local_steps):
                e, j = divmod(local_cursor, local_spe)
                rows = train_rows[epoch_batch(n, plan.train.seed, e, j, b)]
                losses.append(float(local_step(inputs_for(table, rows), labels_all[rows])))
                seen += len(rows)
                local_cursor += 1
        # The exchange is transfer, not local work: outside the meter, so the bench's round overhead (round
        # wall time minus busy time) counts it, as it counts the transfer for Flower's clients. (FedAvg
        # writes the averaged pieces into the variables as they arrive: that is inside the exchange too.)
        if sync:
            meter.stop(0)
            link.send_arrays(send_flow, r, upload)
            del upload
            weights = ctx.wait(partial(link.recv_arrays, recv_flow, r), srv)
            meter.start()
            model.set_weights(weights)
            del weights  # the received buffer; kept, it would stay alive through the next step
            meter.stop(seen)
        else:
            meter.stop(seen)
            _exchange_pieces(ctx, r, layout, variables, seen, (send_flow, recv_flow), srv_shapes, names)
        now = time.monotonic()
        if now - last_emit > 0.25 or r + 1 == rounds:
            ctx.progress.emit("step", step=r + 1, total=rounds, train_loss=losses[-1] if losses else None,
                              examples_per_s=meter.rate)
            last_emit = now
        if (r + 1) % rpe == 0 or r + 1 == rounds:
            # train_loss: the mean training loss since the last epoch end; loss (and auc, ...): the holdout's.
            metrics: dict[str, Any] = {"train_loss": float(np.mean(losses))} if losses else {}
            epoch_losses, losses = losses, []
            logits, labels = None, labels_all[:0]
            if test_table is not None:
                labels = test_table.fields[label_field]
                logits = _holdout_logits(plan, predict, inputs_for(test_table, None), len(labels))
            elif len(hold_rows):
                labels = labels_all[hold_rows]
                logits = _holdout_logits(plan, predict, inputs_for(table, hold_rows), len(labels))
            if logits is not None:
                metrics.update(score_metrics(loss_spec.op, list[str](plan.train.metrics), logits, labels))
            if summary_flow is not None:  # after the round's weights, before this worker's checkpoint
                _send_summary(ctx, summary_flow, r, logits, labels, epoch_losses)
            epoch = (r + 1 + rpe - 1) // rpe
            history.append({"epoch": epoch, **metrics})
            report_epoch(ctx, epoch, metrics)
        if is_checkpoint_step(plan, r + 1, rpe):
            state = get_opt_state(opt, variables) if opt is not None else {}
            # The epoch's batch losses so far too: resumed mid-epoch, train_loss still covers the whole epoch.
            save_checkpoint(ctx, r + 1, state, {"local_cursor": local_cursor, "history": history,
                                                "epoch_losses": list(losses)})
    ctx.collect_landed()  # the server's notice of the last checkpoint (workers save in this thread)
    export_model(ctx, model.get_weights(), model.weight_names, metrics=history[-1] if history else {},
                 history=history)
    return {"metrics": history[-1] if history else {}, "history": history, "examples_per_s": meter.rate,
            "steps": rounds}


def _exchange_pieces(ctx: RoleContext, r: int, layout: list[list[Seg]], variables: list[Any], seen: int,
                     flows: tuple[str, str], shapes: list[tuple[int, ...]], names: list[str]) -> None:
    """A FedAvg worker's side of round ``r`` (module docstring): send the weights piece by piece, then take
    the server's averaged pieces as they come and write each into the variables in place.

    A variable is read once and its pieces sent as views of that read, so at most one variable's read is
    alive, not a copy of the whole model; averaged row ranges go in with ``scatter_update``,
    which writes the variable's buffer in place."""
    import tensorflow as tf

    send_flow, recv_flow = flows
    srv = _agg(ctx.plan).server
    link = ctx.links[srv]
    count = np.array([seen], np.int64)
    last_piece = {s.var: p for p, piece in enumerate(layout) for s in piece}
    held: dict[int, np.ndarray] = {}
    for p, piece in enumerate(layout):
        out = []
        for s in piece:
            if s.var not in held:
                # np.asarray of the read tensor, not .numpy(): no extra copy (2-3x faster on 94 MB). The
                # views are gone (frames are copies) before the pieces are written back, so nothing aliases
                # the variable then; if something did, TensorFlow would copy on write, not corrupt it.
                held[s.var] = np.asarray(variables[s.var].read_value())
            out.append(_seg_view(held, s))
        link.send_arrays(send_flow, keys.piece(r, p), [*out, count])
        del out
        for s in piece:
            if last_piece[s.var] == p:
                del held[s.var]
    for p, piece in enumerate(layout):
        key = keys.piece(r, p)
        arrays = ctx.wait(partial(link.recv_arrays, recv_flow, key), srv)
        parts, _ = _parse_piece(arrays, piece, shapes, names, srv, r, p)
        for s, a in zip(piece, parts, strict=True):
            v = variables[s.var]
            if s.rows is None:
                v.assign(a)
            else:
                v.scatter_update(tf.IndexedSlices(a, tf.range(s.rows[0], s.rows[1], dtype=tf.int64)))
        del arrays, parts  # the received buffer


def _encode_grads(grads: list[Any], variables: list[Any]) -> list[np.ndarray]:
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


def _drop_copies(link: Any, flow: str, key: int) -> None:
    """Remove further resume-weights messages under ``key`` (an agreement interrupted by a rollback can leave
    one unread; it holds the same step's weights and would keep a full copy of the model alive)."""
    from fldsl.runtime.transport import TransportError

    while True:
        try:
            link.recv_arrays(flow, key, 0)
        except (TimeoutError, TransportError):
            return


def _holdout_logits(plan: Plan, predict: Callable[[dict[str, Any]], Any], inputs: dict[str, np.ndarray],
                    n: int) -> np.ndarray | None:
    """The model's logits for the ``n`` holdout (or test) rows, in evaluation batches; None when n is 0."""
    b = max(plan.train.batch_size, 1024)
    logits = [predict({k: v[i:i + b] for k, v in inputs.items()}).numpy() for i in range(0, n, b)]
    return np.concatenate(logits) if logits else None


# ---------------------------------------------------------------------------------------------------------
# the aggregator's metrics: every worker's holdout summary, combined (layout: fldsl.stdlib.tf.metrics)
# ---------------------------------------------------------------------------------------------------------


def _stats_flows(ctx: RoleContext, src: str, dst: str) -> list[Flow]:
    return [f for f in ctx.policy.flows if f.src == src and f.dst == dst and f.kind == "stats"]


def _recv_stats(ctx: RoleContext, flow: Flow) -> np.ndarray:
    """A `stats` message, checked: the flow guard fixed its dtype and shape; the values must be statistics
    (finite, whole non-negative counts, min <= max where there are values) or the sender is refused."""
    x = ctx.wait(lambda t: ctx.links[flow.src].recv(flow.id, STATS_KEY, t), flow.src)
    counts = x[:, [0, 5]] if x.ndim == 2 and x.shape[1] == 6 else None
    bad = counts is None or not np.isfinite(x).all() or (counts < 0).any() \
        or (counts != np.round(counts)).any() or (x[:, 2] < 0).any() \
        or ((x[:, 0] > 0) & (x[:, 3] > x[:, 4])).any()
    if bad:
        raise PeerLimitExceeded(f"{flow.src} sent preprocessing statistics that are not statistics (a count "
                                "that is negative or not whole, a negative spread, min above max, or a value "
                                "that is not finite): refusing", peer=flow.src)
    return x


def _pool_stats(ctx: RoleContext, srv: str, train_ds: str, table: Any,
                train_rows: np.ndarray) -> dict[str, np.ndarray] | None:
    """Worker: send the statistics of this worker's pooled training columns, get the merge back (None: the
    pipeline pools none)."""
    from fldsl.runtime.preprocess import local_stats

    up, down = _stats_flows(ctx, ctx.node, srv), _stats_flows(ctx, srv, ctx.node)
    if not up or not down:
        return None
    spec = next(d for d in ctx.plan.data if d.name == train_ds)
    ctx.progress.emit("phase", name="pool statistics")
    ctx.links[srv].send(up[0].id, STATS_KEY, local_stats(spec, table.raw, train_rows))
    return {train_ds: _recv_stats(ctx, down[0])}


def _merge_stats(ctx: RoleContext, workers: list[str]) -> None:
    """Server: merge the workers' statistics (in the plan's worker order: every worker gets the same
    bytes) and send the merge to each. Nothing when the pipeline pools none."""
    from fldsl.runtime.preprocess import merge_stats

    ups = [f for w in workers for f in _stats_flows(ctx, w, ctx.node)]
    if not ups:
        return
    merged = merge_stats([_recv_stats(ctx, f) for f in ups])
    for w in workers:
        for f in _stats_flows(ctx, ctx.node, w):
            ctx.links[w].send(f.id, STATS_KEY, merged)


def _summary_flow(ctx: RoleContext, worker: str, server: str) -> Flow | None:
    """The worker's `metrics` flow to the aggregator when it carries holdout summaries (a float64[1 + 2K,
    bins] spec). None for a build compiled before the summaries, whose flow had no spec: then neither side
    sends or waits for one, and the aggregator reports no holdout metrics, as before."""
    for f in ctx.policy.flows:
        if f.src == worker and f.dst == server and f.kind == "metrics":
            spec = f.spec
            if spec is not None and spec.dtype == "float64" and len(spec.shape) == 2 \
                    and all(isinstance(d, int) and d > 0 for d in spec.shape):
                return f
    return None


def _summary_shape(flow: Flow) -> tuple[int, int]:
    assert flow.spec is not None
    rows, bins = flow.spec.shape
    assert rows is not None and bins is not None
    return rows, bins


def _send_summary(ctx: RoleContext, flow: Flow, r: int, logits: np.ndarray | None, labels: np.ndarray,
                  train_losses: list[float]) -> None:
    """A worker's epoch summary, sent under the epoch's last round ``r`` (also with no holdout rows: the
    aggregator waits for every worker's)."""
    from fldsl.stdlib.tf import metrics as M

    plan = ctx.plan
    assert plan.loss is not None
    if logits is None:
        logits, labels = np.zeros((0, 1)), labels[:0]
    try:
        summary = M.holdout_summary(plan.loss.op, logits, labels, _summary_shape(flow), train_losses)
    except ValueError as e:
        raise RoleError(f"{plan.node}: {e}; recompile the pipeline (`fldsl compile`)") from None
    ctx.links[flow.dst].send_arrays(flow.id, r, [summary])


def _recv_summary(ctx: RoleContext, flow: Flow, r: int) -> np.ndarray:
    """Worker ``flow.src``'s summary of the epoch ending at round ``r``, checked before it is used: a
    message that is not exactly one well-formed summary of the flow's shape is refused naming the worker
    (exit code 3), as an upload of the wrong shape is. The flow guard has already bounded its size."""
    from fldsl.stdlib.tf import metrics as M

    w = flow.src
    arrays = ctx.wait(lambda t: ctx.links[w].recv_arrays(flow.id, r, t), w)
    why = f"{len(arrays)} arrays, not one summary" if len(arrays) != 1 else \
        M.summary_problem(np.asarray(arrays[0]), _summary_shape(flow))
    if why is not None:
        raise PeerProtocolError(f"{w} sent a malformed metrics message for the epoch ending at round {r}: "
                                f"{why}; refusing it")
    return np.asarray(arrays[0])


def _combined_metrics(ctx: RoleContext, flows: list[Flow], r: int) -> dict[str, Any]:
    """The model's metrics over all the workers' holdout rows (docs/language.md, "Training"): loss and
    accuracy exact, auc from the binned histograms (within the bound binned_auc gives)."""
    from fldsl.stdlib.tf import metrics as M

    summaries = [_recv_summary(ctx, f, r) for f in flows]
    metrics, _ = M.combine_summaries(list[str](ctx.plan.train.metrics), summaries)
    return metrics

