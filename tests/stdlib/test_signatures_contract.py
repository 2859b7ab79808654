"""The TensorFlow ops agree with the compiler's signatures (``fldsl.stdlib.signatures``): same op names,
same parameter names, same output shapes and the same parameter counts (message sizes are budgeted from
those counts), and every optimiser spelling the compiler writes is accepted."""

from __future__ import annotations

from typing import Any

import pytest

from fldsl.artifacts import OpCall, OptimizerSpec, TensorSpec
from fldsl.stdlib import signatures as sig
from fldsl.stdlib.tf import build_segment, make_optimizer
from fldsl.stdlib.tf.ops import OPS

from .helpers import spec

CASES: list[tuple[str, dict[str, TensorSpec], dict[str, Any]]] = [
    ("embed", {"x": spec(5, "int64")}, {"buckets": 30, "dim": 4}),
    ("mlp", {"x": spec(7)}, {"units": [6, 3]}),
    ("dense", {"x": spec(7)}, {"units": [6, 2], "activation": "tanh"}),
    ("wide_deep", {"sparse": spec(4, "int64"), "dense": spec(3)}, {"buckets": 20, "hidden": [8, 4]}),
    ("wide_deep", {"sparse": spec(4, "int64"), "dense": None}, {"buckets": 20, "embedding_dim": 3}),
    ("dlrm", {"dense": spec(13), "sparse": spec(26, "int64")},
     {"buckets": 50, "embedding_dim": 4, "bottom": [8, 4], "top": [8, 1]}),
]


def test_same_op_names() -> None:
    assert set(OPS) == set(sig.OPS)


@pytest.mark.parametrize(("name", "tensors", "params"), CASES)
def test_shape_and_parameter_count_match_the_signature(name: str, tensors: dict, params: dict) -> None:
    op = sig.OPS[name]
    args = {p.name: p.default for p in op.params if not p.required}
    args.update(tensors)
    args.update(params)
    want_spec = op.shape(args)
    want_count = op.param_count(args)
    refs = {k: v for k, v in tensors.items() if v is not None}
    call = OpCall(output="out", op=name, inputs=[f"d.{k}" for k in refs], spec=want_spec, party="a",
                  params={p.name: args[p.name] for p in op.params if not p.is_tensor})
    seg = build_segment([call], {f"d.{k}": v for k, v in refs.items()}, seed=0)
    assert seg.num_parameters == want_count


def test_concat_matches() -> None:
    a, b = spec(3), spec(4, "int64")
    want = sig.OPS["concat"].shape({"inputs": [a, b]})
    call = OpCall(output="c", op="concat", inputs=["d.a", "d.b"], spec=want, party="a")
    assert build_segment([call], {"d.a": a, "d.b": b}, 0).specs["c"].shape == [None, 7]


def test_every_activation_the_compiler_accepts_exists() -> None:
    from fldsl.stdlib.tf.ops import ACTIVATIONS

    assert set(sig.ACTIVATIONS) <= set(ACTIVATIONS)


@pytest.mark.parametrize("name", sorted(sig.OPTIMIZERS))
def test_optimizers_accept_the_compilers_parameters(name: str) -> None:
    params = {p.name: p.default for p in sig.OPTIMIZERS[name]}
    opt = make_optimizer(OptimizerSpec(name=name, params=params))  # type: ignore[arg-type]
    for key, value in params.items():
        from fldsl.stdlib.tf.optim import ALIASES

        assert opt.hyper[ALIASES.get(key, key)] == value
