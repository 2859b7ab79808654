"""Exact evaluation metrics in numpy (no TensorFlow): rank-based AUC with ties, accuracy, the loss.

AUC is the Mann-Whitney U statistic: the probability that a random positive scores above a random negative,
ties counting one half. It is exact (no histogram buckets as in ``tf.keras.metrics.AUC``), so a federated
run and the central reference can be compared to 1e-3 and below. With more than two classes it is the
macro one-vs-rest AUC: the mean over the classes of the AUC of "this class" against "every other class",
scored by the class's probability (classes without both positives and negatives among the rows are left
out of the mean, as they have no AUC).

:func:`evaluate_logits` is what every node that holds labels reports for its holdout (or test) rows:
``loss`` is the pipeline's loss on those rows (never the training loss: that is ``train_loss``, reported
by the training loop).
"""

from __future__ import annotations

import math

import numpy as np


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC for binary labels (0/1); NaN when only one class is present."""
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"auc: {y.shape[0]} labels but {s.shape[0]} scores")
    pos = y.astype(bool) if y.dtype == bool else (y == 1)
    if y.dtype != bool and not np.all((y == 0) | (y == 1)):
        raise ValueError("auc: labels must be 0 or 1")
    n_pos = int(pos.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # Average rank (1-based) of each group of tied scores.
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0
    rank_sum = float(avg_rank[inverse][pos].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def macro_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Macro one-vs-rest AUC of class probabilities ``probs`` [B, C] for labels in ``0 .. C-1``: the mean
    of :func:`auc` of each class against the rest; NaN when no class has both positives and negatives."""
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"macro_auc: {y.shape[0]} labels but scores of shape {p.shape}")
    per_class = [auc(y == c, p[:, c]) for c in range(p.shape[1])]
    present = [a for a in per_class if not math.isnan(a)]
    return float(np.mean(present)) if present else math.nan


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def loss_value(loss_op: str, logits: np.ndarray, labels: np.ndarray) -> float:
    """The mean of the pipeline's loss over the rows, in float64 (stdlib/tf/losses.py's formulas; they agree
    with TensorFlow's float32 to ~1e-6 relative)."""
    y = np.asarray(labels).reshape(-1)
    x = np.asarray(logits, dtype=np.float64)
    if y.size == 0:
        return math.nan
    if loss_op == "softmax_cross_entropy":
        z = x - x.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(z).sum(axis=1))
        return float(np.mean(log_norm - z[np.arange(len(y)), y.astype(np.int64)]))
    x = x.reshape(-1)
    if loss_op == "sigmoid_cross_entropy":
        t = y.astype(np.float64)
        return float(np.mean(np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))))
    if loss_op == "mse":
        return float(np.mean((x - y.astype(np.float64)) ** 2))
    raise ValueError(f"unknown loss `{loss_op}`")


def class_scores(loss_op: str, logits: np.ndarray) -> np.ndarray:
    """What AUC and accuracy are computed from (as ``losses.scores``): P(class 1) [B] for a binary
    classifier, class probabilities [B, C] for C > 2, the prediction [B] for mse."""
    x = np.asarray(logits, dtype=np.float64)
    if loss_op == "softmax_cross_entropy":
        p = softmax(x)
        return p[:, 1] if p.shape[1] == 2 else p
    if loss_op == "sigmoid_cross_entropy":
        return 1.0 / (1.0 + np.exp(-x.reshape(-1)))
    return x.reshape(-1)


def evaluate_logits(loss_op: str, wanted: list[str] | tuple[str, ...], logits: np.ndarray,
                    labels: np.ndarray) -> dict[str, float]:
    """Holdout metrics of one evaluation pass: ``loss`` (always), ``auc`` (binary, or macro one-vs-rest for
    C > 2 classes) and ``accuracy`` where asked for. Classification metrics of an mse loss are refused when
    the pipeline is checked, so none are computed for it here."""
    y = np.asarray(labels).reshape(-1)
    out: dict[str, float] = {"loss": loss_value(loss_op, logits, y)}
    if loss_op == "mse" or y.size == 0:
        return out
    s = class_scores(loss_op, logits)
    if "auc" in wanted:
        out["auc"] = auc(y.astype(np.int64), s) if s.ndim == 1 else macro_auc(y, s)
    if "accuracy" in wanted:
        out["accuracy"] = accuracy(y, s)
    return out


def accuracy(labels: np.ndarray, scores: np.ndarray) -> float:
    """Fraction correct. ``scores`` [B, C] (probabilities or logits: argmax) or [B] (P(class 1) >= 0.5)."""
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores)
    if s.ndim == 2 and s.shape[1] > 1:
        pred = s.argmax(axis=1)
    else:
        pred = (s.reshape(-1) >= 0.5).astype(np.int64)
    if pred.shape[0] != y.shape[0]:
        raise ValueError(f"accuracy: {y.shape[0]} labels but {pred.shape[0]} predictions")
    if y.size == 0:
        return math.nan
    return float(np.mean(pred == y.astype(np.int64)))


class ScoreAccumulator:
    """Collects (label, score) batches of an evaluation pass; ``result`` computes exact metrics once."""

    def __init__(self) -> None:
        self._labels: list[np.ndarray] = []
        self._scores: list[np.ndarray] = []
        self._loss_sum = 0.0
        self._count = 0

    def add(self, labels: np.ndarray, scores: np.ndarray, loss: float | None = None) -> None:
        labels = np.asarray(labels)
        self._labels.append(labels)
        self._scores.append(np.asarray(scores))
        if loss is not None:  # loss is a batch mean: weight it by the batch size
            self._loss_sum += float(loss) * labels.shape[0]
            self._count += labels.shape[0]

    def result(self, names: list[str] | tuple[str, ...] = ("loss", "auc", "accuracy")) -> dict[str, float]:
        if not self._labels:
            return {}
        y = np.concatenate(self._labels)
        s = np.concatenate(self._scores)
        out: dict[str, float] = {}
        if "loss" in names and self._count:
            out["loss"] = self._loss_sum / self._count
        if "auc" in names and (s.ndim == 1 or s.shape[1] == 1):
            out["auc"] = auc(y, s.reshape(-1))
        elif "auc" in names:
            out["auc"] = macro_auc(y, s)
        if "accuracy" in names:
            out["accuracy"] = accuracy(y, s)
        return out
