"""A model segment: the ops of one plan (or one party's part of a split model) as a ``tf.Module``.

``build_segment(plan.model, input_specs, seed)`` creates every variable eagerly, in a fixed order (ops in
plan order, each op's variables in its own fixed order), so ``trainable_variables`` / ``get_weights`` line
up across processes; weights depend only on ``seed`` and the op output names (see :mod:`.ops`).

Calling the segment computes every op output. Inputs are tensor refs: ``"<dataset>.<field>"`` from the
data, or the output of an op that runs elsewhere (e.g. ``act1`` received from the passive party).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from fldsl.artifacts import OpCall, TensorSpec
from fldsl.stdlib.tf.ops import OPS, OpError, variable_name


class SegmentError(ValueError):
    """The ops cannot be built or called as given (user-facing message)."""


class Segment(tf.Module):
    def __init__(self, ops: Sequence[OpCall], input_specs: Mapping[str, TensorSpec], seed: int) -> None:
        super().__init__(name="segment")
        self.calls: list[OpCall] = list(ops)
        self.seed = int(seed)
        specs: dict[str, TensorSpec] = dict(input_specs)
        self._impls: list[Any] = []
        variables: list[tf.Variable] = []
        names: list[str] = []
        external: list[str] = []
        for call in self.calls:
            cls = OPS.get(call.op)
            if cls is None:
                raise SegmentError(f"op `{call.output}`: unknown stdlib op `{call.op}` "
                                   f"(known: {', '.join(sorted(OPS))})")
            if call.output in specs:
                raise SegmentError(f"op `{call.output}`: the name is already used by another tensor")
            in_specs = []
            for ref in call.inputs:
                if ref not in specs:
                    raise SegmentError(f"op `{call.output} = {call.op}(...)`: input `{ref}` has no spec "
                                       f"(known: {', '.join(sorted(specs)) or 'none'})")
                if ref in input_specs and ref not in external:
                    external.append(ref)
                in_specs.append(specs[ref])
            try:
                impl = cls(call, in_specs, self.seed)
                got = cls.out_spec(call, in_specs)
            except OpError as e:
                raise SegmentError(str(e)) from None
            if got.shape[1:] != call.spec.shape[1:]:
                # The compiler's shape function and this implementation disagree: refuse rather than
                # send tensors whose size the policy did not budget for.
                raise SegmentError(f"op `{call.output}`: the plan says shape {call.spec.shape} but "
                                   f"`{call.op}` produces {got.shape}")
            specs[call.output] = call.spec
            self._impls.append(impl)
            for v in impl.variables:
                variables.append(v)
                names.append(variable_name(v))
        self._vars = variables
        # Plain tuples: tf.Module would wrap lists in trackable ListWrappers.
        self._names = tuple(names)
        self._external = tuple(external)
        self.specs = specs

    @property
    def weight_names(self) -> list[str]:
        """``<op output>/<variable>`` for each trainable variable, in ``trainable_variables`` order."""
        return list(self._names)

    @property
    def input_refs(self) -> list[str]:
        """Refs this segment reads from outside (data fields, tensors received from other nodes)."""
        return list(self._external)

    @property
    def outputs(self) -> list[str]:
        return [c.output for c in self.calls]

    # tf.Module walks attributes alphabetically; we want plan order, identical in every process.
    @property
    def trainable_variables(self) -> tuple[tf.Variable, ...]:
        return tuple(self._vars)

    @property
    def variables(self) -> tuple[tf.Variable, ...]:
        return tuple(self._vars)

    @property
    def num_parameters(self) -> int:
        return int(sum(int(np.prod(v.shape)) for v in self._vars))

    def __call__(self, inputs: Mapping[str, Any], training: bool = False) -> dict[str, tf.Tensor]:
        values: dict[str, tf.Tensor] = {}
        for ref in self._external:
            if ref not in inputs:
                raise SegmentError(f"segment input `{ref}` was not given (got: {', '.join(sorted(inputs))})")
            values[ref] = tf.convert_to_tensor(inputs[ref])
        out: dict[str, tf.Tensor] = {}
        for call, impl in zip(self.calls, self._impls, strict=True):
            args = []
            for ref in call.inputs:
                if ref in values:
                    args.append(values[ref])
                elif ref in inputs:  # a tensor computed elsewhere (received activation)
                    values[ref] = tf.convert_to_tensor(inputs[ref])
                    args.append(values[ref])
                else:
                    raise SegmentError(f"op `{call.output}` needs `{ref}`, which was not given")
            y = impl(args, training)
            values[call.output] = y
            out[call.output] = y
        return out

    def get_weights(self) -> list[np.ndarray]:
        return [v.numpy() for v in self._vars]

    def set_weights(self, weights: Sequence[np.ndarray]) -> None:
        if len(weights) != len(self._vars):
            raise SegmentError(f"set_weights: expected {len(self._vars)} arrays, got {len(weights)}")
        for name, v, w in zip(self._names, self._vars, weights, strict=True):
            w = np.asarray(w)
            if tuple(w.shape) != tuple(v.shape):
                raise SegmentError(f"set_weights: `{name}` has shape {tuple(v.shape)}, got {tuple(w.shape)}")
        for v, w in zip(self._vars, weights, strict=True):
            v.assign(np.asarray(w, dtype=v.dtype.as_numpy_dtype))


def build_segment(ops: Sequence[OpCall], input_specs: Mapping[str, TensorSpec], seed: int) -> Segment:
    """Build the ops (in order) over inputs of the given specs; see the module docstring."""
    return Segment(ops, input_specs, seed)
