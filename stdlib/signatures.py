"""Compile-time signatures of the standard library: ops, losses, optimisers, readers, enclave settings.

Pure Python, no TensorFlow: the compiler uses these to check calls, infer every tensor's shape and dtype,
and size messages (activations by shape, weights/gradients by parameter count). The TensorFlow
implementations in ``fldsl.stdlib.tf`` implement exactly these names and semantics:

Ops (batch-first; ``B`` is the batch dimension, ``None`` in a ``TensorSpec`` shape):

``embed(x: int[B,k], buckets: int, dim: int = 16) -> float32[B, k*dim]``
    one embedding table of ``buckets`` rows per input column (ids taken modulo ``buckets``); the k
    looked-up vectors are concatenated in column order. Parameters: ``k * buckets * dim``.
``mlp(x: float[B,n], units: list[int], activation: str = "relu") -> float32[B, units[-1]]``
    fully connected layers of the given widths, ``activation`` after EVERY layer (a bottom model /
    embedding producer). Parameters: sum of ``in*out + out`` over the layers.
``dense(x: float[B,n], units: list[int], activation: str = "relu") -> float32[B, units[-1]]``
    like ``mlp`` but the LAST layer is linear (logits).
``concat(a, b, ...) -> float32[B, sum of widths]``
    inputs cast to float32 and concatenated on axis 1. No parameters.
``wide_deep(sparse: int[B,k], dense: float[B,n] | none, buckets: int, embedding_dim: int = 8,
hidden: list[int] = [256, 128, 64]) -> float32[B, 1]``
    wide = one scalar weight per (column, id) summed + linear on ``dense`` + bias; deep = per-column
    embeddings ++ dense -> ``hidden`` (relu) -> 1 (linear); output = wide + deep (a logit).
``dlrm(dense: float[B,n], sparse: int[B,k], buckets: int = 100000, embedding_dim: int = 16,
bottom: list[int], top: list[int]) -> float32[B, top[-1]]``
    bottom MLP (relu on every layer) on ``dense`` whose last width must equal ``embedding_dim``;
    k embedding tables; pairwise dot products of the k+1 vectors (upper triangle, no diagonal)
    concatenated with the bottom output -> top MLP (relu, last layer linear).

Losses (mean over the batch): ``softmax_cross_entropy(logits[B,C], label int[B])`` (C >= 2),
``sigmoid_cross_entropy(logits[B,1], label int|float[B])``, ``mse(pred[B,1], label float[B])``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fldsl.artifacts import TensorSpec


class SignatureError(Exception):
    """A call does not fit an op's signature; the message is user-facing (the compiler adds the position)."""


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()

# Parameter types: "int", "float", "str", "bool", "list[int]", "list[str]", "tensor", "tensor?" (tensor or
# none), "name" (a bare identifier or a string, e.g. a column name).


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: Any = REQUIRED
    choices: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def is_tensor(self) -> bool:
        return self.type.startswith("tensor")


ShapeFn = Callable[[dict[str, Any]], TensorSpec]
CountFn = Callable[[dict[str, Any]], int]


@dataclass(frozen=True)
class OpSignature:
    """``params`` in positional order; tensor parameters receive ``TensorSpec`` values (or None)."""

    name: str
    params: tuple[Param, ...]
    shape: ShapeFn
    param_count: CountFn
    doc: str
    variadic: bool = False  # concat: every positional argument is a tensor, collected under "inputs"
    module: str = "std.models"

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


def _spec(shape: list[int | None], dtype: str = "float32") -> TensorSpec:
    return TensorSpec(shape=shape, dtype=dtype)  # type: ignore[arg-type]


def _matrix(x: TensorSpec, what: str, *, integer: bool | None = None) -> int:
    """Width of a ``[B, n]`` tensor, checking rank and (optionally) integer vs float dtype."""
    if len(x.shape) != 2 or x.shape[1] is None:
        raise SignatureError(f"{what} must be a [batch, n] tensor, got {fmt_spec(x)}")
    if integer is True and not x.dtype.startswith("int"):
        raise SignatureError(f"{what} must hold integer ids, got {fmt_spec(x)}")
    if integer is False and x.dtype not in ("float32", "float64", "int32", "int64", "bool"):
        raise SignatureError(f"{what} must be numeric, got {fmt_spec(x)}")
    return int(x.shape[1])


def _units(p: dict[str, Any], key: str = "units") -> list[int]:
    units = p[key]
    if not units or any(u <= 0 for u in units):
        raise SignatureError(f"`{key}` must be a non-empty list of positive widths, got {units}")
    return list(units)


def _mlp_count(n_in: int, units: list[int]) -> int:
    total, prev = 0, n_in
    for u in units:
        total += prev * u + u
        prev = u
    return total


def _positive(p: dict[str, Any], *keys: str) -> None:
    for k in keys:
        if p[k] <= 0:
            raise SignatureError(f"`{k}` must be positive, got {p[k]}")


def fmt_spec(s: TensorSpec) -> str:
    return s.text()


ACTIVATIONS = ("relu", "tanh", "sigmoid", "linear")


# --- embed ------------------------------------------------------------------------------------------------
def _embed_shape(p: dict[str, Any]) -> TensorSpec:
    k = _matrix(p["x"], "embed input `x`", integer=True)
    _positive(p, "buckets", "dim")
    return _spec([None, k * p["dim"]])


def _embed_count(p: dict[str, Any]) -> int:
    return _matrix(p["x"], "x") * p["buckets"] * p["dim"]


# --- mlp / dense ------------------------------------------------------------------------------------------
def _mlp_shape(p: dict[str, Any]) -> TensorSpec:
    _matrix(p["x"], "input `x`", integer=False)
    return _spec([None, _units(p)[-1]])


def _mlp_param_count(p: dict[str, Any]) -> int:
    return _mlp_count(_matrix(p["x"], "x"), _units(p))


# --- concat -----------------------------------------------------------------------------------------------
def _concat_shape(p: dict[str, Any]) -> TensorSpec:
    xs: list[TensorSpec] = p["inputs"]
    if len(xs) < 2:
        raise SignatureError(f"concat needs at least two tensors, got {len(xs)}")
    return _spec([None, sum(_matrix(x, f"concat input {i + 1}") for i, x in enumerate(xs))])


# --- wide_deep --------------------------------------------------------------------------------------------
def _wide_deep_dims(p: dict[str, Any]) -> tuple[int, int]:
    k = _matrix(p["sparse"], "`sparse`", integer=True)
    n = 0 if p["dense"] is None else _matrix(p["dense"], "`dense`", integer=False)
    _positive(p, "buckets", "embedding_dim")
    _units(p, "hidden")
    return k, n


def _wide_deep_shape(p: dict[str, Any]) -> TensorSpec:
    _wide_deep_dims(p)
    return _spec([None, 1])


def _wide_deep_count(p: dict[str, Any]) -> int:
    k, n = _wide_deep_dims(p)
    wide = k * p["buckets"] + n + 1
    deep = k * p["buckets"] * p["embedding_dim"] + _mlp_count(k * p["embedding_dim"] + n, [*p["hidden"], 1])
    return wide + deep


# --- dlrm -------------------------------------------------------------------------------------------------
def _dlrm_dims(p: dict[str, Any]) -> tuple[int, int]:
    n = _matrix(p["dense"], "`dense`", integer=False)
    k = _matrix(p["sparse"], "`sparse`", integer=True)
    _positive(p, "buckets", "embedding_dim")
    bottom, _top = _units(p, "bottom"), _units(p, "top")
    if bottom[-1] != p["embedding_dim"]:
        raise SignatureError(
            f"the last `bottom` width ({bottom[-1]}) must equal `embedding_dim` ({p['embedding_dim']})"
        )
    return n, k


def _dlrm_shape(p: dict[str, Any]) -> TensorSpec:
    _dlrm_dims(p)
    return _spec([None, p["top"][-1]])


def _dlrm_count(p: dict[str, Any]) -> int:
    n, k = _dlrm_dims(p)
    e = p["embedding_dim"]
    vectors = k + 1
    top_in = vectors * (vectors - 1) // 2 + e
    return _mlp_count(n, p["bottom"]) + k * p["buckets"] * e + _mlp_count(top_in, p["top"])


OPS: dict[str, OpSignature] = {
    "embed": OpSignature(
        "embed",
        (Param("x", "tensor"), Param("buckets", "int"), Param("dim", "int", 16)),
        _embed_shape,
        _embed_count,
        "one embedding table per integer column; outputs concatenated: float32[B, k*dim]",
    ),
    "mlp": OpSignature(
        "mlp",
        (Param("x", "tensor"), Param("units", "list[int]"), Param("activation", "str", "relu", ACTIVATIONS)),
        _mlp_shape,
        _mlp_param_count,
        "fully connected layers, activation on every layer: float32[B, units[-1]]",
    ),
    "dense": OpSignature(
        "dense",
        (Param("x", "tensor"), Param("units", "list[int]"), Param("activation", "str", "relu", ACTIVATIONS)),
        _mlp_shape,
        _mlp_param_count,
        "fully connected layers, last layer linear (logits): float32[B, units[-1]]",
    ),
    "concat": OpSignature(
        "concat", (), _concat_shape, lambda p: 0, "concatenate on axis 1: float32[B, sum]", variadic=True
    ),
    "wide_deep": OpSignature(
        "wide_deep",
        (
            Param("sparse", "tensor"),
            Param("dense", "tensor?", None),
            Param("buckets", "int"),
            Param("embedding_dim", "int", 8),
            Param("hidden", "list[int]", [256, 128, 64]),
        ),
        _wide_deep_shape,
        _wide_deep_count,
        "wide (per-id weights + linear) plus deep (embeddings -> MLP) logit: float32[B, 1]",
    ),
    "dlrm": OpSignature(
        "dlrm",
        (
            Param("dense", "tensor"),
            Param("sparse", "tensor"),
            Param("buckets", "int", 100000),
            Param("embedding_dim", "int", 16),
            Param("bottom", "list[int]"),
            Param("top", "list[int]"),
        ),
        _dlrm_shape,
        _dlrm_count,
        "DLRM: bottom MLP, embeddings, dot interaction, top MLP: float32[B, top[-1]]",
    ),
}


# --- losses -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossSignature:
    name: str
    check: Callable[[TensorSpec, TensorSpec], None]
    label_dtype: str  # dtype the reader must produce for the label
    doc: str


def _check_label(label: TensorSpec) -> None:
    if len(label.shape) != 1:
        raise SignatureError(f"the label must be a [batch] tensor, got {fmt_spec(label)}")


def _softmax_check(logits: TensorSpec, label: TensorSpec) -> None:
    c = _matrix(logits, "logits")
    if c < 2:
        raise SignatureError(
            f"softmax_cross_entropy needs logits [batch, C] with C >= 2, got {fmt_spec(logits)}"
        )
    _check_label(label)
    if not label.dtype.startswith("int"):
        raise SignatureError(f"softmax_cross_entropy needs an integer class label, got {fmt_spec(label)}")


def _single_check(name: str) -> Callable[[TensorSpec, TensorSpec], None]:
    def check(logits: TensorSpec, label: TensorSpec) -> None:
        if _matrix(logits, "logits") != 1:
            raise SignatureError(f"{name} needs a [batch, 1] input, got {fmt_spec(logits)}")
        _check_label(label)

    return check


LOSSES: dict[str, LossSignature] = {
    "softmax_cross_entropy": LossSignature(
        "softmax_cross_entropy", _softmax_check, "int64", "mean softmax cross entropy over C classes"
    ),
    "sigmoid_cross_entropy": LossSignature(
        "sigmoid_cross_entropy", _single_check("sigmoid_cross_entropy"), "int64", "mean binary cross entropy"
    ),
    "mse": LossSignature("mse", _single_check("mse"), "float32", "mean squared error"),
}


# --- optimisers -------------------------------------------------------------------------------------------
OPTIMIZERS: dict[str, tuple[Param, ...]] = {
    "sgd": (Param("learning_rate", "float", 0.01), Param("momentum", "float", 0.0)),
    "adam": (
        Param("learning_rate", "float", 0.001),
        Param("beta1", "float", 0.9),
        Param("beta2", "float", 0.999),
        Param("epsilon", "float", 1e-7),
    ),
    "adagrad": (Param("learning_rate", "float", 0.01), Param("initial_accumulator", "float", 0.1)),
}


# --- readers ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReaderSignature:
    name: str
    params: tuple[Param, ...]
    id_column: str | None  # generators: the fixed id column name
    doc: str
    fields: Callable[[dict[str, Any]], dict[str, TensorSpec]] = field(default=lambda p: {})


def _criteo_fields(p: dict[str, Any]) -> dict[str, TensorSpec]:
    return {"dense": _spec([None, 13]), "sparse": _spec([None, 26], "int64"), "label": _spec([None], "int64")}


def _wnd_fields(p: dict[str, Any]) -> dict[str, TensorSpec]:
    out = {"sparse": _spec([None, p["features"]], "int64")}
    if p["side"] == "leader":
        out["label"] = _spec([None], "int64")
    return out


# How many classes the label of a generated reader has (its generator draws 0/1 clicks): the checker refuses
# a softmax over another number of logits, which would otherwise only fail (or, wider, silently waste
# classes) at run time. csv labels are not known before the node reads its file (runtime/data.py checks
# each row against the logits width there).
LABEL_CLASSES: dict[str, int] = {"criteo": 2, "wide_n_deep": 2}


READERS: dict[str, ReaderSignature] = {
    # csv fields depend on the header; the compiler reads it and builds them (features, label).
    "csv": ReaderSignature(
        "csv",
        (
            Param("path", "str"),
            Param("id", "name", "id"),
            Param("label", "name", None),
            Param("columns", "list[str]", ["*"]),
        ),
        None,
        "a CSV file with a header: `features` float32[B, n] from `columns` (glob patterns), `label`",
    ),
    # Parquet: the same arguments and fields; the compiler reads the footer (column names, row count) where
    # there is no schema block.
    "parquet": ReaderSignature(
        "parquet",
        (
            Param("path", "str"),
            Param("id", "name", "id"),
            Param("label", "name", None),
            Param("columns", "list[str]", ["*"]),
        ),
        None,
        "a Parquet file: `features` float32[B, n] from `columns` (glob patterns), `label`",
    ),
    "criteo": ReaderSignature(
        "criteo",
        (
            Param("rows", "int"),  # total over all parts; part p holds rows[rows*p//parts, rows*(p+1)//parts)
            Param("seed", "int", 0),
            Param("part", "int", 0),
            Param("parts", "int", 1),
            Param("buckets", "int", 100000),
        ),
        "id",
        "generated Criteo layout: dense float32[B,13], sparse int64[B,26], label int64[B]",
        _criteo_fields,
    ),
    "wide_n_deep": ReaderSignature(
        "wide_n_deep",
        (
            Param("rows", "int"),
            Param("seed", "int", 0),
            Param("side", "str", REQUIRED, ("leader", "follower")),
            Param("features", "int", 512),
            Param("overlap", "float", 0.9),
        ),
        "example_id",
        "generated Fedlearner wide_n_deep layout: sparse int64[B, features] (+ label int64[B] on the leader)",
        _wnd_fields,
    ),
}


# --- enclave settings (trust block) ----------------------------------------------------------------------
ENCLAVE_PARAMS: tuple[Param, ...] = (
    Param("enclave_size", "str", "8G"),
    Param("max_threads", "int", 64),
    Param("isv_prod_id", "int", 0),
    Param("isv_svn", "int", 0),
    Param("debug", "bool", False),
    Param("edmm", "bool", False),
)
