"""Exact AUC (ties count one half) and accuracy; losses are batch means of the textbook formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from fldsl.stdlib.tf import accuracy, auc, loss_fn, scores
from fldsl.stdlib.tf.metrics import ScoreAccumulator, evaluate_logits, macro_auc


def _pairwise_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (pos.size * neg.size))


@pytest.mark.parametrize("seed", range(4))
def test_auc_equals_the_pairwise_definition_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) + 0.3 * y, 1)  # rounding makes many ties
    assert auc(y, s) == pytest.approx(_pairwise_auc(y, s), abs=1e-12)


def test_auc_edge_cases() -> None:
    assert auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert auc(np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.3, 0.4])) == 0.0
    assert auc(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert math.isnan(auc(np.array([1, 1]), np.array([0.1, 0.2])))
    with pytest.raises(ValueError, match="0 or 1"):
        auc(np.array([0, 2]), np.array([0.1, 0.2]))


def test_accuracy_from_probabilities_and_class_scores() -> None:
    assert accuracy(np.array([1, 0, 1]), np.array([0.9, 0.4, 0.2])) == pytest.approx(2 / 3)
    assert accuracy(np.array([2, 0]), np.array([[0.1, 0.2, 0.7], [0.5, 0.4, 0.1]])) == 1.0


def test_accumulator_weights_the_loss_by_batch_size() -> None:
    acc = ScoreAccumulator()
    acc.add(np.array([0, 1]), np.array([0.2, 0.8]), loss=1.0)
    acc.add(np.array([1, 0, 0, 1]), np.array([0.6, 0.1, 0.7, 0.9]), loss=4.0)
    out = acc.result(("loss", "auc", "accuracy"))
    assert out["loss"] == pytest.approx((2 * 1.0 + 4 * 4.0) / 6)
    y = np.array([0, 1, 1, 0, 0, 1])
    s = np.array([0.2, 0.8, 0.6, 0.1, 0.7, 0.9])
    assert out["auc"] == pytest.approx(_pairwise_auc(y, s))
    assert out["accuracy"] == pytest.approx(5 / 6)


def test_losses_are_batch_means() -> None:
    logits = np.array([[2.0, -1.0], [0.5, 0.5], [-3.0, 1.0]], np.float32)
    labels = np.array([0, 1, 1])
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    want = -np.mean(np.log(p[np.arange(3), labels]))
    assert float(loss_fn("softmax_cross_entropy")(logits, labels)) == pytest.approx(want, rel=1e-5)

    z = np.array([[1.5], [-0.5], [0.0]], np.float32)
    sig = 1 / (1 + np.exp(-z[:, 0]))
    want = -np.mean(labels * np.log(sig) + (1 - labels) * np.log(1 - sig))
    assert float(loss_fn("sigmoid_cross_entropy")(z, labels)) == pytest.approx(want, rel=1e-5)

    y = np.array([1.0, 2.0, -1.0], np.float32)
    assert float(loss_fn("mse")(z, y)) == pytest.approx(np.mean((z[:, 0] - y) ** 2), rel=1e-5)
    with pytest.raises(ValueError, match="unknown loss `hinge`"):
        loss_fn("hinge")


def test_scores_are_positive_class_probabilities() -> None:
    logits = tf.constant([[0.0, 2.0], [1.0, -1.0]])
    s = scores("softmax_cross_entropy", logits).numpy()
    np.testing.assert_allclose(s, tf.nn.softmax(logits)[:, 1].numpy())
    assert scores("sigmoid_cross_entropy", tf.constant([[0.0]])).numpy().tolist() == [0.5]
    assert scores("softmax_cross_entropy", tf.zeros((2, 3))).shape == (2, 3)


def test_macro_auc_is_the_mean_of_one_vs_rest_aucs() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 4, 400)
    logits = rng.normal(size=(400, 4)) + 1.5 * np.eye(4)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    want = np.mean([_pairwise_auc((y == c).astype(int), p[:, c]) for c in range(4)])
    assert macro_auc(y, p) == pytest.approx(want, abs=1e-12)
    got = evaluate_logits("softmax_cross_entropy", ["loss", "auc", "accuracy"], logits, y)
    assert got["auc"] == pytest.approx(want, abs=1e-12) and 0.7 < got["auc"] < 1.0
    # A class with no rows has no one-vs-rest AUC: it is left out of the mean, not counted as NaN or 0.5.
    three = y[y < 3]
    want3 = np.mean([_pairwise_auc((three == c).astype(int), p[y < 3][:, c]) for c in range(3)])
    assert macro_auc(three, p[y < 3]) == pytest.approx(want3, abs=1e-12)


@pytest.mark.parametrize(("op", "width"), [("softmax_cross_entropy", 2), ("softmax_cross_entropy", 3),
                                           ("sigmoid_cross_entropy", 1), ("mse", 1)])
def test_evaluate_logits_loss_is_the_pipelines_loss_on_those_rows(op: str, width: int) -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(50, width)).astype(np.float32)
    labels = rng.integers(0, max(width, 2), 50)
    if op == "mse":
        labels = labels.astype(np.float32)
    got = evaluate_logits(op, ["loss", "auc", "accuracy"], logits, labels)
    assert got["loss"] == pytest.approx(float(loss_fn(op)(logits, labels)), rel=1e-5)
    if op == "mse":
        assert set(got) == {"loss"}
    else:
        assert set(got) == {"loss", "auc", "accuracy"}
    assert set(evaluate_logits(op, ["loss"], logits, labels)) == {"loss"}
