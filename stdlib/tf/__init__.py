"""TensorFlow implementations of the stdlib ops, losses, optimisers and metrics.

Importing this package does not import TensorFlow (3-4 s: BENCHMARKS.md, "Micro benchmarks and start-up"); the
names below are resolved on first use so that e.g. ``fldsl.stdlib.tf.metrics`` (numpy only) stays cheap.

Public API (ARCHITECTURE.md, "Stdlib TensorFlow"):

- ``build_segment(ops, input_specs, seed) -> Segment``       (:mod:`.segment`)
- ``loss_fn(LossSpec)``, ``scores(LossSpec, logits)``       (:mod:`.losses`)
- ``make_optimizer(OptimizerSpec) -> Optimizer``             (:mod:`.optim`)
- ``auc``, ``accuracy``, ``ScoreAccumulator``                (:mod:`.metrics`)
- ``train_central(...)``, ``train_central_plans(plans)`` -> ``CentralResult`` (:mod:`.central`)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_segment": "segment",
    "Segment": "segment",
    "SegmentError": "segment",
    "loss_fn": "losses",
    "scores": "losses",
    "make_optimizer": "optim",
    "Optimizer": "optim",
    "auc": "metrics",
    "accuracy": "metrics",
    "ScoreAccumulator": "metrics",
    "train_central": "central",
    "CentralResult": "central",
    "train_central_plans": "central",
    "epoch_batches": "batching",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
