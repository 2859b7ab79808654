"""Shapes and semantics of every stdlib op, deterministic weights, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from fldsl.stdlib.tf import SegmentError, build_segment

from .helpers import op, spec

SPECS = {"d.dense": spec(13), "d.sparse": spec(26, "int64"), "d.features": spec(5)}


def _batch(b: int = 7, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"d.dense": rng.random((b, 13), dtype=np.float32),
            "d.sparse": rng.integers(-(10**6), 10**6, (b, 26)),
            "d.features": rng.random((b, 5), dtype=np.float32)}


ALL_OPS = [
    op("e", "embed", ["d.sparse"], 26 * 4, buckets=50, dim=4),
    op("m", "mlp", ["d.features"], 3, units=[8, 3]),
    op("c", "concat", ["e", "m", "d.dense"], 104 + 3 + 13),
    op("l", "dense", ["c"], 2, units=[16, 2]),
    op("w", "wide_deep", ["d.sparse", "d.dense"], 1, buckets=100, embedding_dim=8, hidden=[16, 8]),
    op("w1", "wide_deep", ["d.sparse"], 1, buckets=100, embedding_dim=4, hidden=[8]),
    op("r", "dlrm", ["d.dense", "d.sparse"], 3, buckets=1000, embedding_dim=8, bottom=[16, 8], top=[16, 3]),
]


def test_every_op_output_has_the_planned_shape_eagerly_and_in_tf_function() -> None:
    seg = build_segment(ALL_OPS, SPECS, seed=3)
    x = _batch(7)
    eager = seg(x)
    graph = tf.function(lambda inputs: seg(inputs))(x)
    for call in ALL_OPS:
        assert eager[call.output].shape == (7, call.spec.shape[1]), call.output
        assert eager[call.output].dtype == tf.float32
        np.testing.assert_allclose(eager[call.output].numpy(), graph[call.output].numpy(),
                                   rtol=1e-5, atol=1e-6)


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    a = build_segment(ALL_OPS, SPECS, seed=11).get_weights()
    b = build_segment(ALL_OPS, SPECS, seed=11).get_weights()
    c = build_segment(ALL_OPS, SPECS, seed=12).get_weights()
    assert len(a) == len(b) == len(c)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True) if np.any(x))


def test_weights_depend_on_the_op_not_on_what_else_is_in_the_segment() -> None:
    # The vertical runtime builds each party's ops alone; they must start from the joined model's weights.
    joined = build_segment(ALL_OPS, SPECS, seed=5)
    alone = build_segment([ALL_OPS[1]], SPECS, seed=5)
    pairs = zip(joined.weight_names, joined.get_weights(), strict=True)
    m_weights = [w for n, w in pairs if n.startswith("m/")]
    for x, y in zip(m_weights, alone.get_weights(), strict=True):
        np.testing.assert_array_equal(x, y)


def test_variable_order_is_plan_order() -> None:
    seg = build_segment(ALL_OPS[:4], SPECS, seed=0)
    assert seg.weight_names == ["e/table", "m/layer0/kernel", "m/layer0/bias", "m/layer1/kernel",
                                "m/layer1/bias", "l/layer0/kernel", "l/layer0/bias", "l/layer1/kernel",
                                "l/layer1/bias"]
    assert [v.shape for v in seg.trainable_variables] == [w.shape for w in seg.get_weights()]
    assert seg.input_refs == ["d.sparse", "d.features", "d.dense"]


def test_embed_is_one_table_per_column_modulo_buckets_in_column_order() -> None:
    call = op("e", "embed", ["x.ids"], 3 * 2, buckets=10, dim=2)
    seg = build_segment([call], {"x.ids": spec(3, "int64")}, 0)
    table = seg.get_weights()[0]
    assert table.shape == (30, 2)
    ids = np.array([[3, 13, -1], [0, 9, 25]])
    out = seg({"x.ids": ids})["e"].numpy()
    want = np.stack([np.concatenate([table[c * 10 + (v % 10)] for c, v in enumerate(row)]) for row in ids])
    np.testing.assert_array_equal(out, want)


def test_mlp_activates_every_layer_dense_not_the_last() -> None:
    specs = {"x.f": spec(4)}
    x = {"x.f": -np.abs(np.random.default_rng(1).random((64, 4), dtype=np.float32)) * 10}
    m = build_segment([op("h", "mlp", ["x.f"], 3, units=[5, 3])], specs, 0)
    d = build_segment([op("h", "dense", ["x.f"], 3, units=[5, 3])], specs, 0)
    assert m({"x.f": x["x.f"]})["h"].numpy().min() >= 0.0  # relu on the output layer
    assert d({"x.f": x["x.f"]})["h"].numpy().min() < 0.0  # logits can be negative
    # Same weights (same output name), so dense == mlp before the last relu.
    np.testing.assert_allclose(np.maximum(d(x)["h"].numpy(), 0), m(x)["h"].numpy(), atol=1e-6)


def test_dlrm_interaction_is_upper_triangle_without_diagonal() -> None:
    seg = build_segment([ALL_OPS[-1]], SPECS, seed=0)
    first_top_kernel = seg.get_weights()[seg.weight_names.index("r/top/layer0/kernel")]
    assert first_top_kernel.shape[0] == 8 + 27 * 26 // 2  # bottom output ++ 351 pairwise dots


def test_wide_deep_wide_part_is_a_sum_of_per_id_weights() -> None:
    call = op("w", "wide_deep", ["x.ids"], 1, buckets=7, embedding_dim=2, hidden=[4])
    seg = build_segment([call], {"x.ids": spec(2, "int64")}, 0)
    weights = seg.get_weights()
    names = seg.weight_names
    ids = np.array([[1, 2], [3, 4]])
    base = seg({"x.ids": ids})["w"].numpy()
    wide = weights[names.index("w/wide/table")].copy()
    wide[1, 0] += 1.0  # column 0, id 1: only row 0 uses it
    weights[names.index("w/wide/table")] = wide
    seg.set_weights(weights)
    after = seg({"x.ids": ids})["w"].numpy()
    np.testing.assert_allclose(after - base, [[1.0], [0.0]], atol=1e-6)


@pytest.mark.parametrize(("calls", "message"), [
    ([op("x", "conv", ["d.dense"], 3)], "unknown stdlib op `conv`"),
    ([op("x", "mlp", ["d.nope"], 3, units=[3])], "input `d.nope` has no spec"),
    ([op("x", "mlp", ["d.dense"], 3, units=[])], "non-empty list of positive integers"),
    ([op("x", "mlp", ["d.dense"], 3, units=[3], activation="relu6")], "unknown activation `relu6`"),
    ([op("x", "mlp", ["d.dense"], 3, units=[3], size=4)], "unknown parameter(s) size"),
    ([op("x", "mlp", ["d.dense"], 4, units=[3])], "the plan says shape [None, 4]"),
    ([op("x", "embed", ["d.dense"], 13 * 16, buckets=5)], "must be int32/int64"),
    ([op("x", "embed", ["d.sparse"], 26 * 16)], "missing parameter `buckets`"),
    ([op("x", "dlrm", ["d.dense", "d.sparse"], 1, embedding_dim=8, bottom=[16, 4], top=[1])],
     "last bottom width (4) must equal embedding_dim (8)"),
])
def test_bad_ops_fail_with_a_message_naming_the_op(calls: list, message: str) -> None:
    with pytest.raises(SegmentError) as e:
        build_segment(calls, SPECS, seed=0)
    assert message in str(e.value)


def test_set_weights_checks_count_and_shapes() -> None:
    seg = build_segment(ALL_OPS[:2], SPECS, seed=0)
    w = seg.get_weights()
    with pytest.raises(SegmentError, match="expected 5 arrays"):
        seg.set_weights(w[:-1])
    w[1] = np.zeros((2, 2), np.float32)
    with pytest.raises(SegmentError, match=r"`m/layer0/kernel` has shape \(5, 8\)"):
        seg.set_weights(w)


def test_missing_input_at_call_time_is_named() -> None:
    seg = build_segment(ALL_OPS[:2], SPECS, seed=0)
    with pytest.raises(SegmentError, match=r"segment input `d\.features` was not given"):
        seg({"d.sparse": np.zeros((2, 26), np.int64)})


def test_weight_names_ignore_enclosing_name_scopes_and_keep_slashes() -> None:
    call = op("act1/embed", "embed", ["d.sparse"], 26 * 2, buckets=5, dim=2)
    with tf.name_scope("node"):
        seg = build_segment([call], SPECS, seed=0)
    assert seg.weight_names == ["act1/embed/table"]
