"""Optimisers: dense math identical to Keras 3, lazy sparse updates for embedding tables, exact state I/O."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from fldsl.artifacts import OptimizerSpec
from fldsl.stdlib.tf import make_optimizer
from fldsl.stdlib.tf.optim import OptimizerError


@pytest.mark.parametrize(("name", "params", "reference"), [
    ("adam", {"learning_rate": 0.01}, lambda: keras.optimizers.Adam(0.01)),
    ("sgd", {"learning_rate": 0.1}, lambda: keras.optimizers.SGD(0.1)),
    ("sgd", {"learning_rate": 0.1, "momentum": 0.9}, lambda: keras.optimizers.SGD(0.1, momentum=0.9)),
    ("sgd", {"learning_rate": 0.1, "momentum": 0.9, "nesterov": True},
     lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True)),
    ("adagrad", {"learning_rate": 0.1}, lambda: keras.optimizers.Adagrad(0.1)),
])
def test_dense_update_matches_keras(name: str, params: dict, reference) -> None:
    opt = make_optimizer(OptimizerSpec(name=name, params=params))
    ref = reference()
    w0 = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    ours, theirs = tf.Variable(w0), tf.Variable(w0)
    step = tf.function(lambda g: opt.apply([g], [ours]))
    for i in range(4):
        g = tf.constant(np.random.default_rng(i + 1).standard_normal((5, 3)).astype(np.float32))
        step(g)
        ref.apply_gradients([(g, theirs)])
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-6)
    assert not np.allclose(ours.numpy(), w0)


def _table_grad(table: tf.Variable, ids: np.ndarray) -> tf.IndexedSlices:
    with tf.GradientTape() as tape:
        value = tf.reduce_sum(tf.square(tf.gather(table, ids)))
    g = tape.gradient(value, table)
    assert isinstance(g, tf.IndexedSlices)  # what a gather gives: the optimiser must keep it sparse
    return g


def test_lazy_adam_touches_only_batch_rows_and_matches_dense_adam_on_them_at_step_one() -> None:
    rng = np.random.default_rng(2)
    w0 = rng.standard_normal((1000, 8)).astype(np.float32)
    sparse_var, dense_var = tf.Variable(w0), tf.Variable(w0)
    lazy = make_optimizer(OptimizerSpec(name="adam", params={"learning_rate": 0.05}))
    dense = make_optimizer(OptimizerSpec(name="adam", params={"learning_rate": 0.05}))
    ids = np.array([3, 17, 17, 500])  # a repeated id: its gradients must be summed
    g = _table_grad(sparse_var, ids)
    lazy.apply([g], [sparse_var])
    dense.apply([tf.convert_to_tensor(g)], [dense_var])
    touched = np.unique(ids)
    untouched = np.setdiff1d(np.arange(1000), touched)
    np.testing.assert_array_equal(sparse_var.numpy()[untouched], w0[untouched])
    np.testing.assert_allclose(sparse_var.numpy()[touched], dense_var.numpy()[touched], atol=1e-6)
    assert not np.allclose(sparse_var.numpy()[touched], w0[touched])
    # Slots too: only the touched rows have moments.
    m = lazy.slot(sparse_var, "m").numpy()
    assert np.count_nonzero(np.abs(m).sum(axis=1)) == touched.size

    # Step two on other rows: dense Adam keeps moving rows 3/17/500 with momentum, lazy Adam does not.
    before = sparse_var.numpy().copy()
    ids2 = np.array([42, 43])
    lazy.apply([_table_grad(sparse_var, ids2)], [sparse_var])
    dense.apply([tf.convert_to_tensor(_table_grad(dense_var, ids2))], [dense_var])
    np.testing.assert_array_equal(sparse_var.numpy()[touched], before[touched])
    assert not np.allclose(dense_var.numpy()[touched], before[touched])


@pytest.mark.parametrize("name", ["sgd", "adagrad"])
def test_sparse_sgd_and_adagrad_equal_dense_on_touched_rows(name: str) -> None:
    w0 = np.random.default_rng(3).standard_normal((50, 4)).astype(np.float32)
    a, b = tf.Variable(w0), tf.Variable(w0)
    oa = make_optimizer(OptimizerSpec(name=name, params={"learning_rate": 0.1}))
    ob = make_optimizer(OptimizerSpec(name=name, params={"learning_rate": 0.1}))
    ids = np.array([1, 1, 7])
    g = _table_grad(a, ids)
    oa.apply([g], [a])
    ob.apply([tf.convert_to_tensor(g)], [b])
    np.testing.assert_allclose(a.numpy()[[1, 7]], b.numpy()[[1, 7]], atol=1e-6)
    np.testing.assert_array_equal(a.numpy()[[0, 2, 49]], w0[[0, 2, 49]])


def test_state_round_trip_resumes_identically() -> None:
    spec = OptimizerSpec(name="adam", params={"learning_rate": 0.02})
    rng = np.random.default_rng(5)
    w0 = rng.standard_normal((20, 3)).astype(np.float32)
    grads = [rng.standard_normal((20, 3)).astype(np.float32) for _ in range(6)]
    # Uninterrupted: 6 steps.
    v = tf.Variable(w0)
    o = make_optimizer(spec)
    for g in grads:
        o.apply([tf.constant(g)], [v])
    # Interrupted after 3: save weights + state, restore into fresh objects, 3 more.
    v1 = tf.Variable(w0)
    o1 = make_optimizer(spec)
    for g in grads[:3]:
        o1.apply([tf.constant(g)], [v1])
    saved_w, saved_state = v1.numpy(), o1.get_state()
    assert int(saved_state[0]) == 3 and len(saved_state) == 3  # iterations, m, v
    v2 = tf.Variable(saved_w)
    o2 = make_optimizer(spec)
    o2.set_state(saved_state, [v2])
    for g in grads[3:]:
        o2.apply([tf.constant(g)], [v2])
    np.testing.assert_allclose(v2.numpy(), v.numpy(), atol=1e-7)
    with pytest.raises(OptimizerError, match="needs 3"):
        o2.set_state(saved_state[:2])


@pytest.mark.parametrize(("spec", "message"), [
    (OptimizerSpec(name="adam", params={"lr": 0.1}), "unknown parameter(s) lr"),
    (OptimizerSpec(name="sgd", params={"learning_rate": -1}), "non-negative number"),
    (OptimizerSpec(name="sgd", params={"learning_rate": 0}), "learning_rate must be positive"),
    (OptimizerSpec(name="sgd", params={"nesterov": "yes"}), "must be true or false"),
])
def test_bad_optimizer_params_are_named(spec: OptimizerSpec, message: str) -> None:
    with pytest.raises(OptimizerError) as e:
        make_optimizer(spec)
    assert message in str(e.value)
