"""Sync parameter server with embedding tables: sparse gradient uploads (indices + rows) give the same model
as dense uploads, for optimisers applied row-wise at the server (SGD, Adagrad: exact) and densely (Adam)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import buildkit
import memlink

from fldsl.runtime.roles import horizontal
from fldsl.runtime.roles.aggregate import Average
from fldsl.runtime.roles.hwire import SparseRows


def test_sparse_parts_fold_like_their_dense_arrays() -> None:
    rng = np.random.default_rng(2)
    shape = (50, 4)
    dense_avg, sparse_avg = Average(), Average()
    ups = []
    for _ in range(3):
        idx = rng.choice(shape[0], size=12, replace=False).astype(np.int64)
        rows = rng.normal(size=(12, 4)).astype(np.float32)
        full = np.zeros(shape, np.float32)
        full[idx] = rows
        ups.append((SparseRows(idx, rows, shape), full))
    for sp, full in ups:
        sparse_avg.fold([sp], 3.0)
        dense_avg.fold([full], 3.0)
    np.testing.assert_allclose(sparse_avg.acc[0], dense_avg.acc[0], rtol=0, atol=1e-6)
    union = np.unique(np.concatenate([sp.indices for sp, _ in ups]))
    np.testing.assert_array_equal(sparse_avg.touched(0), union)
    assert dense_avg.touched(0) is None
    # One dense upload makes the variable dense for the round.
    sparse_avg.reset()
    sparse_avg.fold([ups[0][0]], 1.0)
    sparse_avg.fold([ups[1][1]], 1.0)
    assert sparse_avg.touched(0) is None


def _dlrm_build(root: Path, optimizer: str) -> Path:
    build = buildkit.horizontal_build(root, mode="sync", epochs=1, rows=400, batch=32)
    for plan_file in (build / "nodes").glob("*/plan.json"):
        doc = json.loads(plan_file.read_text())
        for ds in doc["data"]:
            ds["fields"]["sparse"] = {"shape": [None, 26], "dtype": "int64"}
        op = doc["model"][0]
        op.update(op="dlrm", inputs=["clicks.dense", "clicks.sparse"],
                  params={"buckets": 1000, "embedding_dim": 4, "bottom": [8, 4], "top": [8, 2]})
        doc["train"]["optimizer"] = {"name": optimizer, "params": {"learning_rate": 0.05}}
        plan_file.write_text(json.dumps(doc))
    return build


def _hub_weights(run_dir: Path) -> list[np.ndarray]:
    from fldsl.runtime import sealing

    data = sealing.unseal_file(run_dir / "models" / "hub.ps_model.sealed", key=memlink.KEY, node_id="hub.ps",
                               name="hub.ps/model")
    with np.load(io.BytesIO(data)) as npz:
        return [npz[k] for k in sorted(npz.files)]


def _dense_only(grads, variables):
    """The upload as before sparse encoding: every gradient dense."""
    out = []
    for g, v in zip(grads, variables, strict=True):
        if isinstance(g, tuple):
            dense = np.zeros(tuple(v.shape), np.float32)
            np.add.at(dense, g[0].numpy(), g[1].numpy())
            out.append(dense)
        else:
            out.append(g.numpy())
    return [*out, np.zeros(len(variables), np.int8)]


def _upload_bytes(res: dict) -> int:
    link = res["bank1.worker"]["_links"]["hub.ps"]
    return sum(n for f, n in link.sent.items() if f.endswith(":gradients"))


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
def test_sparse_uploads_train_the_same_model(tmp_path: Path, optimizer: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    build = _dlrm_build(tmp_path, optimizer)
    sparse = memlink.run_in_threads(build, tmp_path / "sparse")
    assert all(not isinstance(r, BaseException) for r in sparse.values()), sparse
    with monkeypatch.context() as m:
        m.setattr(horizontal, "encode_grads", _dense_only)
        dense = memlink.run_in_threads(build, tmp_path / "dense")
    assert all(not isinstance(r, BaseException) for r in dense.values()), dense
    # 32 rows x 26 columns touch at most 832 of the 26,000 table rows: the upload shrinks by far.
    assert _upload_bytes(sparse) < 0.3 * _upload_bytes(dense)
    # The two encodings fold in a different float32 order (a few ulps of the averaged gradient). Adam divides
    # by sqrt(v): on rows with near-zero gradients that rounding shows up to ~5e-6 absolute after a few steps
    # (a lazy, row-wise Adam would differ by ~lr = 5e-2 on every row touched once and then left alone).
    atol = 2e-5 if optimizer == "adam" else 1e-6
    for x, y in zip(_hub_weights(tmp_path / "sparse"), _hub_weights(tmp_path / "dense"), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=atol)
    assert sparse["bank1.worker"]["metrics"]["auc"] == pytest.approx(dense["bank1.worker"]["metrics"]["auc"],
                                                                    abs=1e-5)


@pytest.mark.parametrize(("name", "params"), [
    ("sgd", {"learning_rate": 0.1}), ("sgd", {"learning_rate": 0.1, "momentum": 0.9}),
    ("adagrad", {"learning_rate": 0.1}), ("adam", {"learning_rate": 0.1}),
])
def test_sparse_is_exact_says_when_row_wise_equals_dense(name: str, params: dict) -> None:
    """The server applies row-wise only where ``sparse_is_exact``: check that against the dense update."""
    import tensorflow as tf

    from fldsl.artifacts import OptimizerSpec
    from fldsl.stdlib.tf.optim import make_optimizer

    rng = np.random.default_rng(3)
    init = rng.normal(size=(20, 3)).astype(np.float32)
    sparse_var, dense_var = tf.Variable(init), tf.Variable(init)
    sparse_opt = make_optimizer(OptimizerSpec(name=name, params=params))
    dense_opt = make_optimizer(OptimizerSpec(name=name, params=params))
    for step in range(3):
        idx = np.array([step, 5 + step, 10], np.int64)  # rows 0..2 and 5..7 are touched once, then not
        rows = rng.normal(size=(3, 3)).astype(np.float32)
        full = np.zeros_like(init)
        full[idx] = rows
        sparse_opt.apply([tf.IndexedSlices(tf.constant(rows), tf.constant(idx), tf.constant([20, 3]))],
                         [sparse_var])
        dense_opt.apply([tf.constant(full)], [dense_var])
    same = np.allclose(sparse_var.numpy(), dense_var.numpy(), rtol=1e-6, atol=1e-7)
    assert same == sparse_opt.sparse_is_exact()
