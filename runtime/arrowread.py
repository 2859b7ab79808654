"""Reading csv and Parquet data sets with pyarrow: multithreaded, typed by the declared schema.

``runtime/data.py`` keeps the exact reader (Python's ``csv`` module, every error as ``file:line:column``);
this module is its fast path. For csv the contract is: **either** the file passes every check the exact
reader and the schema check make, and the arrays are the ones the exact reader returns, **or**
:func:`csv_table` returns None and the caller runs the exact reader, which reports every problem with its
line and column. The fast path never reports a csv problem itself, so a user sees the same messages
whichever path read the file; it only has to recognise that *something* is off (a cell Arrow cannot parse as
the declared type, an empty id, a non-finite number, a label outside the loss's classes, a control character
that Python's ``str.splitlines`` would treat as a line break, ...). Where Arrow refuses a cell that Python's
``float`` accepts (``1_000``), the exact reader simply reads the file.

Parquet has no lines, so its problems are found here, all of them, and named by row (1-based, the first
data row is row 1) and column.

Cells of header columns the pipeline does not read are not decoded (``include_columns``): a file whose
unused column holds bytes that are not UTF-8 is read, where the exact reader refuses the whole file.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from fldsl.artifacts import ColumnSpec, DataSpec
from fldsl.runtime.csvschema import SchemaMismatch
from fldsl.runtime.data import MAX_LABELS_LISTED, DataError, LabelRule, Table, _bad_labels, _label_problem

if TYPE_CHECKING:
    from fldsl.runtime.data import RawColumn

# Bytes below 0x20 other than tab: Python's str.splitlines breaks lines at \n \r \x0b \x0c \x1c \x1d \x1e,
# and str.strip removes \x1c-\x1f, where Arrow does neither. A text cell holding one is left to the exact
# reader (it is rare, and the exact reader defines what such a file means).
# Bytes either Python's str.strip or Arrow's utf8_trim_whitespace may take off an ASCII cell.
_SPACE = np.zeros(256, dtype=bool)
_SPACE[[0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x1F, 0x20]] = True
_CONTROL = np.ones(256, dtype=bool)
_CONTROL[0x20:] = False
_CONTROL[0x09] = False
# Line breaks for str.splitlines outside ASCII (U+0085, U+2028, U+2029), as UTF-8.
_UNICODE_BREAKS = (b"\xc2\x85", b"\xe2\x80\xa8", b"\xe2\x80\xa9")


class Fallback(Exception):
    """The fast path saw something the exact reader must judge (never shown to a user)."""


@dataclass(frozen=True)
class _Col:
    """A column to read: ``kind`` id | label | number (numeric/integer feature) | category."""

    name: str
    kind: str
    integer: bool = False
    missing: bool = False  # number: empty (or ``token``) cells are missing values, not errors
    token: str | None = None


def _columns(spec: DataSpec, *, every_declared: bool) -> list[_Col]:
    """The columns a read of ``spec`` needs: id, label, then the feature columns (``every_declared``: all
    declared columns, as the schema check reads them) with their types. Without a schema every feature
    column is a plain number, as the exact reader parses it."""
    out: list[_Col] = []
    if spec.id_column:
        out.append(_Col(spec.id_column, "id"))
    if spec.label_column:
        out.append(_Col(spec.label_column, "label"))
    if spec.columns is None:
        out += [_Col(c, "number") for c in spec.feature_columns]
        return out
    by_name = {c.name: c for c in spec.columns}
    names = [c.name for c in spec.columns] if every_declared else list(spec.feature_columns)
    for name in names:
        c: ColumnSpec = by_name[name]
        token = c.missing.token if c.missing is not None else None
        if c.type == "category":
            out.append(_Col(name, "category", token=token))
        else:
            out.append(_Col(name, "number", integer=c.type == "integer", missing=c.missing is not None,
                            token=token))
    return out


# ---------------------------------------------------------------------------------------------------------
# csv
# ---------------------------------------------------------------------------------------------------------


def _header(path: Path) -> list[str]:
    """The header cells as the exact reader takes them (utf-8, csv-parsed, stripped)."""
    try:
        with path.open("r", encoding="utf-8", newline="") as f:
            first = f.readline()
    except (OSError, UnicodeDecodeError):
        raise Fallback from None
    if not first.strip() or first.count('"') % 2:  # empty, or a quoted header cell spanning lines
        raise Fallback
    cells = next(csv.reader([first.rstrip("\r\n")]), [])
    return [h.strip() for h in cells]


def read_csv_arrow(spec: DataSpec, path: Path, *, every_declared: bool = False) -> pa.Table | None:
    """The columns of ``spec`` from the csv at ``path``, parsed by Arrow as their declared types and checked
    as the schema check would check them; None where anything is off (the caller then runs the exact
    reader). Text columns come back as strings, number columns as float64 (null where missing)."""
    try:
        return _read_csv_checked(spec, path, _columns(spec, every_declared=every_declared))
    except Fallback:
        return None


def _read_csv_checked(spec: DataSpec, path: Path, cols: list[_Col]) -> pa.Table:
    header = _header(path)
    if len(set(header)) != len(header) or any(c.name not in header for c in cols):
        raise Fallback
    names = list(dict.fromkeys(c.name for c in cols))  # a column may be the id and a feature at once
    types: dict[str, pa.DataType] = {}
    for c in cols:
        # Numbers whose missing marker is a token (`?`) are parsed after the token is taken out.
        as_number = c.kind == "label" or (c.kind == "number" and c.token is None)
        types.setdefault(c.name, pa.float64() if as_number else pa.string())
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=header, skip_rows=1, use_threads=True,
                                           block_size=16 << 20),
            # The exact reader joins no lines inside quotes either (a quoted line break splits the row).
            parse_options=pacsv.ParseOptions(newlines_in_values=False),
            convert_options=pacsv.ConvertOptions(
                column_types=types, include_columns=names,
                # Only the empty cell is null, and only in number columns: "NA", "nan", "null" are not
                # missing markers unless the schema says so (Arrow's defaults would make them null).
                null_values=[""], strings_can_be_null=False, quoted_strings_can_be_null=True,
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError):
        raise Fallback from None
    if table.num_rows == 0 or (spec.max_rows is not None and table.num_rows > spec.max_rows):
        raise Fallback
    out: dict[str, pa.ChunkedArray] = {}
    for c in cols:
        if c.name in out:
            continue
        col = table.column(c.name)
        if pa.types.is_string(col.type):
            _plain_text(col)
        if c.kind == "id":
            trimmed = _trim(col)
            if pc.any(pc.equal(trimmed, "")).as_py() or pc.count_distinct(trimmed).as_py() != len(trimmed):
                raise Fallback
            out[c.name] = trimmed
        elif c.kind == "label":
            if col.null_count or not pc.all(pc.is_finite(col)).as_py():
                raise Fallback
            out[c.name] = col
        elif c.kind == "number":
            out[c.name] = _number(col, c)
        else:
            trimmed = _trim(col)
            if c.token is not None:
                trimmed = pc.if_else(pc.equal(trimmed, c.token), "", trimmed)
            out[c.name] = trimmed
    return pa.table(out)


def _plain_text(col: pa.ChunkedArray) -> None:
    """Fallback if a text column holds a character the exact reader treats differently from Arrow."""
    for chunk in col.chunks:
        data = _data_bytes(chunk)
        if data.size and _CONTROL[data].any():
            raise Fallback
        if (data >= 0x80).any():
            raw = data.tobytes()
            if any(b in raw for b in _UNICODE_BREAKS):
                raise Fallback


def _trim(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Cells without surrounding whitespace, as Python's ``str.strip`` (which the exact reader uses) takes
    it off: Arrow's trim on ASCII chunks (the characters where the two differ, \x0b \x0c \x1c-\x1f, make
    a csv fall back before this), ``str.strip`` cell by cell on the rare chunk with other characters."""
    chunks = []
    for chunk in col.chunks:
        data = _data_bytes(chunk)
        if data.max(initial=0) < 0x80:
            # Most columns have no space at all: one table lookup instead of a trimmed copy of the column.
            chunks.append(pc.utf8_trim_whitespace(chunk) if _SPACE[data].any() else chunk)
        else:
            cells = chunk.to_pylist()
            chunks.append(pa.array([None if v is None else v.strip() for v in cells], pa.string()))
    return pa.chunked_array(chunks, pa.string())


def _number(col: pa.ChunkedArray, c: _Col) -> pa.ChunkedArray:
    """A number column as float64, null where the cell is missing; Fallback if a cell is not a value of
    its type (or is empty without ``missing:``)."""
    if pa.types.is_string(col.type):  # read as text because of a missing-value token
        trimmed = _trim(col)
        missing = pc.or_(pc.equal(trimmed, ""), pc.equal(trimmed, c.token or ""))
        try:
            col = pc.cast(pc.if_else(missing, pa.scalar(None, pa.string()), trimmed), pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise Fallback from None
    if col.null_count and not c.missing:
        raise Fallback
    present = pc.drop_null(col)
    if not pc.all(pc.is_finite(present)).as_py():
        raise Fallback
    if c.integer and not pc.all(pc.equal(present, pc.floor(present))).as_py():
        raise Fallback
    return col


# ---------------------------------------------------------------------------------------------------------
# Parquet (no lines: the checks here are the only ones, and they report every problem)
# ---------------------------------------------------------------------------------------------------------


def read_parquet_arrow(spec: DataSpec, path: Path, *, every_declared: bool = False) -> pa.Table:
    """The columns of ``spec`` from the Parquet file at ``path``, checked against its types (a declared
    schema, or plain numbers without one); raises ``SchemaMismatch`` listing every problem, each as
    ``file: row R, column `c`: ...`` (rows 1-based), or a DataError for a file that cannot be read."""
    import pyarrow.parquet as pq

    name = str(path)
    if not path.exists():
        hint = "" if path.is_absolute() else f" (a relative path is looked up from {Path.cwd()})"
        raise DataError(f"no such file{hint}: data set `{spec.name}` (bind it with the node's --data "
                        f"{spec.name}=PATH)", name)
    cols = _columns(spec, every_declared=every_declared)
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"not a Parquet file ({e})", name) from None
    problems: list[str] = []
    present = list(schema.names)
    for wanted in dict.fromkeys(x.name for x in cols):
        if wanted not in present:
            from fldsl.diagnostics import did_you_mean

            best = did_you_mean(wanted, present)
            shown = ", ".join(present[:12]) + (", ..." if len(present) > 12 else "")
            problems.append(f"{name}: the file has no column `{wanted}`"
                            + (f"; did you mean `{best}`?" if best else f"; it has: {shown}"))
        elif present.count(wanted) > 1:
            problems.append(f"{name}: column `{wanted}` appears twice")
    if problems:
        raise SchemaMismatch(spec.name, name, problems)
    try:
        # pre_buffer off: a fifth less peak memory at the same speed (bench/data_load.py, 1M rows).
        table = pq.read_table(path, columns=list(dict.fromkeys(c.name for c in cols)), use_threads=True,
                              pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"cannot read the Parquet file ({e})", name) from None
    n = table.num_rows
    if n == 0:
        raise DataError("the Parquet file has no rows", name)
    # Each column is let go of once checked: holding the file's table and the checked copies together
    # (a filled category, a number cast to float64) would double the peak.
    read = {name: table.column(name) for name in table.column_names}
    del table
    out: dict[str, pa.ChunkedArray] = {}
    for c in cols:
        if c.name in out:
            continue
        col = read.pop(c.name)
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        got = _parquet_column(col, c, name, problems)
        if got is not None:
            out[c.name] = got
    if spec.max_rows is not None and n > spec.max_rows:
        problems.append(f"{name}: row {spec.max_rows + 1} is past the declared bound "
                        f"`rows <= {spec.max_rows}` "
                        f"(the file has {n} rows); raise the bound in the pipeline (every party compiles it "
                        "again) or use fewer rows")
    if problems:
        raise SchemaMismatch(spec.name, name, problems)
    return pa.table(out)


def _rows_at(mask: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.flatnonzero(np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool))


def _report(problems: list[str], file: str, c: _Col, rows: np.ndarray, message: str) -> None:
    more = f" (and {rows.size - 1:,} more in this column)" if rows.size > 1 else ""
    problems.append(f"{file}: row {int(rows[0]) + 1}, column `{c.name}`: {message}{more}")


def _parquet_column(col: pa.ChunkedArray, c: _Col, file: str, problems: list[str]) -> pa.ChunkedArray | None:
    t = col.type
    numeric = pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
    text = pa.types.is_string(t) or pa.types.is_large_string(t)
    if c.kind in ("id", "category"):
        if not (text or pa.types.is_integer(t)):
            what = "an id" if c.kind == "id" else "a category"
            problems.append(f"{file}: column `{c.name}` holds {t}; {what} column holds text or integers")
            return None
        as_text = _trim(col.cast(pa.string()))
        if c.kind == "category":
            # A null cell stays null: the missing category, which preprocessing reads as "" (filling
            # every column here would copy all of them). Only a declared token has to be replaced.
            if c.token is not None:
                return pc.if_else(pc.equal(as_text, c.token), pa.scalar(None, pa.string()), as_text)
            return as_text
        bad = _rows_at(pc.or_kleene(pc.is_null(as_text), pc.equal(as_text, "")))
        if bad.size:
            _report(problems, file, c, bad, "missing id")
        ids = as_text.to_numpy(zero_copy_only=False)
        _, first, counts = np.unique(ids.astype(str), return_index=True, return_counts=True)
        dup = np.sort(first[counts > 1])
        if dup.size:
            _report(problems, file, c, dup, f"id {ids[dup[0]]!r} appears more than once")
        return as_text
    if not numeric:
        problems.append(f"{file}: column `{c.name}` holds {t}; a "
                        f"{'label' if c.kind == 'label' else ('integer' if c.integer else 'numeric')} column "
                        "holds numbers (Parquet integer or floating point)")
        return None
    x = col.cast(pa.float64())
    nulls = _rows_at(pc.is_null(x))
    if nulls.size and not c.missing:
        what = "label" if c.kind == "label" else "value"
        hint = "; to fill them, declare `missing: mean` (or `median`, `constant N`) on its line" \
            if c.kind == "number" else ""
        _report(problems, file, c, nulls, f"missing {what} (null){hint}")
    bad = _rows_at(pc.invert(pc.is_finite(x)))
    if bad.size:
        _report(problems, file, c, bad, f"{x[int(bad[0])].as_py()!r} is not a finite number")
    if c.integer:
        frac = _rows_at(pc.not_equal(x, pc.floor(x)))
        frac = frac[np.isfinite(x.to_numpy(zero_copy_only=False)[frac])]
        if frac.size:
            _report(problems, file, c, frac, f"{x[int(frac[0])].as_py()!r} is not a whole number")
    return x


# ---------------------------------------------------------------------------------------------------------
# Arrow -> the Table the exact reader returns
# ---------------------------------------------------------------------------------------------------------


def to_table(spec: DataSpec, at: pa.Table, *, label_dtype: str, label_rule: LabelRule | None,
             raw: bool, where: str) -> Table:
    """The :class:`Table` ``load_dataset`` returns, from a checked Arrow table: ids (text, stripped),
    ``label`` as ``label_dtype``, and either ``features`` float32 [rows, k] or (``raw``: preprocessing
    still to fit) ``raw`` columns as ``preprocess.raw_columns`` makes them (numbers float64 with NaN where
    missing, categories text with missing ``""``). Raises Fallback (csv) where a label breaks
    ``label_rule``; ``where`` names the file in a Parquet message."""
    n = at.num_rows
    ids = _text(at.column(spec.id_column)) if spec.id_column else np.arange(n, dtype=np.int64)
    fields: dict[str, np.ndarray] = {}
    if spec.label_column:
        y = _floats(at.column(spec.label_column))
        bad = _bad_labels(y, label_rule) if label_rule is not None else np.zeros(0, np.int64)
        whole = label_dtype in ("int32", "int64", "bool")
        if bad.size or (whole and not np.array_equal(y, np.round(y))):
            if not where:
                raise Fallback
            _label_error(spec, y, bad, label_rule, whole, where)
        if whole:
            fields["label"] = y.astype(np.int64 if label_dtype != "int32" else np.int32)
        else:
            fields["label"] = y.astype(np.float32 if label_dtype == "float32" else np.float64)
    cols = _columns(spec, every_declared=False)
    features = [c for c in cols[(1 if spec.id_column else 0) + (1 if spec.label_column else 0):]]
    raw_out: dict[str, RawColumn] = {}
    if raw:
        for c in features:
            col = at.column(c.name)
            # Categories stay the Arrow strings they were parsed as (missing ones already ""):
            # preprocess.apply dictionary-encodes them; numpy text would cost 4 bytes a character.
            raw_out[c.name] = _categories(col) if c.kind == "category" else _floats(col, nan=True)
    else:
        out = np.empty((n, len(features)), dtype=np.float32)
        for j, c in enumerate(features):
            start = 0
            for chunk in at.column(c.name).chunks:  # chunk by chunk: no float64 copy of the whole column
                out[start:start + len(chunk), j] = chunk.to_numpy(zero_copy_only=False)
                start += len(chunk)
        fields["features"] = out
    return Table(ids=ids, fields=fields, raw=raw_out)


def _label_error(spec: DataSpec, y: np.ndarray, bad: np.ndarray, rule: LabelRule | None, whole: bool,
                 where: str) -> None:
    if bad.size and rule is not None:
        rows = [f"row {i + 1} ({y[i].item()!r})" for i in bad[:MAX_LABELS_LISTED].tolist()]
        raise DataError(f"label column `{spec.label_column}` {_label_problem(rule, bad, rows)}", where)
    i = int(np.flatnonzero(y != np.round(y))[0])
    raise DataError(f"row {i + 1}: label `{spec.label_column}` must be a whole number (a class), got "
                    f"{y[i].item()!r}", where)


def _categories(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """A category column as plain Arrow strings; a missing value is ``""`` or null (the missing category
    either way: preprocess reads null as ``""``)."""
    return col.cast(pa.string()) if not pa.types.is_string(col.type) else col


def _floats(col: pa.ChunkedArray, nan: bool = False) -> np.ndarray:
    x = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if nan and x.null_count:
        x = pc.fill_null(x, np.nan)
    return np.asarray(x.to_numpy(zero_copy_only=False), dtype=np.float64)


def _data_bytes(chunk: pa.Array) -> np.ndarray:
    """The UTF-8 bytes of a string chunk's values (no copy)."""
    if len(chunk) == 0:
        return np.zeros(0, dtype=np.uint8)
    offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int32, count=len(chunk) + 1, offset=chunk.offset * 4)
    data = chunk.buffers()[2]
    if data is None:
        return np.zeros(0, dtype=np.uint8)
    return np.frombuffer(data, dtype=np.uint8)[offsets[0]:offsets[-1]]


def _text(col: pa.ChunkedArray) -> np.ndarray:
    """A text column as the numpy unicode array ``np.array(list_of_str)`` would make (``<U{longest}``).
    ASCII chunks go through fixed-width bytes (NUL-padded: numpy drops trailing NULs, as it does for any
    str) and numpy's bytes-to-unicode cast, without a Python object per cell; others cell by cell."""
    col = col.cast(pa.string()) if not pa.types.is_string(col.type) else col
    n = len(col)
    if n == 0:
        return np.zeros(0, dtype="<U1")
    width = max(int(pc.max(pc.utf8_length(col)).as_py() or 0), 1)
    out = np.empty(n, dtype=f"<U{width}")
    start = 0
    for chunk in col.chunks:
        m = len(chunk)
        if _data_bytes(chunk).max(initial=0) < 0x80:
            padded = pc.utf8_rpad(chunk, width=width, padding="\x00")
            fixed = _data_bytes(padded)
            out[start:start + m] = fixed.view(f"S{width}").astype(f"<U{width}")
        else:
            out[start:start + m] = chunk.to_pylist()
        start += m
    return out


def describe_parquet(path: Path, *, id_column: str | None, label_column: str | None) -> Any:
    """``fldsl data describe`` for a Parquet file: the same :class:`CsvDescription` as ``describe_csv``,
    from the file's column types and values: integers (and floats that are all whole) ``integer``, other
    floats ``numeric`` (``missing: mean`` where some are null), text ``category`` with a vocabulary of its
    values (null is the missing category), anything else not declarable (its reason says why)."""
    import pyarrow.parquet as pq

    from fldsl.diagnostics import did_you_mean
    from fldsl.runtime.csvschema import MAX_VOCABULARY, ColumnDescription, CsvDescription

    name = str(path)
    try:
        table = pq.read_table(path, pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"not a readable Parquet file ({e})", name) from None
    header = list(table.column_names)
    for col, what in ((id_column, "id"), (label_column, "label")):
        if col and col not in header:
            best = did_you_mean(col, header)
            shown = f"; did you mean `{best}`?" if best else f" (it has: {', '.join(header)})"
            raise DataError(f"no {what} column `{col}`{shown}", name)
    if table.num_rows == 0:
        raise DataError("the Parquet file has no rows", name)
    out: list[ColumnDescription] = []
    for col_name in header:
        if col_name in (id_column, label_column):
            continue
        col = table.column(col_name)
        t = col.type.value_type if pa.types.is_dictionary(col.type) else col.type
        if col.null_count == len(col):
            out.append(ColumnDescription(col_name, None, "every cell is null"))
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            distinct = pc.count_distinct(col.cast(pa.string())).as_py()
            out.append(ColumnDescription(col_name, "category",
                                         options=f"vocabulary: top {min(distinct, MAX_VOCABULARY)}"))
        elif pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_floating(t):
            full = col.cast(pa.float64())
            x = pc.drop_null(full)
            if not pc.all(pc.is_finite(x)).as_py():
                row = int(_rows_at(pc.fill_null(pc.invert(pc.is_finite(full)), False))[0]) + 1
                out.append(ColumnDescription(col_name, None, f"a value that is not finite in row {row}"))
                continue
            whole = pc.all(pc.equal(x, pc.floor(x))).as_py()
            out.append(ColumnDescription(col_name, "integer" if whole else "numeric",
                                         options="missing: mean" if col.null_count else ""))
        else:
            out.append(ColumnDescription(col_name, None, f"it holds {t}: neither numbers nor text"))
    return CsvDescription(name, table.num_rows, out)


def file_key(path: Path) -> tuple[str, int, int]:
    """(path, size, mtime): a checked read is reused only for the same, unchanged file."""
    st = os.stat(path)
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns


__all__ = ["Fallback", "describe_parquet", "file_key", "read_csv_arrow", "read_parquet_arrow", "to_table"]
