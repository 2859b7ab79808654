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


# ---------------------------------------------------------------------------------------------------------
# Holdout summaries: what a horizontal / distributed worker sends its aggregator on the `metrics` flow
# ---------------------------------------------------------------------------------------------------------
#
# One float64 array of shape [1 + 2K, bins] (the compiler fixes the shape in the flow's spec, so the
# transport's flow guard enforces it too):
#
#   row 0         [holdout rows, holdout loss sum, correct rows, train-loss sum, train batches, 0, ...]
#   row 1 + 2k    histogram of class k's score over the rows labelled k (binary: P(class 1), label 1)
#   row 2 + 2k    histogram of the same score over every other row
#
# K = 0 when AUC is not asked for (or the loss is mse), 1 for a binary classifier, C for C > 2 classes;
# the histograms have `bins` equal bins over [0, 1]. The compiler chooses both (compiler/flows.py,
# METRIC_BINS) and writes them into the flow's spec; the workers and the aggregator read them from there.
# Everything in it is a count or a sum over the rows: no id, row or per-row label. It does tell how a
# worker's holdout scores are distributed per class (to 1/bins), which the flow's rule text says.

SUMMARY_HEAD = 5  # the used cells of row 0


def _bin_index(scores: np.ndarray, bins: int) -> np.ndarray:
    """Monotone binning of scores in [0, 1] (a higher score never lands in a lower bin, so only pairs in
    one bin can be misordered). NaN goes to the top bin: the exact AUC (np.unique) sorts NaN last."""
    s = np.asarray(scores, dtype=np.float64)
    idx = np.floor(np.clip(np.nan_to_num(s, nan=1.0), 0.0, 1.0) * bins)
    return np.minimum(idx, bins - 1).astype(np.int64)


def holdout_summary(loss_op: str, logits: np.ndarray, labels: np.ndarray, shape: tuple[int, int],
                    train_losses: list[float] | tuple[float, ...] = ()) -> np.ndarray:
    """A worker's summary (layout above) of its holdout ``logits`` / ``labels`` and the epoch's training
    batch losses. ``shape`` is the flow's [1 + 2K, bins]; a model whose class count does not give that K is
    refused with ValueError (the plan and the model disagree)."""
    rows_k, bins = int(shape[0]), int(shape[1])
    k = (rows_k - 1) // 2
    if rows_k < 1 or rows_k % 2 != 1 or bins < SUMMARY_HEAD:
        raise ValueError(f"a holdout summary cannot have shape {list(shape)}")
    y = np.asarray(labels).reshape(-1)
    out = np.zeros((rows_k, bins), np.float64)
    n = int(y.size)
    out[0, 3] = float(np.sum(train_losses)) if len(train_losses) else 0.0
    out[0, 4] = float(len(train_losses))
    if n == 0:
        return out
    out[0, 0] = n
    # loss_value is the float64 mean; times n it is the sum the aggregator divides by the total rows.
    out[0, 1] = loss_value(loss_op, logits, y) * n
    if loss_op == "mse":
        if k:
            raise ValueError("an mse model has no class scores to histogram")
        return out
    s = class_scores(loss_op, logits)
    pred = s.argmax(axis=1) if s.ndim == 2 else (s >= 0.5).astype(np.int64)  # as accuracy()
    yi = y.astype(np.int64)
    out[0, 2] = float(np.sum(pred == yi))
    if k == 0:
        return out
    width = 1 if s.ndim == 1 else s.shape[1]
    if (k == 1) != (s.ndim == 1) or (s.ndim == 2 and width != k):
        raise ValueError(f"the flow's summary holds {k} class curve(s), the model scores {width} class(es)")
    for c in range(k):
        score, pos = (s, yi == 1) if s.ndim == 1 else (s[:, c], yi == c)
        idx = _bin_index(score, bins)
        out[1 + 2 * c] = np.bincount(idx[pos], minlength=bins)
        out[2 + 2 * c] = np.bincount(idx[~pos], minlength=bins)
    return out


def summary_problem(summary: np.ndarray, shape: tuple[int, int]) -> str | None:
    """Why ``summary`` is not a well-formed summary of ``shape`` (None: it is). Checked by the aggregator
    before it uses one: counts are non-negative integers below 2**53 (exact in float64), correct <= rows,
    and every class curve counts each holdout row exactly once (positives + negatives = rows; with C > 2
    classes the positives of all classes add up to the rows too). The loss sum may be any float (a diverged
    model's loss is inf or NaN, and reporting that is the point)."""
    a = np.asarray(summary)
    if a.dtype != np.float64 or tuple(a.shape) != tuple(shape):
        return f"float64{list(shape)} expected, got {a.dtype}{list(a.shape)}"
    counts = np.concatenate([a[0, [0, 2, 4]], a[0, SUMMARY_HEAD:], a[1:].reshape(-1)])
    if not np.all(np.isfinite(counts)) or np.any(counts < 0) or np.any(counts != np.floor(counts)) \
            or np.any(counts >= 2.0 ** 53):
        return "counts must be non-negative whole numbers"
    if np.any(a[0, SUMMARY_HEAD:] != 0):
        return "row 0 holds values past its 5 used cells"
    n = a[0, 0]
    if a[0, 2] > n:
        return f"{int(a[0, 2])} correct rows of {int(n)}"
    k = (a.shape[0] - 1) // 2
    for c in range(k):
        if a[1 + 2 * c].sum() + a[2 + 2 * c].sum() != n:
            return f"class curve {c} counts {int(a[1 + 2 * c].sum() + a[2 + 2 * c].sum())} rows of {int(n)}"
    if k > 1 and sum(a[1 + 2 * c].sum() for c in range(k)) != n:
        return "the class curves' positives do not add up to the rows"
    return None


def binned_auc(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """(AUC, bound) from histograms of the positives' and the negatives' scores over the same monotone bins:
    pairs in different bins are ordered exactly, pairs in one bin count one half (as ties). The exact AUC of
    the scores is within ``bound = sum_b pos_b * neg_b / (2 * P * N)`` of it: each same-bin pair is off by
    at most one half. (NaN, NaN) without both positives and negatives."""
    p = np.asarray(pos, dtype=np.float64)
    q = np.asarray(neg, dtype=np.float64)
    n_pos, n_neg = float(p.sum()), float(q.sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan, math.nan
    below = np.cumsum(q) - q  # negatives in lower bins
    wins = float(np.sum(p * (below + 0.5 * q)))
    same = float(np.sum(p * q))
    return wins / (n_pos * n_neg), same / (2.0 * n_pos * n_neg)


def combine_summaries(wanted: list[str] | tuple[str, ...],
                      summaries: list[np.ndarray]) -> tuple[dict[str, float], float]:
    """The model's metrics over every worker's holdout rows from their summaries, and the AUC's bound
    (:func:`binned_auc`; 0 when no AUC): ``loss`` (sum / rows) and ``accuracy`` (correct / rows) are exact,
    ``auc`` is binned (macro one-vs-rest over the classes with both positives and negatives for C > 2,
    whose bound is the mean of the classes' bounds). ``train_loss`` is the mean over all the workers' training
    batches of the epoch."""
    if not summaries:
        return {}, 0.0
    total = np.sum(summaries, axis=0)
    out: dict[str, float] = {}
    if total[0, 4] > 0:
        out["train_loss"] = float(total[0, 3] / total[0, 4])
    n = float(total[0, 0])
    if n == 0:
        return out, 0.0
    out["loss"] = float(total[0, 1] / n)
    # The aggregator's plan has no loss; it needs none: an mse pipeline cannot ask for auc or accuracy (a
    # check-time error) and its summaries hold no class curves.
    bound = 0.0
    k = (total.shape[0] - 1) // 2
    if "auc" in wanted and k:
        pairs = [binned_auc(total[1 + 2 * c], total[2 + 2 * c]) for c in range(k)]
        present = [(a, b) for a, b in pairs if not math.isnan(a)]
        out["auc"] = float(np.mean([a for a, _ in present])) if present else math.nan
        bound = float(np.mean([b for _, b in present])) if present else 0.0
    if "accuracy" in wanted:
        out["accuracy"] = float(total[0, 2] / n)
    return out, bound
