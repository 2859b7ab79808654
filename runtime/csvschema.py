"""Declared csv schemas: the node's check of its file against the plan, and ``fldsl data describe``.

A csv data set with a schema block (docs/language.md, "Schema blocks") is compiled without its file: the
plan carries the declared columns with their types and ``rows <= N``. The node checks its own file against
them before it uses any row (:func:`check_csv_schema`, called by ``load_dataset``): the header holds every
declared column and the id/label, every value of a declared column parses as its type, and there are at
most N rows. Every problem is listed in one :class:`SchemaMismatch`, each as ``file:line:column: message``
(lines and columns 1-based, the header is line 1), so a party can fix its file in one pass.

``describe_csv`` infers a block from a party's own file with the same predicates, so a block printed by
``fldsl data describe`` always passes the node's check of that file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fldsl.artifacts import ColumnSpec, ColumnType, DataSpec
from fldsl.diagnostics import did_you_mean
from fldsl.exitcodes import EXIT_INPUT  # bad data rows are an input error
from fldsl.runtime.data import DataError, read_csv_text
from fldsl.runtime.preprocess import missing_mask


class SchemaMismatch(DataError):
    """A csv file that does not match the schema its plan declares; ``problems`` are ``file:line:col: ...``.

    An input error (``exit_code`` 2, like a malformed ``.flp``), not a failed run: the party's file, not
    the pipeline or a peer, is what needs fixing."""

    exit_code = EXIT_INPUT

    def __init__(self, dataset: str, file: str, problems: list[str]) -> None:
        n = len(problems)
        head = (f"data set `{dataset}`: {file} does not match the schema declared in the pipeline "
                f"({n} problem{'s' if n != 1 else ''}):")
        super().__init__("\n".join([head, *(f"  {p}" for p in problems)]))
        self.file = file
        self.dataset = dataset
        self.problems = problems


# ---------------------------------------------------------------------------------------------------------
# Values: one predicate per type, shared by the node's check and by describe
# ---------------------------------------------------------------------------------------------------------


def value_problem(cell: str, ctype: ColumnType) -> str | None:
    """Why ``cell`` is not a value of ``ctype`` (None if it is). Parsed as the reader parses it (``float``),
    so what passes here is what the model is fed."""
    if not cell.strip():
        return "empty value"
    try:
        x = float(cell)
    except ValueError:
        return f"{cell!r} is not a number"
    if not math.isfinite(x):
        return f"{cell!r} is not a finite number"
    if ctype == "integer" and not x.is_integer():
        return f"{cell!r} is not a whole number"
    return None


def _bad_rows(cells: Sequence[str], ctype: ColumnType) -> list[int]:
    """Indices of the cells that are not values of ``ctype``. Vectorised where the column parses (the
    common case: a clean file of 10^5 rows checks in milliseconds); cell by cell only where it does not."""
    try:
        x = np.fromiter(map(float, cells), dtype=np.float64, count=len(cells))
    except ValueError:
        return [i for i, c in enumerate(cells) if value_problem(c, ctype) is not None]
    bad = ~np.isfinite(x)
    if ctype == "integer":
        bad |= np.isfinite(x) & (x != np.floor(np.where(np.isfinite(x), x, 0.0)))
    return np.flatnonzero(bad).tolist()


def _missing_hint(cells: Sequence[str], bad: list[int], c: ColumnSpec) -> str:
    """How to declare the bad cells of a numeric/integer column as missing, when they all look like one
    missing-value marker (empty, or one repeated text such as ``?``); else nothing."""
    if c.missing is not None:
        return ""
    marks = {cells[i].strip() for i in bad}
    if marks == {""}:
        return "; to fill empty cells, declare `missing: mean` (or `median`, `constant N`) on its line"
    texts = marks - {""}
    if len(texts) == 1:
        (t,) = texts
        try:
            float(t)
        except ValueError:
            return (f"; if {t!r} marks a missing value, declare `missing: {json.dumps(t)} mean` (or "
                    "`median`, `constant N`) on its line")
    return ""


def field_starts(line: str) -> list[int]:
    """1-based character column where each field of a raw csv line starts (quotes respected), for
    ``file:line:column`` positions an editor can jump to."""
    starts = [1]
    quoted = False
    for i, ch in enumerate(line):
        if ch == '"':
            quoted = not quoted  # a doubled quote inside a quoted field toggles twice: no net change
        elif ch == "," and not quoted:
            starts.append(i + 2)
    return starts


# ---------------------------------------------------------------------------------------------------------
# Reading (the same way as data.read_csv: splitlines, blank lines are not rows, header cells stripped)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Csv:
    name: str
    lines: list[str]  # raw text lines
    header: list[str]
    rows: list[list[str]]  # non-blank rows after the header
    line_no: list[int]  # 1-based line of each row


def _read(path: Path, what: str) -> _Csv:
    name = str(path)
    lines, parsed = read_csv_text(path, what)
    header = [h.strip() for h in parsed[0]]
    line_no = [i + 1 for i, r in enumerate(parsed) if i > 0 and r]
    rows = [r for i, r in enumerate(parsed) if i > 0 and r]
    return _Csv(name, lines, header, rows, line_no)


def _rows(n: int) -> str:
    return f"{n:,} row" + ("s" if n != 1 else "")


def _position(f: _Csv, row: int, col: int) -> str:
    ln = f.line_no[row]
    starts = field_starts(f.lines[ln - 1])
    return f"{f.name}:{ln}:{starts[col] if col < len(starts) else 1}"


# ---------------------------------------------------------------------------------------------------------
# The node's check
# ---------------------------------------------------------------------------------------------------------


def check_csv_schema(spec: DataSpec, path: Path | str) -> None:
    """Check the file at ``path`` (the plan's, or the party's rebinding) against ``spec``'s declared
    schema; raises :class:`SchemaMismatch` listing every problem. No-op for a spec without a schema."""
    if spec.columns is None:
        return
    path = Path(path)
    f = _read(path, f"data set `{spec.name}` (bind it with the node's --data {spec.name}=PATH)")
    problems: list[str] = []
    col: dict[str, int] = {}
    for j, h in enumerate(f.header):
        col.setdefault(h, j)
    starts = field_starts(f.lines[0])

    wanted: list[tuple[str, str]] = [(c, w) for c, w in ((spec.id_column, "id"), (spec.label_column, "label"))
                                     if c]
    wanted += [(c.name, f"declared {c.type}") for c in spec.columns]
    for name, what in wanted:
        if name not in col:
            best = did_you_mean(name, f.header)
            shown = ", ".join(f.header[:12]) + (", ..." if len(f.header) > 12 else "")
            problems.append(f"{f.name}:1:1: the header has no column `{name}` ({what})"
                            + (f"; did you mean `{best}`?" if best else f"; it has: {shown}"))
        elif f.header.count(name) > 1:
            again = [j for j, h in enumerate(f.header) if h == name][1]
            problems.append(f"{f.name}:1:{starts[again] if again < len(starts) else 1}: column `{name}` "
                            "appears twice in the header")

    ncol = len(f.header)
    short = [i for i, r in enumerate(f.rows) if len(r) != ncol]
    if short:
        i = short[0]
        more = f" (and {_rows(len(short) - 1)} more)" if len(short) > 1 else ""
        problems.append(f"{f.name}:{f.line_no[i]}:1: expected {ncol} columns (as in the header), found "
                        f"{len(f.rows[i])}{more}")
    good = [i for i, r in enumerate(f.rows) if len(r) == ncol]

    def first_of(bad: list[int], j: int, message: str) -> None:
        i = good[bad[0]]
        more = f" (and {_rows(len(bad) - 1)} more in this column)" if len(bad) > 1 else ""
        problems.append(f"{_position(f, i, j)}: {message}{more}")

    for key_column, what in ((spec.id_column, "id"), (spec.label_column, "label")):
        if key_column and key_column in col:
            j = col[key_column]
            empty = [k for k, i in enumerate(good) if not f.rows[i][j].strip()]
            if empty:
                first_of(empty, j, f"empty {what} in column `{key_column}`")
    for c in spec.columns:
        if c.name not in col or c.type == "category":  # a category takes any text; empty is its own value
            continue
        j = col[c.name]
        cells = [f.rows[i][j] for i in good]
        if c.missing is not None:  # declared missing cells (empty or the token) are filled, not checked
            keep = np.flatnonzero(~missing_mask(cells, c.missing.token))
            bad = keep[_bad_rows([cells[k] for k in keep.tolist()], c.type)].tolist()
        else:
            bad = _bad_rows(cells, c.type)
        if bad:
            why = value_problem(cells[bad[0]], c.type)
            first_of(bad, j, f"column `{c.name}` ({c.type}): {why}{_missing_hint(cells, bad, c)}")

    if spec.max_rows is not None and len(f.rows) > spec.max_rows:
        ln = f.line_no[spec.max_rows]
        problems.append(f"{f.name}:{ln}:1: row {spec.max_rows + 1} is past the declared bound "
                        f"`rows <= {spec.max_rows}` (the file has {len(f.rows)} rows); raise the bound in "
                        "the pipeline (every party compiles it again) or use fewer rows")
    if problems:
        raise SchemaMismatch(spec.name, f.name, problems)


def check_schemas(specs: Sequence[DataSpec], base_dir: Path | str | None = None) -> None:
    """Check every csv or Parquet data set of a plan that declares a schema (what a node can run before it
    connects to anyone); relative paths resolve against ``base_dir`` as in ``load_dataset``.

    A csv file is read by pyarrow first; only if that read finds anything off does the exact check run, so
    the report (every problem, ``file:line:column``) is the exact one while a clean file of millions of rows
    is checked in seconds. The checked Arrow table is handed to ``load_dataset`` (data.remember_checked),
    which then does not read the file again."""
    from fldsl.runtime import arrowread
    from fldsl.runtime.data import FILE_READERS, remember_checked

    for spec in specs:
        if spec.reader in FILE_READERS and spec.columns is not None and spec.path:
            path = Path(spec.path)
            if base_dir is not None and not path.is_absolute():
                path = Path(base_dir) / path
            if spec.reader == "parquet":
                remember_checked(spec, path, arrowread.read_parquet_arrow(spec, path, every_declared=True))
                continue
            table = arrowread.read_csv_arrow(spec, path, every_declared=True)
            if table is None:
                check_csv_schema(spec, path)
            else:
                remember_checked(spec, path, table)


# ---------------------------------------------------------------------------------------------------------
# describe
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ColumnDescription:
    name: str
    type: ColumnType | None  # None: not declarable (see ``reason``)
    reason: str | None = None  # why not declarable, e.g. "'inf' at line 3 is not finite"
    options: str = ""  # the line's options to declare, e.g. 'missing: "?" mean' or "vocabulary: top 12"


@dataclass
class CsvDescription:
    path: str
    rows: int
    columns: list[ColumnDescription]  # every column but the id and label, in header order


def describe_csv(path: Path | str, *, id_column: str | None, label_column: str | None) -> CsvDescription:
    """Infer each column's type from its values: ``integer`` where every value is a whole number, else
    ``numeric`` where every value is a finite number; anything else cannot be declared yet (its reason says
    why). DataError for an unreadable file, a missing id/label column or a file without rows."""
    path = Path(path)
    f = _read(path, "the file to describe")
    for name, what in ((id_column, "id"), (label_column, "label")):
        if name and name not in f.header:
            best = did_you_mean(name, f.header)
            raise DataError(f"no {what} column `{name}` in the header"
                            + (f"; did you mean `{best}`?" if best else f" (it has: {', '.join(f.header)})"),
                            f.name, 1)
    dup = next((h for k, h in enumerate(f.header) if h in f.header[:k]), None)
    if dup is not None:
        raise DataError(f"column `{dup}` appears twice in the header", f.name, 1)
    ncol = len(f.header)
    for i, r in enumerate(f.rows):
        if len(r) != ncol:
            raise DataError(f"expected {ncol} columns (as in the header), found {len(r)}", f.name,
                            f.line_no[i])
    if not f.rows:
        raise DataError("no data rows after the header", f.name, 1)
    out = [_describe_column(name, [r[j] for r in f.rows], f.line_no)
           for j, name in enumerate(f.header) if name not in (id_column, label_column)]
    return CsvDescription(str(path), len(f.rows), out)


MAX_VOCABULARY = 100  # what describe proposes for a text column at most (the block can say more)


def _describe_column(name: str, cells: list[str], line_no: list[int]) -> ColumnDescription:
    """One column's declaration: a number type where its values are numbers (``missing:`` where some cells
    are empty, or all hold one placeholder such as ``?``), else ``category`` with a vocabulary of its
    values (at most MAX_VOCABULARY); not declarable where numbers are not finite."""
    present = [k for k, c in enumerate(cells) if c.strip()]
    if not present:
        return ColumnDescription(name, None, "every cell is empty")
    texts = [k for k in present if value_problem(cells[k], "numeric") is not None
             and (value_problem(cells[k], "numeric") or "").endswith("is not a number")]
    placeholders = {cells[k].strip() for k in texts}
    numbers = [k for k in present if k not in set(texts)]
    if texts and not (len(placeholders) == 1 and len(texts) * 2 <= len(present)):
        distinct = len({cells[k].strip() for k in present})
        return ColumnDescription(name, "category", options=f"vocabulary: top {min(distinct, MAX_VOCABULARY)}")
    bad = _bad_rows([cells[k] for k in numbers], "numeric")
    if bad:
        i = numbers[bad[0]]
        return ColumnDescription(name, None, f"{value_problem(cells[i], 'numeric')} at line {line_no[i]}")
    kind: ColumnType = "integer" if not _bad_rows([cells[k] for k in numbers], "integer") else "numeric"
    if texts:  # one placeholder for "unknown" (FATE and UCI files use "?")
        token = json.dumps(next(iter(placeholders)), ensure_ascii=False)
        return ColumnDescription(name, kind, options=f"missing: {token} mean")
    return ColumnDescription(name, kind, options="missing: mean" if len(present) < len(cells) else "")


def round_up_rows(n: int) -> int:
    """``n`` rounded up to two significant digits (569 -> 570, 30000 -> 30000, 50123 -> 51000): room for a
    file that grows a little, without a bound so loose that it inflates the compiled message budgets."""
    if n < 100:
        return n
    step = 10 ** (len(str(n)) - 2)
    return -(-n // step) * step


__all__ = [
    "ColumnDescription",
    "CsvDescription",
    "SchemaMismatch",
    "check_csv_schema",
    "check_schemas",
    "describe_csv",
    "field_starts",
    "round_up_rows",
    "value_problem",
]
