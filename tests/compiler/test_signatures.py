"""Stdlib op signatures: shapes, dtypes and parameter counts the compiler relies on."""

from __future__ import annotations

import pytest

from fldsl.artifacts import TensorSpec
from fldsl.stdlib.signatures import LOSSES, OPS, SignatureError


def t(*shape: int | None, dtype: str = "float32") -> TensorSpec:
    return TensorSpec(shape=list(shape), dtype=dtype)  # type: ignore[arg-type]


def call(op: str, **params: object) -> tuple[TensorSpec, int]:
    sig = OPS[op]
    full = {p.name: p.default for p in sig.params if not p.required}
    full.update(params)
    return sig.shape(full), sig.param_count(full)


def test_embed() -> None:
    spec, n = call("embed", x=t(None, 26, dtype="int64"), buckets=1000, dim=16)
    assert spec == t(None, 26 * 16) and n == 26 * 1000 * 16
    with pytest.raises(SignatureError, match="integer ids"):
        call("embed", x=t(None, 4), buckets=10)


def test_mlp_and_dense() -> None:
    spec, n = call("mlp", x=t(None, 10), units=[16, 4])
    assert spec == t(None, 4) and n == (10 * 16 + 16) + (16 * 4 + 4)
    assert call("dense", x=t(None, 10), units=[16, 4]) == (spec, n)
    with pytest.raises(SignatureError, match="non-empty list of positive widths"):
        call("mlp", x=t(None, 10), units=[])


def test_concat() -> None:
    spec, n = OPS["concat"].shape({"inputs": [t(None, 3), t(None, 5, dtype="int64")]}), 0
    assert spec == t(None, 8) and OPS["concat"].param_count({"inputs": []}) == n
    with pytest.raises(SignatureError, match="at least two"):
        OPS["concat"].shape({"inputs": [t(None, 3)]})


def test_wide_deep() -> None:
    spec, n = call("wide_deep", sparse=t(None, 4, dtype="int64"), dense=None, buckets=10, hidden=[8])
    assert spec == t(None, 1)
    wide = 4 * 10 + 0 + 1
    deep = 4 * 10 * 8 + (4 * 8 * 8 + 8) + (8 * 1 + 1)
    assert n == wide + deep


def test_dlrm() -> None:
    spec, n = call(
        "dlrm",
        dense=t(None, 13),
        sparse=t(None, 26, dtype="int64"),
        buckets=100,
        embedding_dim=4,
        bottom=[8, 4],
        top=[16, 2],
    )
    assert spec == t(None, 2)
    top_in = 27 * 26 // 2 + 4
    assert n == (13 * 8 + 8 + 8 * 4 + 4) + 26 * 100 * 4 + (top_in * 16 + 16 + 16 * 2 + 2)
    with pytest.raises(SignatureError, match="must equal `embedding_dim`"):
        call(
            "dlrm", dense=t(None, 13), sparse=t(None, 26, dtype="int64"), embedding_dim=4, bottom=[8], top=[2]
        )


def test_losses() -> None:
    LOSSES["softmax_cross_entropy"].check(t(None, 3), t(None, dtype="int64"))
    with pytest.raises(SignatureError):
        LOSSES["softmax_cross_entropy"].check(t(None, 2), t(None, dtype="float32"))
    LOSSES["mse"].check(t(None, 1), t(None))
    with pytest.raises(SignatureError, match=r"\[batch, 1\]"):
        LOSSES["sigmoid_cross_entropy"].check(t(None, 2), t(None, dtype="int64"))
