"""The stdlib ops in TensorFlow: exactly the names, parameters and semantics of ``fldsl.stdlib.signatures``.

All tensors are batch-first (B = batch). Every op is a small object holding its ``tf.Variable`` s in a fixed
order and a ``__call__(inputs, training)``; :mod:`.segment` wires them together. No Keras: Keras layers
build lazily and their optimisers densify embedding gradients (BENCHMARKS.md).

Weights are initialised from numpy with a generator seeded by ``(seed, op output name, variable name)``, so
two processes that build the same op get bit-identical weights, and a model split across parties starts
from exactly the weights the joined model would have (the vertical runtime and the quality tests rely on
both facts).

Ops:
- ``embed(x:int[B,k], buckets, dim=16) -> float32[B,k*dim]``: one table per column (values taken modulo
  ``buckets``), stored as ONE ``[k*buckets, dim]`` variable with per-column offsets so a batch is one gather
  (and its gradient is one ``IndexedSlices``); column outputs concatenated in column order.
- ``mlp(x, units, activation="relu")``: activation after every layer.
- ``dense(x, units, activation="relu")``: activation after all but the last layer (logits).
- ``concat(a, b, ...)``: along the feature axis, inputs cast to float32 (rank-1 inputs become one column).
- ``wide_deep(sparse, [dense], buckets, embedding_dim=8, hidden=[256,128,64]) -> [B,1]``: wide = per-id scalar
  weights summed over columns + linear on dense + bias; deep = embeddings ++ dense -> hidden (relu) -> 1;
  output = wide + deep (a logit).
- ``dlrm(dense, sparse, buckets=100000, embedding_dim=16, bottom, top) -> [B, top[-1]]``: bottom MLP (relu on
  every layer, last width == embedding_dim), pairwise dot products of the 1 + k vectors (upper triangle, no
  diagonal) ++ bottom output -> top MLP (relu on all but the last layer).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from fldsl.artifacts import OpCall, TensorSpec

_FLOAT_DTYPES = {"float32", "float64"}
_INT_DTYPES = {"int32", "int64"}

ACTIVATIONS: dict[str, Callable[[tf.Tensor], tf.Tensor]] = {
    "relu": tf.nn.relu,
    "tanh": tf.math.tanh,
    "sigmoid": tf.math.sigmoid,
    "elu": tf.nn.elu,
    "selu": tf.nn.selu,
    "gelu": tf.nn.gelu,
    "swish": tf.nn.silu,
    "silu": tf.nn.silu,
    "leaky_relu": tf.nn.leaky_relu,
    "linear": tf.identity,
    "none": tf.identity,
}


class OpError(ValueError):
    """An op was called with inputs or parameters it cannot accept (message is user-facing)."""


# ---------------------------------------------------------------------------------------------------------
# Deterministic initialisation
# ---------------------------------------------------------------------------------------------------------


def _rng(seed: int, output: str, var: str) -> np.random.Generator:
    # Hash rather than combine integers: the output name is part of the identity of a weight, so a model
    # split across parties gets the same numbers as the joined one, whatever else each segment contains.
    digest = hashlib.sha256(f"fldsl-init/1/{seed}/{output}/{var}".encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


def glorot(seed: int, output: str, var: str, shape: tuple[int, int]) -> np.ndarray:
    limit = np.sqrt(6.0 / (shape[0] + shape[1]))
    u = _rng(seed, output, var).random(shape, dtype=np.float32)
    return ((2.0 * u - 1.0) * limit).astype(np.float32)


def uniform(seed: int, output: str, var: str, shape: tuple[int, ...], scale: float) -> np.ndarray:
    u = _rng(seed, output, var).random(shape, dtype=np.float32)
    return ((2.0 * u - 1.0) * np.float32(scale)).astype(np.float32)


def _variable(value: np.ndarray, name: str) -> tf.Variable:
    # init_scope: variables are created eagerly even if a segment is (unusually) built under tf.function.
    with tf.init_scope():
        var = tf.Variable(value, name=name, trainable=True)
    # TF prefixes names with any enclosing name_scope; keep the scope-free name for weight_names.
    var._fldsl_name = name
    return var


def variable_name(var: tf.Variable) -> str:
    return getattr(var, "_fldsl_name", var.name.rsplit(":", 1)[0])


# ---------------------------------------------------------------------------------------------------------
# Parameter helpers
# ---------------------------------------------------------------------------------------------------------


def _param(call: OpCall, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if name not in call.params:
        if default is ...:
            raise OpError(f"op `{call.output} = {call.op}(...)`: missing parameter `{name}`")
        return default
    value = call.params[name]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise OpError(f"op `{call.output}`: parameter `{name}` must be an integer, got {value!r}")
    if not isinstance(value, kind):
        raise OpError(f"op `{call.output}`: parameter `{name}` has the wrong type: {value!r}")
    return value


def _units(call: OpCall, name: str, default: Any = ...) -> list[int]:
    units = _param(call, name, list, default)
    if not units or not all(isinstance(u, int) and not isinstance(u, bool) and u > 0 for u in units):
        raise OpError(f"op `{call.output}`: `{name}` must be a non-empty list of positive integers, "
                      f"got {units!r}")
    return list(units)


def _activation(call: OpCall) -> Callable[[tf.Tensor], tf.Tensor]:
    name = _param(call, "activation", str, "relu")
    if name not in ACTIVATIONS:
        known = ", ".join(sorted(ACTIVATIONS))
        raise OpError(f"op `{call.output}`: unknown activation `{name}` (known: {known})")
    return ACTIVATIONS[name]


def _check_params(call: OpCall, known: set[str]) -> None:
    unknown = sorted(set(call.params) - known)
    if unknown:
        raise OpError(f"op `{call.output} = {call.op}(...)`: unknown parameter(s) {', '.join(unknown)}")


def _width(call: OpCall, spec: TensorSpec, what: str) -> int:
    if len(spec.shape) == 1:
        return 1
    if len(spec.shape) != 2 or spec.shape[1] is None:
        raise OpError(f"op `{call.output}`: {what} must be a [batch, n] tensor, got shape {spec.shape}")
    return int(spec.shape[1])


def _require_dtype(call: OpCall, spec: TensorSpec, allowed: set[str], what: str) -> None:
    if spec.dtype not in allowed:
        raise OpError(f"op `{call.output}`: {what} must be {'/'.join(sorted(allowed))}, got {spec.dtype}")


def _as_float(x: tf.Tensor) -> tf.Tensor:
    x = tf.convert_to_tensor(x)
    if x.shape.rank == 1:
        x = tf.expand_dims(x, 1)
    return x if x.dtype == tf.float32 else tf.cast(x, tf.float32)


# ---------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------


class _Stack:
    """A stack of fully connected layers; ``last_activation`` False leaves the last layer linear."""

    def __init__(self, seed: int, output: str, prefix: str, n_in: int, units: Sequence[int],
                 activation: Callable[[tf.Tensor], tf.Tensor], last_activation: bool) -> None:
        self.layers: list[tuple[tf.Variable, tf.Variable]] = []
        self.variables: list[tf.Variable] = []
        fan_in = n_in
        for i, n in enumerate(units):
            name = f"{prefix}{i}/kernel"
            k = _variable(glorot(seed, output, name, (fan_in, n)), f"{output}/{name}")
            b = _variable(np.zeros((n,), np.float32), f"{output}/{prefix}{i}/bias")
            self.layers.append((k, b))
            self.variables += [k, b]
            fan_in = n
        self.activation = activation
        self.last_activation = last_activation

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        last = len(self.layers) - 1
        for i, (k, b) in enumerate(self.layers):
            x = tf.matmul(x, k) + b
            if i < last or self.last_activation:
                x = self.activation(x)
        return x


class _Table:
    """k per-column tables of ``buckets`` rows stored as one variable; lookup is a single gather."""

    def __init__(self, seed: int, output: str, name: str, columns: int, buckets: int, dim: int,
                 scale: float | None) -> None:
        shape = (columns * buckets, dim)
        value = np.zeros(shape, np.float32) if scale is None else uniform(seed, output, name, shape, scale)
        self.table = _variable(value, f"{output}/{name}")
        self.columns, self.buckets, self.dim = columns, buckets, dim
        self.offsets = tf.constant(np.arange(columns, dtype=np.int64) * buckets)

    def lookup(self, ids: tf.Tensor) -> tf.Tensor:
        """ids int[B,k] -> float32[B,k,dim]."""
        ids = tf.cast(ids, tf.int64)
        rows = tf.math.floormod(ids, self.buckets) + self.offsets
        return tf.gather(self.table, rows)


# ---------------------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------------------


class Op:
    """Base: ``variables`` in a fixed order and ``__call__(inputs, training) -> tensor``."""

    variables: list[tf.Variable]

    def __init__(self, call: OpCall, specs: list[TensorSpec], seed: int) -> None:
        """Every op is built from its call, its input specs and the seed (the segment does it); this base
        holds no variables."""
        self.variables = []

    def __call__(self, inputs: list[tf.Tensor], training: bool) -> tf.Tensor:  # pragma: no cover
        raise NotImplementedError

    @staticmethod
    def out_spec(call: OpCall, specs: list[TensorSpec]) -> TensorSpec:  # pragma: no cover
        raise NotImplementedError


def _arity(call: OpCall, specs: list[TensorSpec], lo: int, hi: int | None) -> None:
    n = len(specs)
    if n < lo or (hi is not None and n > hi):
        want = f"{lo}" if hi == lo else f"{lo}..{hi if hi is not None else 'n'}"
        raise OpError(f"op `{call.output} = {call.op}(...)`: takes {want} tensor input(s), got {n}")


class Embed(Op):
    def __init__(self, call: OpCall, specs: list[TensorSpec], seed: int) -> None:
        _check_params(call, {"buckets", "dim"})
        _arity(call, specs, 1, 1)
        _require_dtype(call, specs[0], _INT_DTYPES, "the input of embed")
        self.columns = _width(call, specs[0], "the input of embed")
        self.buckets = _param(call, "buckets", int)
        self.dim = _param(call, "dim", int, 16)
        if self.buckets <= 0 or self.dim <= 0:
            raise OpError(f"op `{call.output}`: buckets and dim must be positive")
        self.emb = _Table(seed, call.output, "table", self.columns, self.buckets, self.dim, 0.05)
        self.variables = [self.emb.table]

    def __call__(self, inputs: list[tf.Tensor], training: bool) -> tf.Tensor:
        x = inputs[0]
        if x.shape.rank == 1:
            x = tf.expand_dims(x, 1)
        return tf.reshape(self.emb.lookup(x), [-1, self.columns * self.dim])

    @staticmethod
    def out_spec(call: OpCall, specs: list[TensorSpec]) -> TensorSpec:
        k = _width(call, specs[0], "the input of embed")
        return TensorSpec(shape=[None, k * int(call.params.get("dim", 16))], dtype="float32")


class Mlp(Op):
    last_activation = True

    def __init__(self, call: OpCall, specs: list[TensorSpec], seed: int) -> None:
        _check_params(call, {"units", "activation"})
        _arity(call, specs, 1, 1)
        _require_dtype(call, specs[0], _FLOAT_DTYPES | _INT_DTYPES | {"bool"}, "the input")
        self.stack = _Stack(seed, call.output, "layer", _width(call, specs[0], "the input"),
                            _units(call, "units"), _activation(call), self.last_activation)
        self.variables = self.stack.variables

    def __call__(self, inputs: list[tf.Tensor], training: bool) -> tf.Tensor:
        return self.stack(_as_float(inputs[0]))

    @staticmethod
    def out_spec(call: OpCall, specs: list[TensorSpec]) -> TensorSpec:
        return TensorSpec(shape=[None, int(call.params["units"][-1])], dtype="float32")


class Dense(Mlp):
    last_activation = False


class Concat(Op):
    def __init__(self, call: OpCall, specs: list[TensorSpec], seed: int) -> None:
        _check_params(call, set())
        _arity(call, specs, 1, None)
        for s in specs:
            _width(call, s, "every input of concat")
        self.variables = []

    def __call__(self, inputs: list[tf.Tensor], training: bool) -> tf.Tensor:
        return tf.concat([_as_float(x) for x in inputs], axis=1)

    @staticmethod
    def out_spec(call: OpCall, specs: list[TensorSpec]) -> TensorSpec:
        return TensorSpec(shape=[None, sum(_width(call, s, "input") for s in specs)], dtype="float32")


class WideDeep(Op):
    def __init__(self, call: OpCall, specs: list[TensorSpec], seed: int) -> None:
        _check_params(call, {"buckets", "embedding_dim", "hidden"})
        _arity(call, specs, 1, 2)
        _require_dtype(call, specs[0], _INT_DTYPES, "`sparse` (the first input of wide_deep)")
        k = _width(call, specs[0], "`sparse`")
        n = 0
        if len(specs) == 2:
            _require_dtype(call, specs[1], _FLOAT_DTYPES | _INT_DTYPES, "`dense` (the second input)")
            n = _width(call, specs[1], "`dense`")
        buckets = _param(call, "buckets", int)
        dim = _param(call, "embedding_dim", int, 8)
        hidden = _units(call, "hidden", [256, 128, 64])
        out = call.output
        self.k, self.n, self.dim = k, n, dim
        self.wide = _Table(seed, out, "wide/table", k, buckets, 1, None)
        self.deep = _Table(seed, out, "deep/table", k, buckets, dim, 0.05)
        self.variables = [self.wide.table, self.deep.table]
        self.linear: tf.Variable | None = None
        if n:
            self.linear = _variable(glorot(seed, out, "wide/linear", (n, 1)), f"{out}/wide/linear")
            self.variables.append(self.linear)
        self.bias = _variable(np.zeros((1,), np.float32), f"{out}/wide/bias")
        self.variables.append(self.bias)
        self.stack = _Stack(seed, out, "deep/layer", k * dim + n, [*hidden, 1], tf.nn.relu, False)
        self.variables += self.stack.variables

    def __call__(self, inputs: list[tf.Tensor], training: bool) -> tf.Tensor:
        sparse = inputs[0]
        wide = tf.reduce_sum(tf.reshape(self.wide.lookup(sparse), [-1, self.k]), axis=1, keepdims=True)
        deep_in = tf.reshape(self.deep.lookup(sparse), [-1, self.k * self.dim])
        if self.linear is not None:
            dense = _as_float(inputs[1])
            wide = wide + tf.matmul(dense, self.linear)
            deep_in = tf.concat([deep_in, dense], axis=1)
        return wide + self.bias + self.stack(deep_in)

    @staticmethod
    def out_spec(call: OpCall, specs: list[TensorSpec]) -> TensorSpec:
        return TensorSpec(shape=[None, 1], dtype="float32")


class Dlrm(Op):
    def __init__(self, call: OpCall, specs: list[TensorSpec], seed: int) -> None:
        _check_params(call, {"buckets", "embedding_dim", "bottom", "top"})
        _arity(call, specs, 2, 2)
        _require_dtype(call, specs[0], _FLOAT_DTYPES | _INT_DTYPES, "`dense` (the first input of dlrm)")
        _require_dtype(call, specs[1], _INT_DTYPES, "`sparse` (the second input of dlrm)")
        n = _width(call, specs[0], "`dense`")
        k = _width(call, specs[1], "`sparse`")
        buckets = _param(call, "buckets", int, 100000)
        dim = _param(call, "embedding_dim", int, 16)
        bottom = _units(call, "bottom")
        top = _units(call, "top")
        if bottom[-1] != dim:
            raise OpError(f"op `{call.output}`: the last bottom width ({bottom[-1]}) must equal "
                          f"embedding_dim ({dim}) for the dot interaction")
        out = call.output
        self.k, self.dim = k, dim
        self.bottom = _Stack(seed, out, "bottom/layer", n, bottom, tf.nn.relu, True)
        self.emb = _Table(seed, out, "table", k, buckets, dim, 0.05)
        vectors = k + 1
        self.pairs = vectors * (vectors - 1) // 2
        rows, cols = np.triu_indices(vectors, k=1)
        self.flat_index = tf.constant((rows * vectors + cols).astype(np.int32))
        self.top = _Stack(seed, out, "top/layer", dim + self.pairs, top, tf.nn.relu, False)
        self.variables = [*self.bottom.variables, self.emb.table, *self.top.variables]

    def __call__(self, inputs: list[tf.Tensor], training: bool) -> tf.Tensor:
        b = self.bottom(_as_float(inputs[0]))  # [B, dim]
        e = self.emb.lookup(inputs[1])  # [B, k, dim]
        t = tf.concat([tf.expand_dims(b, 1), e], axis=1)  # [B, k+1, dim]
        z = tf.matmul(t, t, transpose_b=True)  # [B, k+1, k+1]
        flat = tf.reshape(z, [-1, (self.k + 1) * (self.k + 1)])
        inter = tf.gather(flat, self.flat_index, axis=1)  # [B, pairs]: upper triangle, no diagonal
        return self.top(tf.concat([b, inter], axis=1))

    @staticmethod
    def out_spec(call: OpCall, specs: list[TensorSpec]) -> TensorSpec:
        return TensorSpec(shape=[None, int(call.params["top"][-1])], dtype="float32")


OPS: dict[str, type[Op]] = {
    "embed": Embed,
    "mlp": Mlp,
    "dense": Dense,
    "concat": Concat,
    "wide_deep": WideDeep,
    "dlrm": Dlrm,
}
