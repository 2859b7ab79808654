"""Batch order shared by the central reference and the federated runtime (numpy only, no TensorFlow).

Both sides of a vertical split and the central reference call ``epoch_batches`` with the same
``(n, batch_size, seed, epoch)``, so they visit rows in the same order; combined with the canonical order of
``fldsl.runtime.data.stratified_split`` this makes the federated run and the central run see identical
batches.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=8)
def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of one epoch. Cached (training loops ask for it every step) and read-only, so no caller
    can change the order another caller sees."""
    digest = hashlib.sha256(f"fldsl-batches/1/{seed}/{epoch}".encode()).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))
    order = rng.permutation(n)
    order.flags.writeable = False
    return order


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[np.ndarray]:
    """Row indices of each batch of one epoch (the last batch may be smaller; none is empty)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = epoch_permutation(n, seed, epoch) if shuffle else np.arange(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def steps_per_epoch(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size
