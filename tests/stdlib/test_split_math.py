"""The math the vertical runtime relies on: a model split across two parties, with the cut gradient passed
by hand (``tape.gradient(act, vars, output_gradients=grad)``), takes exactly the step the joined model
takes when trained centrally."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from fldsl.artifacts import OptimizerSpec
from fldsl.stdlib.tf import build_segment, loss_fn, make_optimizer

from .helpers import op, spec

BOTTOM = [  # at party A (passive): its own features -> act1
    op("emb_a", "embed", ["a.sparse"], 6 * 4, buckets=20, dim=4),
    op("cat_a", "concat", ["emb_a", "a.features"], 24 + 3),
    op("act1", "mlp", ["cat_a"], 8, units=[16, 8]),
]
TOP = [  # at party B (active, labels): act1 ++ its own features -> logits
    op("cat_b", "concat", ["act1", "b.features"], 8 + 4, party="b"),
    op("logits", "dense", ["cat_b"], 2, party="b", units=[8, 2]),
]
SPECS_A = {"a.sparse": spec(6, "int64"), "a.features": spec(3)}
SPECS_B = {"b.features": spec(4), "act1": spec(8)}


def _data(n: int = 32) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(4)
    x = {"a.sparse": rng.integers(0, 1000, (n, 6)),
         "a.features": rng.standard_normal((n, 3)).astype(np.float32),
         "b.features": rng.standard_normal((n, 4)).astype(np.float32)}
    return x, rng.integers(0, 2, n)


@pytest.mark.parametrize("opt", [OptimizerSpec(name="sgd", params={"learning_rate": 0.5}),
                                 OptimizerSpec(name="adam", params={"learning_rate": 0.01}),
                                 OptimizerSpec(name="adagrad", params={"learning_rate": 0.1})])
def test_split_step_equals_joined_step(opt: OptimizerSpec) -> None:
    x, y = _data()
    loss = loss_fn("softmax_cross_entropy")

    # Joined model, one central step.
    joined = build_segment(BOTTOM + TOP, {**SPECS_A, "b.features": spec(4)}, seed=9)
    jv = list(joined.trainable_variables)
    jopt = make_optimizer(opt)
    with tf.GradientTape() as tape:
        value_joined = loss(joined(x)["logits"], y)
    jopt.apply(tape.gradient(value_joined, jv), jv)

    # Split: A forwards act1, B computes the loss and returns d loss / d act1, A back-propagates it.
    a = build_segment(BOTTOM, SPECS_A, seed=9)
    b = build_segment(TOP, SPECS_B, seed=9)
    aopt, bopt = make_optimizer(opt), make_optimizer(opt)
    av, bv = list(a.trainable_variables), list(b.trainable_variables)
    with tf.GradientTape() as tape_a:
        act1 = a({k: x[k] for k in SPECS_A})["act1"]
    sent = tf.constant(act1.numpy())  # what crosses the wire
    with tf.GradientTape() as tape_b:
        tape_b.watch(sent)
        value_split = loss(b({"b.features": x["b.features"], "act1": sent})["logits"], y)
    grads_b = tape_b.gradient(value_split, [*bv, sent])
    bopt.apply(grads_b[:-1], bv)
    grad_act1 = tf.constant(grads_b[-1].numpy())  # what crosses back
    aopt.apply(tape_a.gradient(act1, av, output_gradients=grad_act1), av)

    assert float(value_split) == pytest.approx(float(value_joined), abs=1e-6)
    joined_w = dict(zip(joined.weight_names, joined.get_weights(), strict=True))
    split_w = {**dict(zip(a.weight_names, a.get_weights(), strict=True)),
               **dict(zip(b.weight_names, b.get_weights(), strict=True))}
    assert sorted(joined_w) == sorted(split_w)
    moved = 0
    for name, w in joined_w.items():
        np.testing.assert_allclose(split_w[name], w, atol=1e-6, rtol=0, err_msg=name)
        moved += int(not np.allclose(w, build_segment(BOTTOM + TOP, {**SPECS_A, "b.features": spec(4)}, 9)
                                     .get_weights()[joined.weight_names.index(name)]))
    assert moved == len(joined_w)  # every variable took a step: the check above is not vacuous
