"""Optimiser state <-> checkpoint arrays (the stdlib optimiser exposes an ordered list of numpy arrays)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

PREFIX = "opt"


def get_opt_state(opt: Any, variables: Sequence[Any]) -> dict[str, np.ndarray]:
    opt.build(variables)  # slots exist even before the first step (a checkpoint at step 0 of a resume)
    return {f"{PREFIX}{i:05d}": np.asarray(a) for i, a in enumerate(opt.get_state())}


def set_opt_state(opt: Any, variables: Sequence[Any], arrays: dict[str, np.ndarray]) -> None:
    keys = sorted(k for k in arrays if k.startswith(PREFIX))
    opt.set_state([arrays[k] for k in keys], list(variables))
