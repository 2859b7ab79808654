"""Generators are deterministic, parts are disjoint, and the planted signal is there."""

from __future__ import annotations

import numpy as np
import pytest

from fldsl.runtime.data import DataError, Table, stratified_split
from fldsl.runtime.datagen import criteo, wide_n_deep
from fldsl.stdlib.tf.metrics import auc


def _same(a: Table, b: Table) -> bool:
    return np.array_equal(a.ids, b.ids) and all(np.array_equal(a.fields[k], b.fields[k]) for k in a.fields)


def test_criteo_is_deterministic_and_parts_partition_the_rows() -> None:
    whole = criteo(20_000, seed=3)
    assert _same(whole, criteo(20_000, seed=3))
    assert not np.array_equal(whole.fields["sparse"], criteo(20_000, seed=4).fields["sparse"])
    parts = [criteo(20_000, seed=3, part=p, parts=3) for p in range(3)]
    assert sum(len(p) for p in parts) == 20_000
    assert len(set().union(*[set(p.ids.tolist()) for p in parts])) == 20_000
    for k in ("dense", "sparse", "label"):
        np.testing.assert_array_equal(np.concatenate([p.fields[k] for p in parts]), whole.fields[k])
    assert whole.fields["dense"].shape == (20_000, 13) and whole.fields["sparse"].shape == (20_000, 26)
    assert whole.fields["sparse"].min() >= 0 and whole.fields["sparse"].max() < 100_000
    assert 0.15 < whole.fields["label"].mean() < 0.6
    with pytest.raises(DataError, match="part must be in"):
        criteo(10, seed=1, part=3, parts=3)


def test_criteo_has_a_planted_per_id_signal() -> None:
    # Per-id click rates learned on one half predict the other half: ids carry signal.
    t = criteo(40_000, seed=1)
    y = t.fields["label"]
    train, test = slice(0, 20_000), slice(20_000, 40_000)
    score = np.zeros(20_000)
    for c in range(26):
        ids = t.fields["sparse"][:, c]
        sums = np.bincount(ids[train], weights=y[train], minlength=100_000)
        counts = np.bincount(ids[train], minlength=100_000)
        rate = (sums + y[train].mean() * 5) / (counts + 5)
        score += np.log(rate[ids[test]] / (1 - rate[ids[test]]))
    assert auc(y[test], score) > 0.65


def test_wide_n_deep_layout_overlap_and_order() -> None:
    leader = wide_n_deep(1000, seed=7, side="leader", features=32, overlap=0.9)
    follower = wide_n_deep(1000, seed=7, side="follower", features=32, overlap=0.9)
    assert _same(leader, wide_n_deep(1000, seed=7, side="leader", features=32, overlap=0.9))
    assert sorted(leader.fields) == ["label", "sparse"] and sorted(follower.fields) == ["sparse"]
    assert leader.fields["sparse"].shape == (1000, 32)
    assert leader.fields["sparse"].min() >= 0 and leader.fields["sparse"].max() <= 100
    assert all(isinstance(i, str) for i in leader.ids.tolist())
    common = set(leader.ids.tolist()) & set(follower.ids.tolist())
    assert len(common) == 900
    # Each side has its own order: PSI alignment is needed.
    lo = [i for i in leader.ids.tolist() if i in common]
    fo = [i for i in follower.ids.tolist() if i in common]
    assert lo != fo


def test_wide_n_deep_signal_needs_both_sides() -> None:
    leader = wide_n_deep(4000, seed=1, side="leader", features=16, overlap=1.0)
    follower = wide_n_deep(4000, seed=1, side="follower", features=16, overlap=1.0).select(leader.ids)
    y = leader.fields["label"]
    # The informative slots (every 4th) average to each side's latent; a linear score shows the split signal.
    s_lead = leader.fields["sparse"][:, ::4].mean(axis=1)
    s_foll = follower.fields["sparse"][:, ::4].mean(axis=1)
    a_lead, a_foll, a_both = auc(y, s_lead), auc(y, s_foll), auc(y, s_lead + s_foll)
    assert 0.65 < a_lead < a_both - 0.05 and 0.65 < a_foll < a_both - 0.05 and a_both > 0.85


def test_stratified_split_is_deterministic_order_free_and_stratified() -> None:
    rng = np.random.default_rng(0)
    ids = np.array([f"u{i}" for i in range(5000)])
    y = (rng.random(5000) < 0.2).astype(np.int64)
    tr, te = stratified_split(ids, y, 0.2, seed=3)
    perm = rng.permutation(5000)
    tr2, te2 = stratified_split(ids[perm], y[perm], 0.2, seed=3)
    assert tr.tolist() == tr2.tolist() and te.tolist() == te2.tolist()  # same ids AND same order
    assert set(tr) | set(te) == set(ids) and not set(tr) & set(te)
    label_of = dict(zip(ids.tolist(), y.tolist(), strict=True))
    for c in (0, 1):
        n_c = int((y == c).sum())
        assert sum(label_of[i] == c for i in te) == round(0.2 * n_c)
    tr3, _ = stratified_split(ids, y, 0.2, seed=4)
    assert tr3.tolist() != tr.tolist()
    with pytest.raises(DataError, match="fraction"):
        stratified_split(ids, y, 1.0, seed=0)
