"""Deterministic synthetic data with a planted, learnable signal (numpy only).

- ``criteo(rows, seed, part=0, parts=1, buckets=100000)``: the Criteo display-ads layout (13 dense =
  log1p(lognormal), 26 categorical ids with Zipf-like skew hashed into ``buckets``), label ~
  Bernoulli(sigmoid(planted linear on dense + per-id effects)). ``rows`` is the TOTAL over all parts; part p
  gets the contiguous global rows ``[rows*p//parts, rows*(p+1)//parts)``, so parts are disjoint, identically
  distributed, and together equal ``parts=1``. Rows are generated in fixed blocks seeded by the block index,
  so a part only generates its own blocks. Ids are the global row numbers.
- ``wide_n_deep(rows, seed, side, features=512, overlap=0.9)``: Fedlearner's example layout (string example
  ids, ``features`` int slots in [0, 100]; label on the leader) with a planted signal SPLIT across both sides:
  label ~ Bernoulli(sigmoid(2 (z_leader + z_follower))) where each side's latent z is visible only through
  that side's informative slots (every 4th slot, value = 50 + 8 round(2.5 z + noise)). A model needs both
  parties to do well. Leader and follower each hold ``rows`` rows, ``round(overlap*rows)`` of them common,
  each side in its own shuffled order (so PSI alignment is needed). Both sides must use the same
  rows/seed/features/overlap; only ``side`` differs.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from fldsl.runtime.data import DataError, Table

CRITEO_DENSE = 13
CRITEO_SPARSE = 26
_BLOCK = 8192
_MAX_ROWS = 50_000_000


def _rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256("/".join(str(p) for p in ("fldsl-datagen/1", *parts)).encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


def _int(params: dict[str, Any], name: str, default: int | None, where: str, lo: int = 0) -> int:
    value = params.get(name, default)
    if value is None:
        raise DataError(f"{where}: generator parameter `{name}` is required")
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise DataError(f"{where}: `{name}` must be an integer >= {lo}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------------
# Criteo layout
# ---------------------------------------------------------------------------------------------------------


def _hash_ids(raw: np.ndarray, column: int, buckets: int) -> np.ndarray:
    # splitmix64-style mixing in wrapping uint64 arithmetic: spreads Zipf ranks over the buckets.
    with np.errstate(over="ignore"):
        h = raw.astype(np.uint64) + np.uint64((column + 1) * 0x9E3779B97F4A7C15 % 2**64)
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        h = h ^ (h >> np.uint64(31))
    return (h % np.uint64(buckets)).astype(np.int64)


def _criteo_world(seed: int, buckets: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = _rng("criteo-world", seed, buckets)
    w = rng.normal(0.0, 1.0, CRITEO_DENSE)
    vocab = np.unique(np.geomspace(20, 200_000, CRITEO_SPARSE).astype(np.int64), return_counts=False)
    vocab = np.resize(vocab, CRITEO_SPARSE)
    # Ten informative columns carry per-id effects; the others are noise a model must learn to ignore.
    scale = np.zeros(CRITEO_SPARSE)
    scale[rng.choice(CRITEO_SPARSE, 10, replace=False)] = 0.8
    noise = rng.standard_normal((CRITEO_SPARSE, buckets), dtype=np.float32)
    effects = noise * scale[:, None].astype(np.float32)
    return w, vocab, effects


def _criteo_block(seed: int, buckets: int, block: int, world: tuple[np.ndarray, np.ndarray, np.ndarray]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    w, vocab, effects = world
    rng = _rng("criteo-rows", seed, buckets, block)
    n = _BLOCK
    dense = np.log1p(rng.lognormal(0.0, 1.2, (n, CRITEO_DENSE)))
    sparse = np.empty((n, CRITEO_SPARSE), dtype=np.int64)
    logit = (dense - 1.0) @ w - 1.2
    for c in range(CRITEO_SPARSE):
        raw = (rng.zipf(1.25, n) - 1) % vocab[c]
        sparse[:, c] = _hash_ids(raw, c, buckets)
        logit = logit + effects[c, sparse[:, c]]
    label = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    return dense.astype(np.float32), sparse, label


def criteo(rows: int, seed: int, part: int = 0, parts: int = 1, buckets: int = 100_000) -> Table:
    if not 0 <= part < parts:
        raise DataError(f"criteo: part must be in [0, parts), got part={part}, parts={parts}")
    start, end = rows * part // parts, rows * (part + 1) // parts
    world = _criteo_world(seed, buckets)
    dense, sparse, label = [], [], []
    for b in range(start // _BLOCK, (end + _BLOCK - 1) // _BLOCK):
        d, s, y = _criteo_block(seed, buckets, b, world)
        lo, hi = max(start - b * _BLOCK, 0), min(end - b * _BLOCK, _BLOCK)
        dense.append(d[lo:hi])
        sparse.append(s[lo:hi])
        label.append(y[lo:hi])
    if not dense:
        return Table(np.zeros(0, np.int64), {"dense": np.zeros((0, CRITEO_DENSE), np.float32),
                                              "sparse": np.zeros((0, CRITEO_SPARSE), np.int64),
                                              "label": np.zeros(0, np.int64)})
    return Table(ids=np.arange(start, end, dtype=np.int64),
                 fields={"dense": np.concatenate(dense), "sparse": np.concatenate(sparse),
                         "label": np.concatenate(label)})


# ---------------------------------------------------------------------------------------------------------
# Fedlearner wide_n_deep layout
# ---------------------------------------------------------------------------------------------------------

WND_MAX_VALUE = 100  # slot values are in [0, 100] (101 values), as in Fedlearner's make_data.py


def wide_n_deep(rows: int, seed: int, side: str, features: int = 512, overlap: float = 0.9) -> Table:
    if side not in ("leader", "follower"):
        raise DataError(f"wide_n_deep: side must be \"leader\" or \"follower\", got {side!r}")
    if not 0.0 <= overlap <= 1.0:
        raise DataError(f"wide_n_deep: overlap must be in [0, 1], got {overlap}")
    if features < 1:
        raise DataError(f"wide_n_deep: features must be >= 1, got {features}")
    common = round(rows * overlap)
    universe = 2 * rows - common
    world = _rng("wnd-world", seed, rows, features, overlap)
    z = world.standard_normal((universe, 2))  # column 0: leader's latent, 1: follower's
    label = (world.random(universe) < 1.0 / (1.0 + np.exp(-2.0 * (z[:, 0] + z[:, 1])))).astype(np.int64)
    id_numbers = world.permutation(universe)
    # Universe rows [0, common) are held by both, [common, rows) by the leader only, [rows, universe)
    # by the follower only; ids are permuted so the id value does not tell which.
    if side == "leader":
        held = np.arange(0, rows)
        latent = z[:, 0]
    else:
        held = np.concatenate([np.arange(0, common), np.arange(rows, universe)])
        latent = z[:, 1]
    srng = _rng("wnd-side", seed, rows, features, overlap, side)
    values = srng.integers(0, WND_MAX_VALUE + 1, (universe, features), dtype=np.int64)
    informative = np.arange(0, features, 4)
    # Coarse levels (steps of 8 around 50): few distinct values per slot, so an embedding learns them from
    # a couple of thousand rows; the noise keeps any single slot a weak predictor.
    level = np.rint(2.5 * latent[:, None] + srng.normal(0.0, 1.0, (universe, informative.size)))
    values[:, informative] = np.clip(50 + 8 * level, 0, WND_MAX_VALUE).astype(np.int64)
    order = held[srng.permutation(held.size)]
    fields = {"sparse": values[order]}
    if side == "leader":
        fields["label"] = label[order]
    ids = np.array([str(v) for v in id_numbers[order].tolist()])
    return Table(ids=ids, fields=fields)


# ---------------------------------------------------------------------------------------------------------
# DataSpec params -> generator
# ---------------------------------------------------------------------------------------------------------


def generate(reader: str, params: dict[str, Any], where: str = "generator") -> Table:
    known = {"criteo": {"rows", "seed", "part", "parts", "buckets"},
             "wide_n_deep": {"rows", "seed", "side", "features", "overlap"}}[reader]
    unknown = sorted(set(params) - known)
    if unknown:
        raise DataError(f"{where}: unknown {reader} parameter(s) {', '.join(unknown)} "
                        f"(known: {', '.join(sorted(known))})")
    rows = _int(params, "rows", None, where, lo=1)
    if rows > _MAX_ROWS:
        raise DataError(f"{where}: rows must be at most {_MAX_ROWS}, got {rows}")
    seed = _int(params, "seed", 0, where)
    if reader == "criteo":
        parts = _int(params, "parts", 1, where, lo=1)
        buckets = _int(params, "buckets", 100_000, where, lo=1)
        return criteo(rows, seed, _int(params, "part", 0, where), parts, buckets)
    overlap = params.get("overlap", 0.9)
    if isinstance(overlap, bool) or not isinstance(overlap, int | float):
        raise DataError(f"{where}: `overlap` must be a number, got {overlap!r}")
    side = params.get("side", "leader")
    if not isinstance(side, str):
        raise DataError(f"{where}: `side` must be \"leader\" or \"follower\", got {side!r}")
    return wide_n_deep(rows, seed, side, _int(params, "features", 512, where, lo=1), float(overlap))
