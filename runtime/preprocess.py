"""Preprocessing declared in a csv schema block, fitted where the data lives (docs/language.md, "Schema
blocks" and "Preprocessing").

A schema line may fill missing values (``missing: "?" mean indicator``), scale (``scale: standard``), and
turn a text column into one-hot columns (``category c vocabulary: top 100`` or ``hash: 1000 buckets``). The
node that holds the column reads it raw (:func:`raw_columns`: numbers with NaN where a cell is missing,
category values as text), and once it knows which of its rows are training rows, fits the statistics on
those rows only and transforms every row (:func:`fit_tables`). Nothing about a column leaves its node; the
fitted statistics are written, as the JSON-able dict :func:`fit` returns, into the node's exported model
(the ``preprocessing`` member of the sealed ``.npz``), so the model can be applied to new rows.

The feature matrix is the selected columns in declaration order, each expanded in place:

- numeric / integer: ``[value]``, or ``[value, missing]`` with ``indicator`` (1.0 where the cell was missing);
  the value is filled, then scaled; with ``bucketize: [b1..bk]`` the value becomes the k + 1 one-hot columns
  of its bucket (``searchsorted(bounds, value, side="right")``), then the indicator.
- category with ``vocabulary: top k``: k + 1 one-hot columns, one per vocabulary value (most frequent
  first) and a last one for every other value; with ``hash: N buckets``: N one-hot columns, the value's
  bucket ``tf.strings.to_hash_bucket_fast(value, N)`` (FarmHash64 mod N; nothing fitted).

A missing category value (an empty cell, or the declared token) is the empty value ``""``, a category of its
own: counted for the vocabulary like any other, hashed like any other.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fldsl.artifacts import FILE_READERS, POOLED_STATS, ColumnSpec, DataSpec
from fldsl.runtime.data import DataError

if TYPE_CHECKING:
    from fldsl.runtime.data import RawColumn

FORMAT = "fldsl.preprocessing/1"
MISSING_CATEGORY = ""  # what a missing category value becomes (a category of its own)


class PreprocessError(DataError):
    """A data set's preprocessing cannot be fitted or applied (e.g. a test set without the columns)."""


def needs_fit(spec: DataSpec) -> bool:
    """Whether ``spec``'s features need a transform fitted on the training rows before the model sees them
    (any selected column with ``missing:``, ``scale:`` or of type ``category``)."""
    if spec.reader not in FILE_READERS or spec.columns is None:
        return False
    selected = set(spec.feature_columns)
    return any(c.fitted for c in spec.columns if c.name in selected)


def feature_specs(spec: DataSpec) -> list[ColumnSpec]:
    """The declared columns that are features, in feature order."""
    by_name = {c.name: c for c in spec.columns or []}
    return [by_name[n] for n in spec.feature_columns]


def missing_mask(cells: Sequence[str] | np.ndarray, token: str | None) -> np.ndarray:
    """True where a cell is missing: empty (after stripping spaces) or equal to ``token``."""
    stripped = np.char.strip(np.asarray(cells, dtype=str)) if len(cells) else np.zeros(0, dtype=str)
    mask = stripped == ""
    if token is not None:
        mask |= stripped == token
    return np.asarray(mask, dtype=bool)


def raw_columns(spec: DataSpec, cells: Mapping[str, Sequence[str] | np.ndarray]) -> dict[str, np.ndarray]:
    """The feature columns as read, from their csv cells (already checked against the schema):
    numeric/integer as float64 with NaN where missing, category as text with missing values ``""``."""
    out: dict[str, np.ndarray] = {}
    for c in feature_specs(spec):
        col = cells[c.name]
        token = c.missing.token if c.missing is not None else None
        miss = missing_mask(col, token)
        if c.type == "category":
            values = np.char.strip(np.asarray(col, dtype=str)) if len(col) else np.zeros(0, dtype=str)
            out[c.name] = np.where(miss, MISSING_CATEGORY, values).astype(str)
        else:
            x = np.full(len(col), np.nan, dtype=np.float64)
            keep = np.flatnonzero(~miss)
            x[keep] = np.fromiter((float(col[i]) for i in keep.tolist()), dtype=np.float64, count=keep.size)
            out[c.name] = x
    return out


# ---------------------------------------------------------------------------------------------------------
# Fit and apply
# ---------------------------------------------------------------------------------------------------------


def local_stats(spec: DataSpec, raw: Mapping[str, RawColumn], train_rows: np.ndarray) -> np.ndarray:
    """This worker's ``stats`` message: float64[pooled columns, len(POOLED_STATS)], one row per pooled
    column over its training rows (present count, mean, M2, min, max, missing count; docs/language.md)."""
    rows = np.asarray(train_rows, dtype=np.int64)
    cols = spec.pooled_columns()
    out = np.zeros((len(cols), len(POOLED_STATS)), dtype=np.float64)
    for i, c in enumerate(cols):
        x = np.asarray(raw[c.name].take(rows), dtype=np.float64)
        seen = x[~np.isnan(x)]
        if seen.size:
            mean = float(np.mean(seen))
            out[i] = (seen.size, mean, float(np.sum((seen - mean) ** 2)), seen.min(), seen.max(), 0.0)
        out[i, 5] = x.size - seen.size
    return out


def merge_stats(parts: Sequence[np.ndarray]) -> np.ndarray:
    """The workers' ``stats`` messages merged into the statistics of all their training rows together
    (Chan, Golub and LeVeque's pairwise update of count, mean and M2; min/max over parts with values).
    Merged in the order given (the aggregator's worker order), so every worker gets the same bytes."""
    out = np.zeros_like(parts[0], dtype=np.float64)
    for part in parts:
        for i in range(out.shape[0]):
            out[i] = _merge_row(out[i], part[i])
    return out


def _merge_row(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na, nb = a[0], b[0]
    if nb == 0:
        return np.array([na, a[1], a[2], a[3], a[4], a[5] + b[5]])
    if na == 0:
        return np.array([nb, b[1], b[2], b[3], b[4], a[5] + b[5]])
    n = na + nb
    delta = b[1] - a[1]
    return np.array([n, a[1] + delta * nb / n, a[2] + b[2] + delta * delta * na * nb / n,
                     min(a[3], b[3]), max(a[4], b[4]), a[5] + b[5]])


def fit(spec: DataSpec, raw: Mapping[str, RawColumn], train_rows: np.ndarray,
        pooled: np.ndarray | None = None) -> dict[str, Any]:
    """The fitted transforms of ``spec``'s features, from the training rows ``train_rows`` of ``raw`` only
    (format ``fldsl.preprocessing/1``, documented in docs/language.md; JSON-able, deterministic).
    ``pooled`` (horizontal: :func:`merge_stats` of every worker's :func:`local_stats`) replaces this node's
    own statistics of the pooled columns: every worker then fits what central training would."""
    rows = np.asarray(train_rows, dtype=np.int64)
    pooled_rows = {c.name: i for i, c in enumerate(spec.pooled_columns())} if pooled is not None else {}
    columns: list[dict[str, Any]] = []
    start = 0
    for c in feature_specs(spec):
        if c.name in pooled_rows:
            assert pooled is not None
            columns.append(_fit_pooled(c, pooled[pooled_rows[c.name]], [start, start + c.width]))
            start += c.width
            continue
        x = raw[c.name].take(rows)  # numpy array or Arrow column (the Arrow readers' categories)
        entry: dict[str, Any] = {"name": c.name, "type": c.type, "columns": [start, start + c.width]}
        if c.type == "category":
            entry["missing"] = {"token": c.missing.token if c.missing is not None else None}
            if c.vocabulary is not None:
                entry["vocabulary"] = _vocabulary(x, c.vocabulary)
                entry["other_column"] = c.vocabulary  # offset in the column's block of "any other value"
            else:
                entry["hash_buckets"] = c.hash_buckets
                entry["hash"] = "tf.strings.to_hash_bucket_fast"
        else:
            seen = x[~np.isnan(x)]
            if c.missing is not None:
                entry["missing"] = {"token": c.missing.token, "fill": c.missing.fill,
                                    "value": _fill_value(c, seen), "indicator": c.missing.indicator}
                filled = np.where(np.isnan(x), entry["missing"]["value"], x)
            else:
                filled = x
            if c.scale is not None:
                entry["scale"] = _scale(c, filled)
            if c.buckets is not None:
                entry["buckets"] = list(c.buckets)
        columns.append(entry)
        start += c.width
    return {"format": FORMAT, "dataset": spec.name, "train_rows": int(rows.size), "width": start,
            "columns": columns}


def _fit_pooled(c: ColumnSpec, stats: np.ndarray, span: list[int]) -> dict[str, Any]:
    """A pooled column's entry from the merged statistics (the same keys :func:`fit` writes)."""
    present, mean, m2, lo, hi, missing = (float(v) for v in stats)
    entry: dict[str, Any] = {"name": c.name, "type": c.type, "columns": span}
    filled = stats
    if c.missing is not None:
        value = (mean if present else 0.0) if c.missing.fill == "mean" else float(c.missing.value or 0.0)
        entry["missing"] = {"token": c.missing.token, "fill": c.missing.fill, "value": value,
                            "indicator": c.missing.indicator}
        if missing:  # the filled cells join the values the scale is fitted on
            filled = _merge_row(np.array([present, mean, m2, lo, hi, 0.0]),
                                np.array([missing, value, 0.0, value, value, 0.0]))
    if c.scale is not None:
        if c.scale.kind == "clip":
            entry["scale"] = {"kind": "clip", "lo": c.scale.lo, "hi": c.scale.hi}
        else:
            n, mu, sq, mn, mx = (float(v) for v in filled[:5])
            if c.scale.kind == "standard":
                offset, spread = (mu, float(np.sqrt(sq / n))) if n else (0.0, 0.0)
            else:
                offset, spread = (mn, mx - mn) if n else (0.0, 0.0)
            entry["scale"] = {"kind": c.scale.kind, "offset": offset,
                              "divisor": spread if spread > 0 else 1.0}
    if c.buckets is not None:
        entry["buckets"] = list(c.buckets)
    return entry


def _fill_value(c: ColumnSpec, seen: np.ndarray) -> float:
    assert c.missing is not None
    if c.missing.fill == "constant":
        return float(c.missing.value or 0.0)
    if seen.size == 0:  # no value in the training rows: nothing to average, fill with 0
        return 0.0
    return float(np.mean(seen) if c.missing.fill == "mean" else np.median(seen))


def _scale(c: ColumnSpec, x: np.ndarray) -> dict[str, Any]:
    assert c.scale is not None
    if c.scale.kind == "clip":
        return {"kind": "clip", "lo": c.scale.lo, "hi": c.scale.hi}
    x = x[~np.isnan(x)]  # a missing value without a fill stays missing: refused when applied
    if c.scale.kind == "standard":
        offset = float(np.mean(x)) if x.size else 0.0
        spread = float(np.std(x)) if x.size else 0.0
    else:
        offset = float(np.min(x)) if x.size else 0.0
        spread = float(np.max(x) - np.min(x)) if x.size else 0.0
    # A constant column: keep it constant (0) rather than divide by zero.
    return {"kind": c.scale.kind, "offset": offset, "divisor": spread if spread > 0 else 1.0}


def _vocabulary(values: RawColumn, k: int) -> list[str]:
    """The k most frequent values, most frequent first, ties by value (deterministic). Counted by Arrow
    (one hash pass, no Python object per cell); only the distinct values are ordered in Python."""
    import pyarrow.compute as pc

    counts = pc.value_counts(_arrow_text(values))
    merged: dict[str, int] = {}  # null and "" are both the missing category
    for v, n in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True):
        key = MISSING_CATEGORY if v is None else v
        merged[key] = merged.get(key, 0) + n
    return [v for _, v in heapq.nsmallest(k, ((-n, v) for v, n in merged.items()))]


def _arrow_text(values: RawColumn) -> Any:
    """A category column as one Arrow string array: the Arrow readers keep it as Arrow (the cells never
    become numpy text: 4 bytes a character and seconds per million rows), the exact reader hands numpy
    text."""
    import pyarrow as pa

    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if isinstance(values, pa.Array):
        return values
    return pa.array(np.asarray(values, dtype=str), pa.string())


def category_positions(e: Mapping[str, Any], x: RawColumn) -> np.ndarray:
    """Each row's one-hot position in the column's block: its vocabulary index (or ``other_column``), or
    its hash bucket. Both work on the distinct values only: the cells are dictionary-encoded by Arrow and
    each distinct value is looked up (or hashed) once."""
    import pyarrow.compute as pc

    encoded = pc.dictionary_encode(_arrow_text(x), null_encoding="encode")
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    distinct = [MISSING_CATEGORY if v is None else v for v in encoded.dictionary.to_pylist()]
    if "vocabulary" in e:
        index = {v: i for i, v in enumerate(e["vocabulary"])}
        other = int(e["other_column"])
        lut = np.fromiter((index.get(v, other) for v in distinct), dtype=np.int64, count=len(distinct))
    else:
        lut = _hash_buckets(distinct, int(e["hash_buckets"]))
    return lut[codes] if codes.size else np.zeros(0, dtype=np.int64)


def apply(fitted: Mapping[str, Any], raw: Mapping[str, RawColumn]) -> np.ndarray:
    """The float32 feature matrix [rows, width] of ``raw`` under ``fitted`` (what :func:`fit` returned)."""
    names = [str(e["name"]) for e in fitted["columns"]]
    absent = [n for n in names if n not in raw]
    if absent:
        raise PreprocessError(f"the rows have no column(s) {', '.join(absent)} that the fitted "
                              f"preprocessing of `{fitted['dataset']}` needs")
    n = len(raw[names[0]]) if names else 0
    out = np.zeros((n, int(fitted["width"])), dtype=np.float32)
    for e in fitted["columns"]:
        lo = int(e["columns"][0])
        x = raw[e["name"]]
        if e["type"] == "category":
            out[np.arange(n), lo + category_positions(e, x)] = 1.0
            continue
        x = np.asarray(x, dtype=np.float64)
        miss = np.isnan(x)
        if "missing" in e:
            x = np.where(miss, float(e["missing"]["value"]), x)
        elif miss.any():
            raise PreprocessError(f"column `{e['name']}` has a missing value and no `missing:` fill")
        sc = e.get("scale")
        if sc is not None:
            if sc["kind"] == "clip":
                x = np.clip(x, float(sc["lo"]), float(sc["hi"]))
            else:
                x = (x - float(sc["offset"])) / float(sc["divisor"])
        width = 1
        if "buckets" in e:  # one-hot of the bucket: below b1, [b1, b2), ..., at or above bk
            width = len(e["buckets"]) + 1
            out[np.arange(n), lo + np.searchsorted(np.asarray(e["buckets"], np.float64), x, side="right")] = 1
        else:
            out[:, lo] = x
        if "missing" in e and e["missing"]["indicator"]:
            out[:, lo + width] = miss
    return out


def _hash_buckets(values: Sequence[str], buckets: int) -> np.ndarray:
    if not len(values):
        return np.zeros(0, dtype=np.int64)
    import tensorflow as tf

    return tf.strings.to_hash_bucket_fast(list(values), buckets).numpy().astype(np.int64)


# ---------------------------------------------------------------------------------------------------------
# At the node: the roles call this once the training rows are known
# ---------------------------------------------------------------------------------------------------------


def fit_tables(data: Sequence[DataSpec], tables: dict[str, Any], train_rows: Mapping[str, np.ndarray],
               apply_to: Mapping[str, str] | None = None,
               pooled: Mapping[str, np.ndarray] | None = None) -> dict[str, dict[str, Any]]:
    """Fit the preprocessing of every data set in ``train_rows`` that needs one, on those rows of its table,
    and replace the table's raw columns with its ``features``. ``apply_to`` names further data sets
    transformed with another's fitted statistics (a horizontal worker's test set: ``{test: train}``);
    ``pooled`` gives a data set's merged horizontal statistics (:func:`fit`).
    Returns ``{data set: fitted}`` (empty when nothing needed fitting)."""
    specs = {s.name: s for s in data}
    fitted: dict[str, dict[str, Any]] = {}
    for name, rows in sorted(train_rows.items()):
        spec, table = specs.get(name), tables.get(name)
        if spec is None or table is None or not needs_fit(spec) or not getattr(table, "raw", None):
            continue
        fitted[name] = fit(spec, table.raw, rows, (pooled or {}).get(name))
        table.fields["features"] = apply(fitted[name], table.raw)
        table.raw = {}
    for name, source in sorted((apply_to or {}).items()):
        table = tables.get(name)
        if source in fitted and table is not None and getattr(table, "raw", None):
            table.fields["features"] = apply(fitted[source], table.raw)
            table.raw = {}
    return fitted


def to_bytes(fitted: Mapping[str, dict[str, Any]]) -> bytes:
    """The fitted preprocessing as stored in an exported model (canonical JSON, UTF-8)."""
    return json.dumps(fitted, sort_keys=True, separators=(",", ":")).encode()


__all__ = [
    "FORMAT",
    "PreprocessError",
    "apply",
    "category_positions",
    "feature_specs",
    "fit",
    "fit_tables",
    "local_stats",
    "merge_stats",
    "missing_mask",
    "needs_fit",
    "raw_columns",
    "to_bytes",
]
