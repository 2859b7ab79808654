"""Exact evaluation metrics in numpy (no TensorFlow): rank-based AUC with ties, accuracy.

AUC is the Mann-Whitney U statistic: the probability that a random positive scores above a random negative,
ties counting one half. It is exact (no histogram buckets as in ``tf.keras.metrics.AUC``), so a federated
run and the central reference can be compared to 1e-3 and below.
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
        if "accuracy" in names:
            out["accuracy"] = accuracy(y, s)
        return out
