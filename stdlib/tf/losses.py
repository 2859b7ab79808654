"""Losses (mean over the batch) and the scores metrics are computed from.

- ``softmax_cross_entropy(logits[B,C], label int[B])``
- ``sigmoid_cross_entropy(logits[B,1], label[B])`` (labels 0/1, any numeric dtype)
- ``mse(pred[B,1], label[B])``
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from fldsl.artifacts import LossSpec

LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def _column(x: tf.Tensor) -> tf.Tensor:
    x = tf.convert_to_tensor(x)
    return tf.reshape(x, [-1]) if x.shape.rank == 2 else x


def softmax_cross_entropy(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    labels = tf.cast(_column(labels), tf.int64)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))


def sigmoid_cross_entropy(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    logits = _column(logits)
    labels = tf.cast(_column(labels), logits.dtype)
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))


def mse(pred: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    pred = _column(pred)
    labels = tf.cast(_column(labels), pred.dtype)
    return tf.reduce_mean(tf.square(pred - labels))


LOSSES: dict[str, LossFn] = {
    "softmax_cross_entropy": softmax_cross_entropy,
    "sigmoid_cross_entropy": sigmoid_cross_entropy,
    "mse": mse,
}


def _op(spec: LossSpec | str) -> str:
    op = spec if isinstance(spec, str) else spec.op
    if op not in LOSSES:
        raise ValueError(f"unknown loss `{op}` (known: {', '.join(sorted(LOSSES))})")
    return op


def loss_fn(spec: LossSpec | str) -> LossFn:
    """``callable(logits, labels) -> scalar`` (mean over the batch)."""
    return LOSSES[_op(spec)]


def scores(spec: LossSpec | str, logits: tf.Tensor) -> tf.Tensor:
    """What metrics are computed from: P(class 1) [B] for binary classifiers (softmax with 2 classes or
    sigmoid), class probabilities [B, C] for C > 2, the prediction [B] for mse."""
    op = _op(spec)
    logits = tf.convert_to_tensor(logits)
    if op == "softmax_cross_entropy":
        p = tf.nn.softmax(logits, axis=-1)
        return p[:, 1] if logits.shape[-1] == 2 else p
    if op == "sigmoid_cross_entropy":
        return tf.math.sigmoid(_column(logits))
    return _column(logits)
