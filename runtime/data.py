"""Data readers: CSV files and the deterministic generators, returned as a :class:`Table`.

``load_dataset(spec)`` returns the fields a model references as ``<dataset>.<field>`` (``features``,
``label``, ``dense``, ``sparse``) plus the example ids used for alignment. Every expected problem is a
:class:`DataError` whose message starts with ``file:line:`` (1-based, the header is line 1), so a user can
open the file at the row; nothing here prints a traceback to a user.

``stratified_split`` is the seeded train/holdout split the label owner makes; it returns ids in a canonical
(keyed-hash) order that does not depend on the input order, so the central reference and a federated run
whose rows arrive in another order (PSI output order) still see the same rows in the same batches.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeAlias

import numpy as np

from fldsl.artifacts import FILE_READERS, DataSpec

if TYPE_CHECKING:  # pyarrow is imported where a file is read, not by every user of Table
    import pyarrow as pa


class DataError(Exception):
    """A data file or generator spec is unusable. ``str(e)`` is the user-facing ``file:line: message``."""

    def __init__(self, message: str, file: str | None = None, line: int | None = None) -> None:
        prefix = f"{file}:{line}: " if file and line else (f"{file}: " if file else "")
        super().__init__(prefix + message)
        self.file = file
        self.line = line
        self.detail = message


# A feature column waiting for preprocessing: numbers as float64 numpy (NaN where missing); categories as
# numpy text (the exact reader) or as the Arrow string column the Arrow readers parsed (kept as Arrow: a
# numpy copy of 5M rows x 26 text columns is 4 GB and most of a load's time). Both have ``take`` and len.
if TYPE_CHECKING:
    RawColumn: TypeAlias = np.ndarray | pa.ChunkedArray


@dataclass
class Table:
    """Rows of one data set: ``ids[i]`` is the example id of row i of every array in ``fields``."""

    ids: np.ndarray
    fields: dict[str, np.ndarray] = field(default_factory=dict)
    # Feature columns as read, waiting for preprocessing fitted on the training rows (fldsl.runtime.
    # preprocess.fit_tables replaces them with ``features``); empty when there is nothing to fit.
    raw: dict[str, RawColumn] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def take(self, rows: np.ndarray | Sequence[int]) -> Table:
        rows = np.asarray(rows, dtype=np.int64)
        return Table(self.ids[rows], {k: v[rows] for k, v in self.fields.items()},
                     {k: v.take(rows) for k, v in self.raw.items()})

    def index_of(self, ids: Sequence[object] | np.ndarray) -> np.ndarray:
        """Row numbers of ``ids`` (in that order); DataError naming the first id this table lacks."""
        pos = {_key(v): i for i, v in enumerate(self.ids.tolist())}
        out = np.empty(len(ids), dtype=np.int64)
        for j, v in enumerate(ids.tolist() if isinstance(ids, np.ndarray) else ids):
            i = pos.get(_key(v))
            if i is None:
                raise DataError(f"id {v!r} is not in this data set")
            out[j] = i
        return out

    def select(self, ids: Sequence[object] | np.ndarray) -> Table:
        """The rows of ``ids``, in that order (e.g. the PSI intersection)."""
        return self.take(self.index_of(ids))


def _key(v: object) -> str:
    # Ids may arrive as str from PSI and as int from a generator; compare them as text.
    return v if isinstance(v, str) else str(v)


@dataclass(frozen=True)
class LabelRule:
    """The label values a loss accepts: the classes ``0 .. classes - 1``; ``task`` says why, for messages
    (e.g. "binary task: loss sigmoid_cross_entropy"). Checked when the label owner reads its data, so a bad
    label is reported by row before alignment and training, not by TensorFlow in the middle of a step."""

    classes: int
    task: str

    def expected(self) -> str:
        return "0 or 1" if self.classes == 2 else f"a whole number in [0, {self.classes})"


# Out-of-range labels named one by one in a message; the rest are counted.
MAX_LABELS_LISTED = 20


# ---------------------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------------------


def read_csv_text(path: Path, what: str = "") -> tuple[list[str], list[list[str]]]:
    """A CSV file's text lines and parsed rows (the header first), every failure a DataError naming the file:
    the one reading of a party's CSV that the exact reader and the schema check share."""
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        hint = "" if path.is_absolute() else f" (a relative path is looked up from {Path.cwd()})"
        raise DataError(f"no such file{hint}" + (f": {what}" if what else ""), name) from None
    except IsADirectoryError:
        raise DataError("is a directory, not a CSV file", name) from None
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text ({e.reason} at byte {e.start})", name) from None
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror}", name) from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise DataError("empty file: expected a header line", name, 1)
    try:
        parsed = list(csv.reader(lines))
    except csv.Error as e:
        raise DataError(f"malformed CSV: {e}", name) from None
    return lines, parsed


def read_csv(path: Path | str, *, id_column: str | None, label_column: str | None,
             feature_columns: Sequence[str], label_dtype: str = "int64",
             label_rule: LabelRule | None = None, raw_columns: Sequence[str] = ()) -> Table:
    """Read a CSV with a header; see the module docstring for the error contract. With ``label_rule``,
    every label outside its classes is reported at once, as ``file:line:column``. ``raw_columns``: columns
    returned as their cells (text, in ``Table.raw``) rather than parsed as numeric features."""
    path = Path(path)
    name = str(path)
    _, parsed = read_csv_text(path)
    header = [h.strip() for h in parsed[0]]
    col = {}
    for j, h in enumerate(header):
        if h in col:
            raise DataError(f"column `{h}` appears twice in the header", name, 1)
        col[h] = j
    wanted = [c for c in (id_column, label_column) if c] + list(feature_columns) + list(raw_columns)
    for c in wanted:
        if c not in col:
            raise DataError(f"missing column `{c}` (the header has: {', '.join(header)})", name, 1)
    # Keep (line number, row) for non-blank lines; a blank line (often a trailing one) is not a row.
    line_no = [i + 1 for i, r in enumerate(parsed) if i > 0 and r]
    rows = [r for i, r in enumerate(parsed) if i > 0 and r]
    ncol = len(header)
    for ln, r in zip(line_no, rows, strict=True):
        if len(r) != ncol:
            raise DataError(f"expected {ncol} columns (as in the header), found {len(r)}", name, ln)
    n = len(rows)
    if n == 0:
        raise DataError("no data rows after the header", name, 1)
    columns = list(zip(*rows, strict=True))  # one tuple of cells per column: cheap to parse column-wise

    if id_column:
        ids = np.array([v.strip() for v in columns[col[id_column]]])
        seen: dict[str, int] = {}
        for i, v in enumerate(ids.tolist()):
            if not v:
                raise DataError(f"missing id in column `{id_column}`", name, line_no[i])
            if v in seen:
                raise DataError(f"duplicate id {v!r} (first seen at line {seen[v]})", name, line_no[i])
            seen[v] = line_no[i]
    else:
        ids = np.arange(n, dtype=np.int64)

    fields: dict[str, np.ndarray] = {}
    if label_column:
        cells = columns[col[label_column]]
        for i, v in enumerate(cells):
            if not v.strip():
                raise DataError(f"missing label in column `{label_column}`", name, line_no[i])
    wanted_cols = list(feature_columns) + ([label_column] if label_column else [])
    values = _numbers([columns[col[c]] for c in wanted_cols], wanted_cols, name, line_no)
    fields["features"] = values[:, : len(feature_columns)].astype(np.float32)
    if label_column:
        y = values[:, -1]
        if label_rule is not None:
            _check_labels(y, cells, label_rule, label_column, col[label_column] + 1, name, line_no)
        if label_dtype in ("int32", "int64", "bool"):
            bad = np.flatnonzero(y != np.round(y))
            if bad.size:
                i = int(bad[0])
                raise DataError(f"label `{label_column}` must be a whole number (a class), got {cells[i]!r}",
                                name, line_no[i])
            fields["label"] = y.astype(np.int64 if label_dtype != "int32" else np.int32)
        else:
            fields["label"] = y.astype(np.float32 if label_dtype == "float32" else np.float64)
    return Table(ids=ids, fields=fields, raw={c: np.array(columns[col[c]], dtype=str) for c in raw_columns})


def _check_labels(y: np.ndarray, cells: Sequence[str], rule: LabelRule, column: str, column_no: int,
                  file: str, line_no: list[int]) -> None:
    """DataError listing every row whose label is not one of ``rule``'s classes (up to MAX_LABELS_LISTED
    by ``file:line:column``, then how many more)."""
    bad = _bad_labels(y, rule)
    if bad.size:
        where = [f"{file}:{line_no[i]}:{column_no} ({_cell(cells[i])})" for i in bad[:MAX_LABELS_LISTED]]
        raise DataError(f"label column `{column}` (column {column_no}) {_label_problem(rule, bad, where)}",
                        file)


def _bad_labels(y: np.ndarray, rule: LabelRule) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    return np.flatnonzero(~np.isfinite(y) | (y != np.round(y)) | (y < 0) | (y >= rule.classes))


def _label_problem(rule: LabelRule, bad: np.ndarray, where: list[str]) -> str:
    more = f" and {bad.size - len(where):,} more" if bad.size > len(where) else ""
    rows = "1 row is not" if bad.size == 1 else f"{bad.size:,} rows are not"
    return f"must hold {rule.expected()} ({rule.task}); {rows}: {', '.join(where)}{more}"


def _cell(text: str, limit: int = 24) -> str:
    """A cell as a message quotes it: stripped, printable, capped."""
    v = "".join(c if c.isprintable() else "?" for c in text.strip())
    return repr(v if len(v) <= limit else v[:limit] + "…")


def _numbers(cells: list[tuple[str, ...]], names: list[str], file: str, line_no: list[int]) -> np.ndarray:
    """Parse columns of cells as a float64 [rows, cols] matrix. The first bad cell in file order (row, then
    column) is reported as file:line. ``float`` per cell is several times faster than numpy's str->float."""
    n = len(line_no)
    out = np.empty((n, len(cells)), dtype=np.float64)
    first_bad: tuple[int, int, str] | None = None
    for j, column in enumerate(cells):
        try:
            out[:, j] = np.fromiter(map(float, column), dtype=np.float64, count=n)
        except ValueError:
            for i, cell in enumerate(column):
                try:
                    float(cell)
                except ValueError:
                    what = "empty value" if not cell.strip() else f"{cell!r} is not a number"
                    if first_bad is None or i < first_bad[0]:
                        first_bad = (i, j, what)
                    break
            continue
        bad = np.flatnonzero(~np.isfinite(out[:, j]))
        if bad.size and (first_bad is None or int(bad[0]) < first_bad[0]):
            i = int(bad[0])
            first_bad = (i, j, f"{column[i]!r} is not a finite number")
    if first_bad is not None:
        i, j, what = first_bad
        raise DataError(f"column `{names[j]}`: {what}", file, line_no[i])
    return out


# ---------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------


Engine = Literal["arrow", "python"]

# Readers of a party's own file: bindable with --data, relocated into the enclave's data mount, checked
# against a schema block when the node starts.

# Arrow tables the node's start-up check (csvschema.check_schemas) has read and checked, keyed by data set
# and (path, size, mtime): ``load_dataset`` converts them instead of reading the file a second time.
_CHECKED: dict[tuple[str, tuple[str, int, int]], pa.Table] = {}


def remember_checked(spec: DataSpec, path: Path, table: pa.Table) -> None:
    from fldsl.runtime.arrowread import file_key

    _CHECKED.clear()  # at most one file's table held at a time: a node reads its data sets one by one
    _CHECKED[(spec.name, file_key(path))] = table


def _take_checked(spec: DataSpec, path: Path) -> pa.Table | None:
    from fldsl.runtime.arrowread import file_key

    try:
        return _CHECKED.pop((spec.name, file_key(path)), None)
    except OSError:
        return None


def _read_file(spec: DataSpec, path: Path, label_rule: LabelRule | None, engine: Engine) -> Table:
    """A csv or Parquet data set as ``load_dataset`` returns it, before the field selection."""
    from fldsl.runtime import arrowread, preprocess

    label_dtype = spec.fields["label"].dtype if "label" in spec.fields else "int64"
    # Missing values, scaling, categories: the columns are read raw; the node fits their preprocessing on
    # its training rows once it knows them (preprocess.fit_tables) and only then has `features`.
    raw = preprocess.needs_fit(spec)
    every = spec.columns is not None  # a schema: every declared column is checked, selected or not
    if spec.reader == "parquet":
        at = _take_checked(spec, path)
        if at is None:
            at = arrowread.read_parquet_arrow(spec, path, every_declared=every)
        return arrowread.to_table(spec, at, label_dtype=label_dtype, label_rule=label_rule, raw=raw,
                                  where=str(path))
    if engine == "arrow":
        at = _take_checked(spec, path)
        if at is None:
            at = arrowread.read_csv_arrow(spec, path, every_declared=every)
        if at is not None:
            try:
                return arrowread.to_table(spec, at, label_dtype=label_dtype, label_rule=label_rule,
                                          raw=raw, where="")
            except arrowread.Fallback:
                pass  # a label outside the loss's classes: the exact reader names each row's line
    # The exact reader: every problem with its line and column.
    if spec.columns is not None:  # a declared schema: every problem with the file, before any row is used
        from fldsl.runtime.csvschema import check_csv_schema

        check_csv_schema(spec, path)
    if raw:
        table = read_csv(path, id_column=spec.id_column, label_column=spec.label_column, feature_columns=[],
                         label_dtype=label_dtype, label_rule=label_rule, raw_columns=spec.feature_columns)
        table.fields.pop("features", None)
        table.raw = preprocess.raw_columns(spec, table.raw)
        return table
    return read_csv(path, id_column=spec.id_column, label_column=spec.label_column,
                    feature_columns=spec.feature_columns, label_dtype=label_dtype, label_rule=label_rule)


def relocate_csv(specs: Sequence[DataSpec], root: str) -> list[DataSpec]:
    """``specs`` with every csv (and Parquet) path replaced by ``<root>/<file name of the plan's path>``.

    Inside an enclave the plan's host path is not mounted: a node reads its csv files from its data mount,
    by file name. Two csv/Parquet data sets of one node with the same file name would silently read one
    file, so that is refused."""
    out: list[DataSpec] = []
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.reader not in FILE_READERS:
            out.append(spec)
            continue
        name = Path(spec.path or "").name
        if not name:
            raise DataError(f"data set `{spec.name}`: {spec.reader} reader without a file name")
        if name in seen:
            raise DataError(f"data sets `{seen[name]}` and `{spec.name}` both read a file named {name}: "
                            f"inside the enclave both would be {root}/{name}; rename one of the files")
        seen[name] = spec.name
        out.append(spec.model_copy(update={"path": f"{root}/{name}"}))
    return out


def load_dataset(spec: DataSpec, base_dir: Path | str | None = None,
                 label_rule: LabelRule | None = None, engine: Engine = "arrow") -> Table:
    """Read or generate ``spec`` and return the fields it declares (all available ones if none declared).
    ``label_rule``: the classes the loss accepts (for the data set holding the loss's label); every label
    outside them is a DataError naming each row (a csv's by ``file:line:column``, a Parquet file's or a
    generator's by row number). ``engine``: ``"arrow"`` reads csv with pyarrow and falls back to the exact
    reader for any file it cannot vouch for; ``"python"`` is the exact reader alone (benchmarks, tests)."""
    from fldsl.runtime import datagen

    fields = spec.fields
    if spec.reader in FILE_READERS:
        if not spec.path:
            raise DataError(f"data set `{spec.name}`: {spec.reader} reader without a path")
        path = Path(spec.path)
        if base_dir is not None and not path.is_absolute():
            path = Path(base_dir) / path
        table = _read_file(spec, path, label_rule, engine)
    elif spec.reader in ("criteo", "wide_n_deep"):
        table = datagen.generate(spec.reader, spec.params, where=f"data set `{spec.name}`")
    else:  # pragma: no cover - pydantic restricts the literal
        raise DataError(f"data set `{spec.name}`: unknown reader `{spec.reader}`")
    if label_rule is not None and spec.reader not in FILE_READERS and "label" in table.fields:
        bad = _bad_labels(table.fields["label"], label_rule)
        if bad.size:
            y = table.fields["label"].reshape(-1)
            where = [f"row {i + 1} ({y[i].item()!r})" for i in bad[:MAX_LABELS_LISTED].tolist()]
            raise DataError(f"data set `{spec.name}` ({spec.reader}): the label "
                            f"{_label_problem(label_rule, bad, where)}")
    if fields:
        # Features still to be fitted are not there yet (their width is checked when they are made).
        missing = [f for f in fields if f not in table.fields and not (f == "features" and table.raw)]
        if missing:
            raise DataError(f"data set `{spec.name}` ({spec.reader}) has no field(s) {', '.join(missing)} "
                            f"(it has: {', '.join(sorted(table.fields))})")
        out: dict[str, np.ndarray] = {}
        for f, ts in fields.items():
            if f not in table.fields:
                continue
            arr = table.fields[f]
            width = ts.shape[1] if len(ts.shape) == 2 else None
            if width is not None and arr.ndim == 2 and arr.shape[1] != width:
                raise DataError(f"data set `{spec.name}`: field `{f}` has {arr.shape[1]} columns, "
                                f"the plan expects {width}")
            out[f] = arr.astype(ts.dtype, copy=False) if ts.dtype not in ("string", "bytes") else arr
        table = Table(table.ids, out, table.raw)
    return table


# ---------------------------------------------------------------------------------------------------------
# Train / holdout split
# ---------------------------------------------------------------------------------------------------------


def _split_keys(ids: Sequence[object] | np.ndarray, seed: int) -> np.ndarray:
    prefix = f"fldsl-split/1/{seed}/".encode()
    return np.fromiter(
        (int.from_bytes(hashlib.sha256(prefix + _key(v).encode()).digest()[:8], "big") for v in ids),
        dtype=np.uint64, count=len(ids),
    )


def stratified_split(ids: Sequence[object] | np.ndarray, labels: np.ndarray | None, fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_ids, test_ids): ``round(fraction * n_c)`` of each class c held out, chosen by a keyed hash of
    the id, so the result depends only on (id set, labels, fraction, seed), not on the row order. Both
    lists come back sorted by that hash (the canonical training order). Regression labels (more than 32
    distinct values) are stratified by deciles."""
    ids = np.asarray(ids)
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"validation fraction must be in [0, 1), got {fraction}")
    keys = _split_keys(ids, seed)
    if labels is None:
        strata = np.zeros(len(ids), dtype=np.int64)
    else:
        y = np.asarray(labels).reshape(-1)
        if y.shape[0] != ids.shape[0]:
            raise DataError(f"split: {ids.shape[0]} ids but {y.shape[0]} labels")
        if np.unique(y).size > 32:
            edges = np.quantile(y.astype(np.float64), np.linspace(0, 1, 11)[1:-1])
            strata = np.searchsorted(edges, y, side="right")
        else:
            strata = np.unique(y, return_inverse=True)[1]
    test_mask = np.zeros(len(ids), dtype=bool)
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        members = members[np.argsort(keys[members], kind="stable")]
        test_mask[members[: round(fraction * members.size)]] = True
    order = np.argsort(keys, kind="stable")
    return ids[order[~test_mask[order]]], ids[order[test_mask[order]]]


def __getattr__(name: str) -> object:
    # The generators live in datagen (which imports this module); re-export them lazily under the names
    # ARCHITECTURE.md gives (``fldsl.runtime.data.criteo`` / ``.wide_n_deep``).
    if name in ("criteo", "wide_n_deep"):
        from fldsl.runtime import datagen

        return getattr(datagen, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
