"""Pass 2, data: each data set's declaration, its csv/parquet file or ``schema`` block, column options
(scaling, missing fills, vocabularies, buckets) and the fields it gives the model.
"""

from __future__ import annotations

import csv
import fnmatch
import itertools
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fldsl.artifacts import (
    COLUMN_TYPES,
    ColumnSpec,
    DataSpec,
    MissingSpec,
    ScaleSpec,
    TensorSpec,
)
from fldsl.compiler import ast
from fldsl.compiler.checkstate import CheckState, _arg_span
from fldsl.compiler.ir import IRDataset
from fldsl.compiler.values import BAD, Env, evaluate
from fldsl.diagnostics import did_you_mean
from fldsl.stdlib import signatures as sig

MAX_VOCABULARY = 100_000  # one-hot columns per category column: far beyond a useful vocabulary


def dataset(ck: CheckState, dd: ast.DataDecl, party: str, env: Env) -> IRDataset | None:
    call = dd.reader
    rname = call.func.value
    reader = sig.READERS.get(rname)
    if reader is None:
        ck.unknown(call.func.span, "data reader", rname, sig.READERS)
        return None
    env.used_params = set()
    args = ck._bind(call, reader.params, f"`{rname}(...)`", env)
    if args is None:
        return None
    span = ck.loc(dd.span)
    name = dd.name.value
    if rname in ("csv", "parquet"):
        if dd.schema is not None:
            return _csv_declared(ck, dd, dd.schema, party, args, env, span)
        return _csv(ck, dd, party, args, env, span)
    if dd.schema is not None:
        ck.error(
            dd.schema.span,
            f"a schema block describes a csv or Parquet file; `{rname}(...)` generates its own columns",
            "remove the block",
        )
        return None
    for k in ("rows", "parts", "buckets"):
        if k in args and args[k] <= 0:
            ck.error(call.span, f"`{k}` of `{rname}(...)` must be positive, got {args[k]}")
            return None
    if rname == "criteo" and not 0 <= args["part"] < args["parts"]:
        ck.error(call.span, f"`part` must be in 0..{args['parts'] - 1}, got {args['part']}")
        return None
    if rname == "wide_n_deep" and (args["features"] <= 0 or not 0 < args["overlap"] <= 1):
        ck.error(call.span, "`features` must be positive and `overlap` in (0, 1]")
        return None
    fields = reader.fields(args)
    spec = DataSpec(
        name=name,
        reader=rname,  # type: ignore[arg-type]
        params=dict(sorted(args.items())),
        id_column=reader.id_column,
        label_column="label" if "label" in fields else None,
        fields=fields,
    )
    rows = -(-args["rows"] // args["parts"]) if rname == "criteo" else args["rows"]
    return IRDataset(party=party, spec=spec, rows=rows, span=span)


def _csv(
    ck: CheckState, dd: ast.DataDecl, party: str, args: dict[str, Any], env: Env, span: str
) -> IRDataset | None:
    call = dd.reader
    raw = args["path"]
    path = Path(raw)
    candidates = [path] if path.is_absolute() else [ck.base_dir / path, Path.cwd() / path]
    found = next((c for c in candidates if c.is_file()), None)
    arg_span = call.args[0].span if call.args else call.span
    if found is None:
        _not_found(ck, raw, candidates, env, arg_span)
        return None
    found = found.resolve()
    read = _header_and_rows(ck, call, found, arg_span)
    if read is None:
        return None
    header, rows = read
    id_col, label_col = args["id"], args["label"]
    ok = True
    for what, col in (("id", id_col), ("label", label_col)):
        if col is not None and col not in header:
            best = did_you_mean(col, header)
            ck.error(
                _arg_span(call, what) or call.span,
                f"{what} column `{col}` is not in the header of {found.name}"
                + (f"; did you mean `{best}`?" if best else ""),
                None
                if best
                else f"columns: {', '.join(header[:12])}{', ...' if len(header) > 12 else ''}",
            )
            ok = False
    if not ok:
        return None
    pool = [c for c in header if c not in (id_col, label_col)]
    features = _expand_columns(ck, call, args["columns"], pool, f"no column of {found.name}", "columns")
    if features is None:
        return None
    spec = DataSpec(
        name=dd.name.value,
        reader=call.func.value,  # type: ignore[arg-type]  # csv or parquet (the caller's test)
        path=str(found),
        id_column=id_col,
        label_column=label_col,
        feature_columns=features,
        fields=_csv_fields(ck, len(features), label_col),
    )
    return IRDataset(party=party, spec=spec, rows=rows, span=span)


def _expand_columns(ck: CheckState, call: ast.Call, patterns: list[str], pool: list[str], nowhere: str,
                    listed: str) -> list[str] | None:
    """The ``columns:`` patterns matched against ``pool`` (a file's header or a schema block), in pattern
    order without repeats; None after reporting the first pattern that matches nothing."""
    features: list[str] = []
    for pat in patterns:
        hits = [c for c in pool if fnmatch.fnmatchcase(c, pat)]
        if not hits:
            ck.error(
                _arg_span(call, "columns") or call.span,
                f"column pattern `{pat}` matches {nowhere}",
                f"{listed}: {', '.join(pool[:12])}{', ...' if len(pool) > 12 else ''}",
            )
            return None
        features += [c for c in hits if c not in features]
    return features


def _not_found(ck: CheckState, raw: str, candidates: list[Path], env: Env, arg_span: ast.Span) -> None:
    path_params = [p for p in sorted(env.used_params) if env.param_types.get(p) == "path"]
    where = " or ".join(str(c.resolve()) for c in candidates)
    if path_params:
        # One line per parameter: the other files under that folder are missing for the same reason.
        if path_params[0] in ck.missing_data_params:
            return
        ck.missing_data_params.add(path_params[0])
        ck.error(
            arg_span,
            f"data file not found: {raw} (looked for {where}); "
            f"set parameter `{path_params[0]}` to the folder that holds it: "
            f"`--set {path_params[0]}=DIR`",
        )
    else:
        ck.error(arg_span, f"data file not found: {raw} (looked for {where})")


def _header_and_rows(
    ck: CheckState, call: ast.Call, found: Path, arg_span: ast.Span
) -> tuple[list[str], int] | None:
    """A data file's column names and row count, or None after reporting why it cannot be read."""
    if call.func.value == "parquet":
        parquet = _parquet_columns(found)
        if isinstance(parquet, str):
            ck.error(arg_span, f"cannot read data file {found}: {parquet}")
            return None
        return parquet
    try:
        with found.open("r", encoding="utf-8", newline="") as f:
            header_line = f.readline()
            rows = sum(1 for line in f if line.strip())
    except (OSError, UnicodeDecodeError) as e:
        ck.error(arg_span, f"cannot read data file {found}: {e}")
        return None
    header = [c.strip() for c in next(csv.reader([header_line.strip()]), [])]
    if not header_line.strip():
        ck.error(arg_span, f"{found}: empty file (a CSV needs a header line)")
        return None
    return header, rows


def _csv_declared(
    ck: CheckState, dd: ast.DataDecl, block: ast.SchemaBlock, party: str, args: dict[str, Any], env: Env,
    span: str,
) -> IRDataset | None:
    """A csv data set with a schema block: built from the declaration alone. The file is never opened
    (each party compiles without the others' data) and its path stays as declared, so every party's
    build is byte-identical; the node checks its file against the schema when it starts."""
    call = dd.reader
    id_col, label_col = args["id"], args["label"]
    declared = _schema_columns(ck, dd, block, id_col, label_col, env)
    bound = _rows_bound(ck, block, env)
    if declared is None or bound is None:
        return None
    names = [c.name for c in declared]
    width = {c.name: c.width for c in declared}
    features = _expand_columns(ck, call, args["columns"], names,
                               f"no column declared in the schema block of `{dd.name.value}`", "declared")
    if features is None:
        return None
    spec = DataSpec(
        name=dd.name.value,
        reader=call.func.value,  # type: ignore[arg-type]  # csv or parquet (the caller's test)
        path=args["path"],
        id_column=id_col,
        label_column=label_col,
        feature_columns=features,
        fields=_csv_fields(ck, sum(width[c] for c in features), label_col),
        columns=declared,
        max_rows=bound,
    )
    return IRDataset(party=party, spec=spec, rows=bound, span=span)


def _schema_columns(
    ck: CheckState, dd: ast.DataDecl, block: ast.SchemaBlock, id_col: str | None, label_col: str | None,
    env: Env,
) -> list[ColumnSpec] | None:
    """The declared columns, in order, or None after reporting every problem in the block. A party
    family shares one block: it is checked (and reported) once, not once per member."""
    key = id(block)
    if key in ck.schemas:
        return ck.schemas[key]
    out: list[ColumnSpec] = []
    first: dict[str, ast.Span] = {}
    ok = True
    for cd in block.columns:
        ctype = cd.type.value
        if ctype not in COLUMN_TYPES:
            ck.unknown(cd.type.span, "column type", ctype, COLUMN_TYPES)
            ok = False
            continue
        options = _column_options(ck, cd, env)
        if options is None:
            ok = False
            continue
        for col in cd.columns:
            name = col.value
            problem: tuple[str, str | None] | None = None
            if not name.strip():
                problem = ("a column name cannot be empty", None)
            elif name != name.strip():
                problem = (
                    f"column name {json.dumps(name)} starts or ends with a space",
                    "header cells are read without surrounding spaces: drop them from the name",
                )
            elif name in first:
                prev = first[name]
                problem = (
                    f"column `{name}` is declared twice",
                    f"first declared at line {prev.line}, column {prev.column}; remove one",
                )
            elif name == id_col:
                problem = (
                    f"`{name}` is the id column (`id: {name}`); it cannot also be a feature column",
                    "remove it from the block: ids align rows, they are never fed to the model",
                )
            elif name == label_col:
                problem = (
                    f"`{name}` is the label column (`label: {name}`); a label cannot be a feature column",
                    "remove it from the block: the model would be given the answer it should predict",
                )
            if problem is not None:
                ck.error(col.span, problem[0], problem[1])
                ok = False
                continue
            first[name] = col.span
            out.append(ColumnSpec(name=name, type=ctype, **options))
    if ok and not block.columns:
        ck.error(
            block.span,
            f"the schema block of `{dd.name.value}` declares no column",
            "add a line such as `numeric x1, x2` (`fldsl data describe FILE` prints the block)",
        )
        ok = False
    result = out if ok else None
    ck.schemas[key] = result
    return result


class _Options:
    """One schema line's option reader: reports a problem and remembers that the line failed."""

    def __init__(self, ck: CheckState, env: Env, ctype: str) -> None:
        self.ck, self.env, self.ctype = ck, env, ctype
        self.numeric = ctype in ("numeric", "integer")
        self.out: dict[str, Any] = {}
        self.ok = True

    def bad(self, span: ast.Span, message: str, hint: str | None = None) -> None:
        self.ck.error(span, message, hint)
        self.ok = False

    def number(self, expr: ast.Expr, what: str) -> float | None:
        v = evaluate(expr, "float", self.env, what, self.ck.report)
        if v is BAD:
            self.ok = False
            return None
        return float(v)

    def count(self, expr: ast.Expr, what: str, most: int) -> int | None:
        v = evaluate(expr, "int", self.env, what, self.ck.report)
        if v is BAD:
            self.ok = False
            return None
        if not 1 <= v <= most:
            self.bad(expr.span, f"{what} must be between 1 and {most:,}, got {v}")
            return None
        return int(v)


def _column_options(ck: CheckState, cd: ast.ColumnDecl, env: Env) -> dict[str, Any] | None:
    """The preprocessing of one schema line (``missing:``, ``scale:``, ``vocabulary:``, ``hash:``) as
    ColumnSpec fields, or None after reporting every problem with them."""
    r = _Options(ck, env, cd.type.value)
    seen: dict[type, ast.Span] = {}
    for opt in cd.options:
        word = {ast.MissingOpt: "missing", ast.ScaleOpt: "scale", ast.VocabularyOpt: "vocabulary",
                ast.HashOpt: "hash", ast.BucketizeOpt: "bucketize"}[type(opt)]
        if type(opt) in seen:
            prev = seen[type(opt)]
            r.bad(opt.span, f"`{word}:` is given twice on one line",
                  f"first given at line {prev.line}, column {prev.column}; keep one")
            continue
        seen[type(opt)] = opt.span
        if isinstance(opt, ast.MissingOpt):
            _missing_option(r, opt)
        elif isinstance(opt, ast.ScaleOpt):
            _scale_option(r, opt)
        elif isinstance(opt, ast.VocabularyOpt):
            _vocabulary_option(r, opt)
        elif isinstance(opt, ast.BucketizeOpt):
            bounds = _bucket_bounds(ck, opt, r.ctype, env, r.bad)
            if bounds is not None:
                r.out["buckets"] = bounds
        else:
            _hash_option(r, opt)
    _line_rules(r, cd)
    return r.out if r.ok else None


def _missing_option(r: _Options, opt: ast.MissingOpt) -> None:
    token = str(opt.token.value) if opt.token is not None else None
    if opt.token is not None and token is not None and (token != token.strip() or token == ""):
        r.bad(opt.token.span, f"missing-value token {json.dumps(token)} is empty or starts or "
              "ends with a space",
              "cells are compared without surrounding spaces, and an empty cell is always missing")
        return
    if not r.numeric:
        if opt.fill is not None:
            r.bad(opt.fill.span, f"`{opt.fill.value}` fills numbers; a `category` column has no "
                  "such fill: a missing value is a category of its own (the empty value)",
                  'declare only the token, e.g. `missing: "?"`')
            return
        if opt.indicator is not None:
            r.bad(opt.indicator.span, "`indicator` is for numeric and integer columns: a missing "
                  "category value is already a category of its own (the empty value)",
                  "remove `indicator`")
            return
        r.out["missing"] = MissingSpec(token=token)
        return
    if opt.fill is None:
        r.bad(opt.span, "`missing:` on a numeric or integer line needs a fill: `mean`, `median` or "
              "`constant N`", 'e.g. `missing: "?" mean` or `missing: constant 0 indicator`')
        return
    value = r.number(opt.value, "the fill constant") if opt.value is not None else None
    if opt.value is not None and value is None:
        return
    if r.ctype == "integer" and value is not None and not value.is_integer():
        r.bad(opt.value.span, f"the fill constant of an integer column must be a whole number, "  # type: ignore[union-attr]
              f"got {value}")
        return
    r.out["missing"] = MissingSpec(token=token, fill=opt.fill.value, value=value,  # type: ignore[arg-type]
                                   indicator=opt.indicator is not None)
    if opt.fill.value == "median":
        r.ck.medians.append(opt.fill.span)


def _scale_option(r: _Options, opt: ast.ScaleOpt) -> None:
    if not r.numeric:
        r.bad(opt.span, "`scale:` is for numeric and integer columns; a category becomes one-hot "
              "columns of 0 and 1", "remove `scale:` from this line")
        return
    lo = r.number(opt.lo, "the lower clip bound") if opt.lo is not None else None
    hi = r.number(opt.hi, "the upper clip bound") if opt.hi is not None else None
    if opt.kind.value == "clip":
        if lo is None or hi is None:
            return
        if not lo < hi:
            r.bad(opt.span, f"`clip(lo, hi)` needs lo < hi, got clip({lo:g}, {hi:g})")
            return
    r.out["scale"] = ScaleSpec(kind=opt.kind.value, lo=lo, hi=hi)  # type: ignore[arg-type]


def _vocabulary_option(r: _Options, opt: ast.VocabularyOpt) -> None:
    if r.numeric:
        r.bad(opt.span, f"`vocabulary:` is for `category` columns, not `{r.ctype}` ones",
              "declare the columns as `category` to one-hot their values")
        return
    k = r.count(opt.top, "the vocabulary size", MAX_VOCABULARY)
    if k is not None:
        r.out["vocabulary"] = k
        r.ck.vocabularies.append(opt.span)


def _hash_option(r: _Options, opt: ast.HashOpt) -> None:
    if r.numeric:
        r.bad(opt.span, f"`hash:` is for `category` columns, not `{r.ctype}` ones",
              "declare the columns as `category` to hash their values")
        return
    n = r.count(opt.buckets, "the number of hash buckets", MAX_VOCABULARY)
    if n is not None:
        r.out["hash_buckets"] = n


def _line_rules(r: _Options, cd: ast.ColumnDecl) -> None:
    """What the options of one line must agree on (checked only when each option was fine)."""
    out = r.out
    if r.ok and "buckets" in out and "scale" in out:
        r.bad(cd.span, "a line takes `bucketize:` or `scale:`, not both: the bucket's one-hot replaces the "
              "value, so a scale would change nothing", "keep one")
    if r.ok and r.ctype == "category":
        if "vocabulary" in out and "hash_buckets" in out:
            r.bad(cd.span, "a category line takes `vocabulary:` or `hash:`, not both",
                  "keep one: the feature columns are either the vocabulary's or the buckets'")
        elif "vocabulary" not in out and "hash_buckets" not in out:
            cols = ", ".join(_quoted(c.value) for c in cd.columns[:2])
            r.bad(cd.type.span, "a `category` line needs `vocabulary: top K` or `hash: N buckets`: the "
                  "number of feature columns it becomes is declared, so every party compiles the same "
                  "model", f"e.g. `category {cols} vocabulary: top 100`")


def _bucket_bounds(ck: CheckState, opt: ast.BucketizeOpt, ctype: str, env: Env,
                   bad: Callable[[ast.Span, str, str | None], None]) -> list[float] | None:
    """``bucketize: [b1, ..., bk]``: k strictly increasing finite boundaries (k + 1 one-hot columns:
    below b1, [b1, b2), ..., at or above bk; nothing fitted)."""
    if ctype == "category":
        bad(opt.span, "`bucketize:` is for numeric and integer columns; a category is already one-hot",
            "remove `bucketize:` from this line")
        return None
    v = evaluate(opt.bounds, "list[float]", env, "the bucket boundaries", ck.report)
    if v is BAD:  # reported by evaluate (the check fails on it)
        return None
    bounds = [float(x) for x in v]
    if not 1 <= len(bounds) <= MAX_VOCABULARY:
        bad(opt.bounds.span, f"`bucketize:` needs between 1 and {MAX_VOCABULARY:,} boundaries, got "
            f"{len(bounds)}", "e.g. `bucketize: [18, 30, 50]`")
        return None
    if any(not math.isfinite(b) for b in bounds) or any(b >= c for b, c in itertools.pairwise(bounds)):
        bad(opt.bounds.span, "the bucket boundaries must be finite and strictly increasing, got "
            f"[{', '.join(f'{b:g}' for b in bounds)}]", None)
        return None
    return bounds


def check_fitted_vocabularies(ck: CheckState) -> None:
    """``vocabulary:`` is fitted on the training rows of the node holding the column. In a horizontal
    pipeline that is every worker, each with its own rows: column j of the one-hot would be another
    value at each worker, under one shared model. Refused; hashing needs no fit. A median fill cannot be
    pooled (flows.horizontal's `stats` flow carries sums, not values): refused too."""
    if ck.scenario != "horizontal":
        return
    for span in sorted(set(ck.vocabularies), key=lambda s: (s.line, s.column)):
        ck.error(span, "`vocabulary:` is not available in a horizontal pipeline: each worker would "
                   "choose its own most frequent values, so a one-hot column would mean a different "
                   "value at each worker under one shared model",
                   "use `hash: N buckets` (the same buckets at every worker, nothing to fit)")
    for span in sorted(set(ck.medians), key=lambda s: (s.line, s.column)):
        ck.error(span, "`median` is not available in a horizontal pipeline: the workers pool "
                   "counts, means and spreads of their training values at the aggregator (the `stats` "
                   "flow), from which the mean of all of them follows exactly, but not the median",
                   "use `mean` or `constant N`")


def _rows_bound(ck: CheckState, block: ast.SchemaBlock, env: Env) -> int | None:
    if not block.rows:
        ck.error(
            block.span,
            "the schema block needs `rows <= N`: the most rows the file may hold "
            "(it sizes the messages that carry ids or rows)",
            "add `rows <= N` (`fldsl data describe FILE` prints the block)",
        )
        return None
    if len(block.rows) > 1:
        ck.error(block.rows[1].span, "`rows <=` is given twice in one schema block", "keep one bound")
        return None
    bound = evaluate(block.rows[0].value, "int", env, "the row bound", ck.report)
    if bound is BAD:
        return None
    if bound <= 0:
        ck.error(block.rows[0].value.span, f"the row bound must be positive, got {bound}")
        return None
    return int(bound)


def _csv_fields(ck: CheckState, width: int, label_col: str | None) -> dict[str, TensorSpec]:
    fields: dict[str, TensorSpec] = {"features": TensorSpec(shape=[None, width], dtype="float32")}
    if label_col is not None:
        dtype = "float32" if ck.loss_name == "mse" else "int64"
        fields["label"] = TensorSpec(shape=[None], dtype=dtype)  # type: ignore[arg-type]
    return fields


def _quoted(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) else json.dumps(name)


def _parquet_columns(path: Path) -> tuple[list[str], int] | str:
    """A Parquet file's column names and row count, from its footer alone (no column is read), or why it
    cannot be read."""
    try:
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path).metadata
        return list(meta.schema.to_arrow_schema().names), int(meta.num_rows)
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        return "pyarrow is not installed"
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a file that is not Parquet
        return f"not a Parquet file ({e})"
