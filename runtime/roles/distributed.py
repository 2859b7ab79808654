"""Secure distributed training: a data owner (chief) shards its data round robin and streams the shards to
untrusted cloud workers over the attested channel (flow kind ``data``); workers and the parameter server
then train exactly as horizontal sync training (``horizontal.worker`` / ``horizontal.server``).

The chief streams every shard in full before it reports done; a worker's shard lives only in its memory
(and in its sealed checkpoints' alignment-free state: shards are re-streamed on a restart, which is cheap and
deterministic).
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import numpy as np

from fldsl.artifacts import TensorSpec
from fldsl.runtime.roles import horizontal
from fldsl.runtime.roles.common import (
    RoleContext,
    RoleError,
    configure_tf,
    fit_preprocessing,
    load_tables,
    pack_arrays,
    recv_chunked,
    seal_preprocessing,
    send_chunked,
    unpack_arrays,
)
from fldsl.runtime.transport import keys

# The compiler sizes the shard flow for a worker's whole shard (its rows times the fields' bytes, plus 16
# bytes a row for the id). Ids travel as fixed-width unicode, 4 bytes a character, so the shard a worker
# accepts is bounded by a few times that: a chief cannot make a worker buffer or expand more.
SHARD_SLACK = 4


def run(ctx: RoleContext) -> dict[str, Any]:
    if ctx.plan.role == "distributed.chief":
        return chief(ctx)
    configure_tf()
    if ctx.plan.role == "distributed.server":
        return horizontal.server(ctx)
    return _worker(ctx)


def _sharding(ctx: RoleContext):
    if ctx.plan.sharding is None:
        raise RoleError(f"{ctx.node}: the plan has no sharding section")
    return ctx.plan.sharding


def shard_rows(n: int, workers: int, index: int, strategy: str) -> np.ndarray:
    if strategy == "round_robin":
        return np.arange(index, n, workers, dtype=np.int64)
    bounds = np.linspace(0, n, workers + 1).astype(np.int64)
    return np.arange(bounds[index], bounds[index + 1], dtype=np.int64)


def chief(ctx: RoleContext) -> dict[str, Any]:
    plan = ctx.plan
    sh = _sharding(ctx)
    tables = load_tables(plan)
    fitted = _fit_for_workers(ctx, tables, len(sh.workers), sh.strategy)
    ctx.progress.emit("phase", name="shard", detail=f"{sh.strategy} to {len(sh.workers)} workers")
    sent = 0
    for k, w in enumerate(sh.workers):
        bundle: dict[str, np.ndarray] = {}
        if fitted:  # the workers export it with their model (it tells how a row becomes features)
            bundle[PREPROCESSING] = np.frombuffer(json.dumps(fitted, sort_keys=True).encode(), dtype=np.uint8)
        for name, t in sorted(tables.items()):
            rows = shard_rows(len(t.ids), len(sh.workers), k, sh.strategy)
            bundle[f"{name}/__ids__"] = np.asarray(t.ids)[rows].astype(str)
            for fld, arr in t.fields.items():
                bundle[f"{name}/{fld}"] = arr[rows]
            sent += len(rows)
        send_chunked(ctx, w, ctx.flow(plan.node, w, ("data",)), keys.data(), pack_arrays(bundle))
        ctx.progress.emit("step", step=k + 1, total=len(sh.workers))
    # The shards are sent; wait until each worker has them all before leaving (closing our end early would
    # cut a stream still being read). The worker's acknowledgement is a control message.
    for w in sh.workers:
        ctx.recv_json(w, keys.control(keys.Control.DATA_RECEIVED))
    return {"metrics": {"rows_sharded": sent}, "examples_per_s": 0.0, "steps": len(sh.workers)}


PREPROCESSING = "__preprocessing__"  # shard bundle member: the fitted preprocessing (JSON), if any


def _fit_for_workers(ctx: RoleContext, tables: dict[str, Any], workers: int, strategy: str) -> dict[str, Any]:
    """The chief holds the data, so it fits the declared preprocessing, on the rows the workers will train
    on: each shard less the holdout its worker splits off (the same seeded split), and shards the
    transformed features. A separate test set gets the training set's statistics."""
    from fldsl.runtime.data import stratified_split
    from fldsl.runtime.preprocess import needs_fit

    plan = ctx.plan
    if not any(needs_fit(ds) for ds in plan.data):
        return {}
    test = plan.train.validation.test_data
    frac = plan.train.validation.fraction
    train_rows: dict[str, np.ndarray] = {}
    for name, t in tables.items():
        if name == test:
            continue
        parts = []
        for k in range(workers):
            rows = shard_rows(len(t.ids), workers, k, strategy)
            if frac > 0 and test is None and "label" in t.fields:  # the chief's plan has no loss
                ids = np.asarray(t.ids)[rows].astype(str)
                tr, _ = stratified_split(ids, t.fields["label"][rows], frac, plan.train.validation.seed)
                pos = {i: r for i, r in zip(ids.tolist(), rows.tolist(), strict=True)}
                rows = np.array([pos[str(i)] for i in tr], dtype=np.int64)
            parts.append(rows)
        train_rows[name] = np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
    source = next((n for n in sorted(train_rows) if "label" in tables[n].fields), None)
    return fit_preprocessing(ctx, tables, train_rows, {test: source} if test and source else None)


def _worker(ctx: RoleContext) -> dict[str, Any]:
    plan = ctx.plan
    sh = _sharding(ctx)
    bundle = ctx.cache.get("shard")
    if bundle is None:  # a re-run after a peer restart keeps the shard: the chief has left by then
        ctx.progress.emit("phase", name="receive shard", detail=f"from {sh.chief}")
        flow = ctx.flow(sh.chief, plan.node, ("data",))
        limit = SHARD_SLACK * flow.max_bytes
        what = "its data shard"
        bundle = unpack_arrays(recv_chunked(ctx, sh.chief, flow, keys.data(), limit, what), sh.chief,
                               limit=limit, what=what)
        ctx.send_json(sh.chief, keys.control(keys.Control.DATA_RECEIVED), {"received": True})
        ctx.cache["shard"] = bundle
    fitted = bundle.get(PREPROCESSING)
    if fitted is not None and "preprocessing" not in ctx.cache:
        ctx.cache["preprocessing"] = json.loads(fitted.tobytes())
        if plan.export is None:
            seal_preprocessing(ctx, ctx.cache["preprocessing"])
    tables: dict[str, Any] = {}
    for ds in plan.data or []:
        tables[ds.name] = _table_from(bundle, ds.name, sh.chief)
    if not tables:  # the worker's plan may name the chief's data sets only through the model inputs
        names = sorted({k.split("/", 1)[0] for k in bundle if k != PREPROCESSING})
        tables = {n: _table_from(bundle, n, sh.chief) for n in names}
    specs = {f"{name}.{fld}": TensorSpec.model_validate({"shape": [None, *arr.shape[1:]],
                                                          "dtype": str(arr.dtype)})
             for name, t in tables.items() for fld, arr in t.fields.items()}
    return horizontal.worker(ctx, tables, specs)


def _table_from(bundle: dict[str, np.ndarray], name: str, chief: str) -> Any:
    ids_key = f"{name}/__ids__"
    if ids_key not in bundle:
        raise RoleError(f"{chief} sent no shard of data set `{name}`")
    fields = {k.split("/", 1)[1]: v for k, v in bundle.items() if k.startswith(f"{name}/") and k != ids_key}
    return SimpleNamespace(ids=bundle[ids_key], fields=fields)
