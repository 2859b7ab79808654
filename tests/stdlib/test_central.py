"""The central reference trains the demo data to a clearly useful model, and needs both parties' features."""

from __future__ import annotations

import numpy as np
import pytest

from fldsl.artifacts import LossSpec, OptimizerSpec, TrainSpec, ValidationSpec
from fldsl.runtime.datagen import wide_n_deep
from fldsl.stdlib.tf import train_central

from .helpers import op

FEATURES = 64


def _aligned(rows: int = 2000) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    leader = wide_n_deep(rows, 7, "leader", FEATURES)
    follower = wide_n_deep(rows, 7, "follower", FEATURES)
    common = set(follower.ids.tolist())
    keep = [i for i, v in enumerate(leader.ids.tolist()) if v in common]
    lead = leader.take(keep)
    foll = follower.select(lead.ids)
    return lead.ids, lead.fields["sparse"], foll.fields["sparse"], lead.fields["label"]


def _model(both: bool) -> list:
    ops = [op("e_l", "embed", ["shop.sparse"], FEATURES * 4, buckets=101, dim=4),
           op("own", "mlp", ["e_l"], 32, units=[32])]
    top_in = "own"
    if both:
        ops += [op("e_f", "embed", ["media.sparse"], FEATURES * 4, buckets=101, dim=4),
                op("act1", "mlp", ["e_f"], 32, units=[32]),
                op("cat", "concat", ["own", "act1"], 64)]
        top_in = "cat"
    return [*ops, op("logits", "dense", [top_in], 2, units=[16, 2])]


TRAIN = TrainSpec(epochs=2, batch_size=64, seed=1, metrics=["loss", "auc"],
                  optimizer=OptimizerSpec(name="adam", params={"learning_rate": 0.001}),
                  validation=ValidationSpec(fraction=0.2, seed=0))
LOSS = LossSpec(op="softmax_cross_entropy", logits="logits", label="shop.label", party="shop")


def test_wide_n_deep_demo_learns_with_both_sides_and_clearly_less_with_one() -> None:
    ids, shop, media, y = _aligned()
    both = train_central(_model(True), LOSS, TRAIN, {"shop.sparse": shop, "media.sparse": media}, y, ids=ids)
    one = train_central(_model(False), LOSS, TRAIN, {"shop.sparse": shop}, y, ids=ids)
    assert both.metrics["auc"] > 0.75, both.history
    assert one.metrics["auc"] < both.metrics["auc"] - 0.07, (one.history, both.history)
    assert len(both.history) == 2 and both.steps == 2 * -(-round(len(y) * 0.8) // 64)
    assert both.examples_per_s > 0


def test_central_training_is_deterministic_and_independent_of_row_order() -> None:
    ids, shop, media, y = _aligned(600)
    train = TRAIN.model_copy(update={"epochs": 1})
    a = train_central(_model(True), LOSS, train, {"shop.sparse": shop, "media.sparse": media}, y, ids=ids)
    perm = np.random.default_rng(0).permutation(len(y))
    b = train_central(_model(True), LOSS, train, {"shop.sparse": shop[perm], "media.sparse": media[perm]},
                      y[perm], ids=ids[perm])
    for x, z in zip(a.weights, b.weights, strict=True):
        np.testing.assert_allclose(x, z, atol=1e-6)
    assert a.metrics == pytest.approx(b.metrics)
