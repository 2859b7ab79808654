"""Optimisers with sparse (lazy, row-wise) updates for embedding tables; Keras-free.

Keras 3 Adam/Adagrad densify ``IndexedSlices`` and so touch every row of every table each step
(measured 4-9x slower on embedding-heavy models: BENCHMARKS.md). Here the update is chosen per gradient:

- a dense ``tf.Tensor`` gradient gets the textbook update (same formulas and defaults as Keras 3, so a
  dense model trains identically);
- an ``IndexedSlices`` gradient (what ``tf.gather`` on a table produces) is summed per unique row and only
  those rows of the variable and of its slots are read and written ("lazy" Adam / Adagrad / momentum, as in
  TF1's ``LazyAdamOptimizer``). For rows that are in the batch this equals the dense update on the first
  step; later it differs only in that untouched rows keep their moments instead of decaying them.

``apply(grads, variables)`` works eagerly and inside ``tf.function``; slots are created on first use under
``tf.init_scope`` (or up front with ``build``). ``get_state`` / ``set_state`` move the step counter and every
slot as numpy arrays, in ``build`` order, so checkpoints restore the optimiser exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, TypeAlias

import numpy as np
import tensorflow as tf

from fldsl.artifacts import OptimizerSpec

Grad: TypeAlias = "tf.Tensor | tf.IndexedSlices | None"


class OptimizerError(ValueError):
    """Bad optimiser parameters, or a state that does not fit (user-facing message)."""


def unique_rows(g: tf.IndexedSlices) -> tuple[tf.Tensor, tf.Tensor]:
    """Sum the rows of an IndexedSlices that hit the same index (a batch often repeats ids)."""
    idx, pos = tf.unique(tf.cast(g.indices, tf.int64))
    values = tf.math.unsorted_segment_sum(g.values, pos, tf.shape(idx)[0])
    return idx, values


# The spellings of ``fldsl.stdlib.signatures.OPTIMIZERS`` (what the compiler writes into plans) -> ours
# (Keras'). Both are accepted.
ALIASES = {"beta1": "beta_1", "beta2": "beta_2", "initial_accumulator": "initial_accumulator_value"}


class Optimizer:
    name = "base"
    slot_names: tuple[str, ...] = ()
    defaults: ClassVar[dict[str, float | bool]] = {}

    def __init__(self, **params: Any) -> None:
        params = {ALIASES.get(k, k): v for k, v in params.items()}
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise OptimizerError(f"optimizer {self.name}: unknown parameter(s) {', '.join(unknown)} "
                                 f"(known: {', '.join(sorted(self.defaults))})")
        self.hyper: dict[str, Any] = {**self.defaults, **params}
        for k, v in self.hyper.items():
            if isinstance(self.defaults[k], bool):
                if not isinstance(v, bool):
                    raise OptimizerError(f"optimizer {self.name}: `{k}` must be true or false")
            elif isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                raise OptimizerError(f"optimizer {self.name}: `{k}` must be a non-negative number, got {v!r}")
        if self.hyper.get("learning_rate", 1.0) <= 0:
            raise OptimizerError(f"optimizer {self.name}: learning_rate must be positive")
        with tf.init_scope():
            self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="iterations")
        self._slots: dict[Any, dict[str, tf.Variable]] = {}
        self._order: list[tf.Variable] = []

    # -- slots -------------------------------------------------------------------------------------------

    def _initial_slot(self, slot: str, var: tf.Variable) -> np.ndarray:
        return np.zeros(var.shape, dtype=var.dtype.as_numpy_dtype)

    def build(self, variables: Sequence[tf.Variable]) -> None:
        """Create the slots of any variable not seen before (eagerly, even when called while tracing)."""
        new = [v for v in variables if v.ref() not in self._slots]
        if not new:
            return
        with tf.init_scope():
            for v in new:
                base = v.name.split(":")[0]
                self._slots[v.ref()] = {
                    s: tf.Variable(self._initial_slot(s, v), trainable=False, name=f"{base}__{s}")
                    for s in self.slot_names
                }
                self._order.append(v)

    def sparse_is_exact(self) -> bool:
        """Whether the row-wise update of an ``IndexedSlices`` gradient equals the dense update of the same
        gradient with zeros elsewhere (rows without a gradient then do not change at all). True for plain SGD
        and Adagrad; False where untouched rows still move (momentum, Adam's moment decay): there the sparse
        update is the lazy variant, a different algorithm."""
        return False

    def slot(self, var: tf.Variable, name: str) -> tf.Variable:
        return self._slots[var.ref()][name]

    # -- update ------------------------------------------------------------------------------------------

    def apply(self, grads: Sequence[Grad], variables: Sequence[tf.Variable]) -> None:
        """One step: update every variable whose gradient is not None."""
        if len(grads) != len(variables):
            raise OptimizerError(f"apply: {len(grads)} gradients for {len(variables)} variables")
        self.build(variables)
        self.iterations.assign_add(1)
        step = tf.cast(self.iterations, tf.float32)
        for g, v in zip(grads, variables, strict=True):
            if g is None:
                continue
            if isinstance(g, tf.IndexedSlices):
                idx, values = unique_rows(g)
                self._sparse(v, idx, tf.cast(values, v.dtype), step)
            else:
                self._dense(v, tf.cast(tf.convert_to_tensor(g), v.dtype), step)

    def _dense(self, var: tf.Variable, g: tf.Tensor, step: tf.Tensor) -> None:  # pragma: no cover
        raise NotImplementedError

    def _sparse(
        self, var: tf.Variable, idx: tf.Tensor, g: tf.Tensor, step: tf.Tensor
    ) -> None:  # pragma: no cover
        raise NotImplementedError

    # -- state -------------------------------------------------------------------------------------------

    def get_state(self) -> list[np.ndarray]:
        """[iterations, then each slot of each variable in build order]."""
        out = [np.asarray(self.iterations.numpy(), dtype=np.int64)]
        for v in self._order:
            out += [self._slots[v.ref()][s].numpy() for s in self.slot_names]
        return out

    def set_state(self, state: Sequence[np.ndarray], variables: Sequence[tf.Variable] | None = None) -> None:
        """Restore ``get_state`` output; ``variables`` (the same list as at save time) builds slots first."""
        if variables is not None:
            self.build(variables)
        want = 1 + len(self._order) * len(self.slot_names)
        if len(state) != want:
            raise OptimizerError(f"optimizer state has {len(state)} arrays, this {self.name} optimizer over "
                                 f"{len(self._order)} variables needs {want}")
        slots = [self._slots[v.ref()][s] for v in self._order for s in self.slot_names]
        for var, value in zip(slots, state[1:], strict=True):
            if tuple(np.shape(value)) != tuple(var.shape):
                raise OptimizerError(f"optimizer slot `{var.name}` has shape {tuple(var.shape)}, "
                                     f"the state has {tuple(np.shape(value))}")
        self.iterations.assign(int(np.asarray(state[0])))
        for var, value in zip(slots, state[1:], strict=True):
            var.assign(np.asarray(value, dtype=var.dtype.as_numpy_dtype))


class SGD(Optimizer):
    name = "sgd"
    defaults: ClassVar[dict[str, float | bool]] = {"learning_rate": 0.01, "momentum": 0.0, "nesterov": False}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.slot_names = ("momentum",) if self.hyper["momentum"] > 0 else ()

    def sparse_is_exact(self) -> bool:
        return not self.hyper["momentum"]

    def _dense(self, var: tf.Variable, g: tf.Tensor, step: tf.Tensor) -> None:
        lr = float(self.hyper["learning_rate"])
        mu = float(self.hyper["momentum"])
        if not mu:
            var.assign_sub(lr * g)
            return
        m = self.slot(var, "momentum")
        m.assign(mu * m - lr * g)
        var.assign_add(mu * m - lr * g if self.hyper["nesterov"] else m)

    def _sparse(self, var: tf.Variable, idx: tf.Tensor, g: tf.Tensor, step: tf.Tensor) -> None:
        lr = float(self.hyper["learning_rate"])
        mu = float(self.hyper["momentum"])
        if not mu:
            var.scatter_sub(tf.IndexedSlices(lr * g, idx))
            return
        m = self.slot(var, "momentum")
        m_rows = mu * tf.gather(m, idx) - lr * g
        m.scatter_update(tf.IndexedSlices(m_rows, idx))
        delta = mu * m_rows - lr * g if self.hyper["nesterov"] else m_rows
        var.scatter_add(tf.IndexedSlices(delta, idx))


class Adam(Optimizer):
    name = "adam"
    slot_names = ("m", "v")
    defaults: ClassVar[dict[str, float | bool]] = {
        "learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7,
    }

    def _alpha(self, step: tf.Tensor) -> tf.Tensor:
        b1, b2 = float(self.hyper["beta_1"]), float(self.hyper["beta_2"])
        return self.hyper["learning_rate"] * tf.sqrt(1.0 - tf.pow(b2, step)) / (1.0 - tf.pow(b1, step))

    def _dense(self, var: tf.Variable, g: tf.Tensor, step: tf.Tensor) -> None:
        b1, b2, eps = float(self.hyper["beta_1"]), float(self.hyper["beta_2"]), float(self.hyper["epsilon"])
        m, v = self.slot(var, "m"), self.slot(var, "v")
        m.assign_add((g - m) * (1.0 - b1))
        v.assign_add((tf.square(g) - v) * (1.0 - b2))
        var.assign_sub(self._alpha(step) * m / (tf.sqrt(v) + eps))

    def _sparse(self, var: tf.Variable, idx: tf.Tensor, g: tf.Tensor, step: tf.Tensor) -> None:
        b1, b2, eps = float(self.hyper["beta_1"]), float(self.hyper["beta_2"]), float(self.hyper["epsilon"])
        m, v = self.slot(var, "m"), self.slot(var, "v")
        m_old, v_old = tf.gather(m, idx), tf.gather(v, idx)
        m_rows = m_old + (g - m_old) * (1.0 - b1)
        v_rows = v_old + (tf.square(g) - v_old) * (1.0 - b2)
        m.scatter_update(tf.IndexedSlices(m_rows, idx))
        v.scatter_update(tf.IndexedSlices(v_rows, idx))
        var.scatter_sub(tf.IndexedSlices(self._alpha(step) * m_rows / (tf.sqrt(v_rows) + eps), idx))


class Adagrad(Optimizer):
    name = "adagrad"
    slot_names = ("accumulator",)
    defaults: ClassVar[dict[str, float | bool]] = {
        "learning_rate": 0.01, "initial_accumulator_value": 0.1, "epsilon": 1e-7,
    }

    def sparse_is_exact(self) -> bool:
        return True  # a zero gradient row adds nothing to its accumulator and moves nothing

    def _initial_slot(self, slot: str, var: tf.Variable) -> np.ndarray:
        return np.full(var.shape, self.hyper["initial_accumulator_value"], dtype=var.dtype.as_numpy_dtype)

    def _dense(self, var: tf.Variable, g: tf.Tensor, step: tf.Tensor) -> None:
        acc = self.slot(var, "accumulator")
        acc.assign_add(tf.square(g))
        var.assign_sub(self.hyper["learning_rate"] * g / tf.sqrt(acc + self.hyper["epsilon"]))

    def _sparse(self, var: tf.Variable, idx: tf.Tensor, g: tf.Tensor, step: tf.Tensor) -> None:
        acc = self.slot(var, "accumulator")
        acc_rows = tf.gather(acc, idx) + tf.square(g)
        acc.scatter_update(tf.IndexedSlices(acc_rows, idx))
        delta = self.hyper["learning_rate"] * g / tf.sqrt(acc_rows + self.hyper["epsilon"])
        var.scatter_sub(tf.IndexedSlices(delta, idx))


OPTIMIZERS: dict[str, type[Optimizer]] = {"sgd": SGD, "adam": Adam, "adagrad": Adagrad}


def make_optimizer(spec: OptimizerSpec) -> Optimizer:
    cls = OPTIMIZERS.get(spec.name)
    if cls is None:
        raise OptimizerError(f"unknown optimizer `{spec.name}` (known: {', '.join(sorted(OPTIMIZERS))})")
    return cls(**spec.params)
