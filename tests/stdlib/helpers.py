"""Small builders shared by the stdlib tests."""

from __future__ import annotations

from fldsl.artifacts import OpCall, TensorSpec


def op(output: str, name: str, inputs: list[str], width: int, party: str = "a", **params: object) -> OpCall:
    return OpCall(output=output, op=name, inputs=inputs, params=dict(params),
                  spec=TensorSpec(shape=[None, width], dtype="float32"), party=party)


def spec(width: int, dtype: str = "float32") -> TensorSpec:
    return TensorSpec(shape=[None, width], dtype=dtype)  # type: ignore[arg-type]
