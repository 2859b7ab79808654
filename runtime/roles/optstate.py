"""Model weights and optimiser state <-> checkpoint arrays, the one layout every role saves and restores.

Weights are ``w0000..`` (in the segment's variable order) and optimiser slots ``opt00000..`` (the stdlib
optimiser exposes an ordered list of numpy arrays).
"""

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


WEIGHTS = "w"


def training_arrays(
    weights: Sequence[np.ndarray], opt: Any | None, variables: Sequence[Any]
) -> dict[str, np.ndarray]:
    """Everything a checkpoint needs to resume training: the weights and (if any) the optimiser slots.

    Takes the weights rather than the model: callers usually hold them already (a copy of a large model).
    """
    arrays = {f"{WEIGHTS}{i:04d}": w for i, w in enumerate(weights)}
    if opt is not None:
        arrays.update(get_opt_state(opt, variables))
    return arrays


def restore_training(
    model: Any, opt: Any | None, variables: Sequence[Any], arrays: dict[str, np.ndarray]
) -> None:
    """The inverse of :func:`training_arrays`."""
    model.set_weights([arrays[k] for k in sorted(k for k in arrays if k.startswith(WEIGHTS))])
    if opt is not None:
        set_opt_state(opt, variables, arrays)
