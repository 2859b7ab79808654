"""The pyarrow readers (runtime/arrowread.py) against the exact Python reader: the same arrays on files the
fast path reads, the same errors (file:line:column) on files it hands back, Parquet data sets through a
compiled pipeline, and the data-load benchmark in a tiny mode."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fldsl.api import compile_pipeline
from fldsl.artifacts import ColumnSpec, DataSpec, MissingSpec, Plan, TensorSpec, load_model
from fldsl.runtime import arrowread
from fldsl.runtime.csvschema import SchemaMismatch, check_schemas
from fldsl.runtime.data import DataError, LabelRule, Table, load_dataset

ROOT = Path(__file__).resolve().parents[2]


def _spec(path: Path, columns: list[ColumnSpec] | None, features: list[str], *, reader: str = "csv",
          label: str | None = "y", max_rows: int | None = 1000, label_dtype: str = "int64") -> DataSpec:
    fields = {"features": TensorSpec(shape=[None, len(features)], dtype="float32")}
    if label:
        fields["label"] = TensorSpec(shape=[None], dtype=label_dtype)  # type: ignore[arg-type]
    return DataSpec(name="people", reader=reader, path=str(path), id_column="id", label_column=label,  # type: ignore[arg-type]
                    feature_columns=features, fields=fields, columns=columns,
                    max_rows=max_rows if columns is not None else None)


def _same(a: Table, b: Table) -> None:
    assert a.ids.dtype.kind == b.ids.dtype.kind
    np.testing.assert_array_equal(a.ids, b.ids)
    assert sorted(a.fields) == sorted(b.fields) and sorted(a.raw) == sorted(b.raw)
    for k in a.fields:
        assert a.fields[k].dtype == b.fields[k].dtype, k
        np.testing.assert_array_equal(a.fields[k], b.fields[k])
    for k in a.raw:
        x, y = _raw_values(a.raw[k]), _raw_values(b.raw[k])
        assert x.dtype.kind == y.dtype.kind, k
        np.testing.assert_array_equal(x, y)


def _raw_values(col: object) -> np.ndarray:
    """A raw column as numpy: the Arrow readers keep category columns as Arrow strings (a missing value
    null or ""), the exact reader as numpy text (""); the cells must be the same."""
    to_pylist = getattr(col, "to_pylist", None)
    if to_pylist is None:
        return np.asarray(col)
    return np.asarray(["" if v is None else v for v in to_pylist()], dtype=str)  # null: the missing category


def _both(spec: DataSpec, rule: LabelRule | None = None) -> tuple[Table | str, Table | str]:
    """What each engine makes of the file: its Table, or its error message."""
    out: list[Table | str] = []
    for engine in ("arrow", "python"):
        try:
            out.append(load_dataset(spec, label_rule=rule, engine=engine))  # type: ignore[arg-type]
        except DataError as e:
            out.append(str(e))
    return out[0], out[1]


CENSUS = (
    'id,y,age,"hours-per-week",edu,kids,note\n'
    " u1 ,1,39, 40.5 , HS-grad ,2,x\n"
    "u2,0,,38,?,0,y\n"
    "\n"  # a blank line is not a row
    'u3,1,?,"1e3",Bachelors,3,"a,b"\n'
    "u4,0,52,-4,,1,z\n"
    "u5,1,27,0.125,Ünïcode ,4,z\n"
)
DECLARED = [
    ColumnSpec(name="age", type="integer", missing=MissingSpec(token="?", fill="mean")),
    ColumnSpec(name="hours-per-week", type="numeric"),
    ColumnSpec(name="edu", type="category", missing=MissingSpec(token="?"), vocabulary=3),
    ColumnSpec(name="kids", type="integer"),
]


def test_schema_file_same_arrays_and_read_by_arrow(tmp_path: Path) -> None:
    p = tmp_path / "c.csv"
    p.write_text(CENSUS, encoding="utf-8")
    spec = _spec(p, DECLARED, ["age", "hours-per-week", "edu", "kids"])
    assert arrowread.read_csv_arrow(spec, p, every_declared=True) is not None  # the fast path, not a fallback
    fast, exact = _both(spec, LabelRule(2, "binary"))
    assert isinstance(fast, Table) and isinstance(exact, Table)
    _same(fast, exact)
    assert fast.ids.tolist() == ["u1", "u2", "u3", "u4", "u5"]
    # the token and the empty cell are both ""
    assert _raw_values(fast.raw["edu"]).tolist() == ["HS-grad", "", "Bachelors", "", "Ünïcode"]
    np.testing.assert_array_equal(fast.raw["age"], [39, np.nan, np.nan, 52, 27])


def test_plain_numeric_file_same_features_and_float_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1e3, (300, 3))
    lines = ["id,a,b,c,y"] + [f"r{i},{float(x[i, 0])!r},{x[i, 1]:.3e},{x[i, 2]:.9f},{i % 7 / 3}"
                              for i in range(300)]
    p = tmp_path / "n.csv"
    p.write_text("\n".join(lines) + "\n")
    for dtype in ("float32", "float64"):
        spec = _spec(p, None, ["a", "b", "c"], label_dtype=dtype)
        assert arrowread.read_csv_arrow(spec, p) is not None
        fast, exact = _both(spec)
        assert isinstance(fast, Table) and isinstance(exact, Table)
        _same(fast, exact)
        assert fast.fields["features"].dtype == np.float32 and fast.fields["label"].dtype == dtype


@pytest.mark.parametrize("cell", ["1_0", "nan", "inf", "-Infinity", "NA", "  ", "\t4", "0x10", "1e400", "4.5",
                                  '" 7 "', "1e5", "+3", ".5", "5.", "?", "é"])
def test_odd_cells_same_result(tmp_path: Path, cell: str) -> None:
    """Whatever either reader makes of an odd cell (a value, a missing one, or an error naming its line and
    column), the other makes the same: Arrow refusing what Python's float accepts just means a fallback."""
    p = tmp_path / "o.csv"
    p.write_text(f"id,y,n,i\na,1,2,3\nb,0,{cell},{cell}\nc,1,{cell},7\n", encoding="utf-8")
    for missing in (None, MissingSpec(fill="mean"), MissingSpec(token="?", fill="median")):
        cols = [ColumnSpec(name="n", type="numeric", missing=missing),
                ColumnSpec(name="i", type="integer", missing=missing)]
        fast, exact = _both(_spec(p, cols, ["n", "i"]))
        if isinstance(fast, Table) and isinstance(exact, Table):
            _same(fast, exact)
        else:
            assert fast == exact
    fast, exact = _both(_spec(p, None, ["n", "i"]))
    assert (fast == exact) if isinstance(fast, str) else _same(fast, exact) is None  # type: ignore[arg-type]


def test_bad_file_same_report_with_line_and_column(tmp_path: Path) -> None:
    p = tmp_path / "bad.csv"
    p.write_text('id,y,age,"hours-per-week",edu,kids\n'
                 "u1,1,30,40,a,2\n"
                 "u2,1,,abc,b,2.5\n"  # line 3: empty age, text hours, fractional kids
                 "u2,0,1,2,c,1\n"  # line 4: a duplicate id
                 "u4,1,1,1\n")  # line 5: a column short
    cols = [ColumnSpec(name="age", type="numeric"), ColumnSpec(name="hours-per-week", type="numeric"),
            ColumnSpec(name="edu", type="category", vocabulary=2), ColumnSpec(name="kids", type="integer")]
    spec = _spec(p, cols, ["age", "hours-per-week", "kids"])
    assert arrowread.read_csv_arrow(spec, p, every_declared=True) is None
    with pytest.raises(SchemaMismatch) as checked:
        check_schemas([spec])  # the node's start-up check: every problem, exact positions
    f = str(p)
    assert checked.value.problems == [
        f"{f}:5:1: expected 6 columns (as in the header), found 4",
        f"{f}:3:6: column `age` (numeric): empty value; to fill empty cells, declare `missing: mean` (or "
        "`median`, `constant N`) on its line",
        f"{f}:3:7: column `hours-per-week` (numeric): 'abc' is not a number; if 'abc' marks a missing "
        'value, declare `missing: "abc" mean` (or `median`, `constant N`) on its line',
        f"{f}:3:13: column `kids` (integer): '2.5' is not a whole number",
    ]
    fast, exact = _both(spec)
    assert fast == exact == str(checked.value)


def test_label_outside_the_classes_named_by_line(tmp_path: Path) -> None:
    p = tmp_path / "l.csv"
    p.write_text("id,y,a\n1,0,1\n2,3,1\n3,1,1\n")
    fast, exact = _both(_spec(p, None, ["a"]), LabelRule(2, "binary task"))
    assert isinstance(fast, str) and fast == exact and f"{p}:3:2 ('3')" in fast


def test_control_character_in_a_text_cell_falls_back(tmp_path: Path) -> None:
    """Python's splitlines breaks a line at \\x0c where Arrow does not: the exact reader decides."""
    p = tmp_path / "ff.csv"
    p.write_text("id,y,c\n1,0,a\x0cb\n2,1,c\n")
    spec = _spec(p, [ColumnSpec(name="c", type="category", hash_buckets=4)], ["c"])
    assert arrowread.read_csv_arrow(spec, p, every_declared=True) is None
    fast, exact = _both(spec)
    assert fast == exact


# ---------------------------------------------------------------------------------------------------------
# Parquet
# ---------------------------------------------------------------------------------------------------------


def _census_parquet(path: Path, rows: int = 120) -> pa.Table:
    rng = np.random.default_rng(5)
    age = rng.integers(18, 90, rows).astype(float)
    age[::7] = np.nan
    hours = rng.normal(40, 8, rows).round(2)
    y = (hours + rng.normal(0, 4, rows) > 40).astype(np.int64)
    edu = np.array(["HS", "Bachelors", "Masters", "?"])[rng.integers(0, 4, rows)]
    table = pa.table({"id": [f"u{i}" for i in range(rows)], "income": y,
                      "age": pa.array(age, mask=np.isnan(age)), "hours-per-week": hours, "edu": edu})
    pq.write_table(table, path)
    return table


PIPELINE = """\
pipeline pq
use std.models.{{mlp, dense}}
party bank {{
  node n
  data people = parquet("{path}", id: id, label: income) {block}
}}
party hub {{ node ps }}
partition horizontal over bank aggregate at hub.ps every epoch with mean
model {{
  logits = dense(mlp(people.features, units: [4]), units: [2])
  loss softmax_cross_entropy(logits, people.label)
}}
train {{ epochs: 1  batch_size: 16  validation: 0.2  seed: 1 }}
trust {{
  allow bank -> hub: weights  allow hub -> bank: weights
  allow bank -> hub: stats  allow hub -> bank: stats
}}
"""
BLOCK = """{
    rows <= 200
    integer age  missing: mean
    numeric "hours-per-week"  scale: standard
    category edu  missing: "?"  hash: 4 buckets
  }"""


def _node_data(build: Path) -> DataSpec:
    plan = load_model(Plan, build / "nodes" / "bank.n" / "plan.json")
    return plan.data[0]


def test_parquet_compiles_and_loads_like_the_same_csv(tmp_path: Path) -> None:
    p = tmp_path / "people.parquet"
    t = _census_parquet(p)
    spec = _node_data(compile_pipeline(_flp(tmp_path, p, BLOCK), tmp_path / "build").build_dir)
    assert spec.reader == "parquet" and spec.max_rows == 200 and spec.path == str(p)
    check_schemas([spec])  # the node's start-up check, which hands its read to load_dataset
    got = load_dataset(spec, label_rule=LabelRule(2, "binary"))
    # The same rows written as csv (nulls as empty cells) and read by the exact reader: the same arrays.
    c = tmp_path / "people.csv"
    import pyarrow.csv as pacsv

    pacsv.write_csv(t, c)
    _same(got, load_dataset(spec.model_copy(update={"reader": "csv", "path": str(c)}),
                            label_rule=LabelRule(2, "binary"), engine="python"))
    want = [v if v != "?" else "" for v in t.column("edu").to_pylist()[:4]]
    assert _raw_values(got.raw["edu"]).tolist()[:4] == want


def test_arrow_categories_fit_and_transform_like_the_exact_readers_text(tmp_path: Path) -> None:
    """The Arrow readers keep category columns as Arrow strings (a Parquet null stays null); fitted and
    applied, they give the features the exact reader's numpy text gives: null, "" and the token are one
    missing category, counted together for the vocabulary and hashed alike."""
    from fldsl.runtime import preprocess

    rows = 300
    rng = np.random.default_rng(11)
    edu = np.array(["HS", "Bachelors", "Masters", "?", ""])[rng.integers(0, 5, rows)].astype(object)
    edu[::9] = None  # a Parquet null: the third spelling of "missing"
    p = tmp_path / "people.parquet"
    pq.write_table(pa.table({"id": [f"u{i}" for i in range(rows)], "y": rng.integers(0, 2, rows),
                             "edu": pa.array(edu.tolist(), pa.string()),
                             "job": [f"j{v}" for v in rng.integers(0, 40, rows)]}), p)
    columns = [ColumnSpec(name="edu", type="category", missing=MissingSpec(token="?"), vocabulary=2),
               ColumnSpec(name="job", type="category", hash_buckets=8)]
    spec = _spec(p, columns, ["edu", "job"], reader="parquet")
    spec = spec.model_copy(update={"fields": {**spec.fields, "features": TensorSpec(
        shape=[None, sum(c.width for c in columns)], dtype="float32")}})
    got = load_dataset(spec, label_rule=LabelRule(2, "binary"))
    assert got.raw["edu"].null_count > 0  # kept as Arrow, nulls and all
    c = tmp_path / "people.csv"
    with c.open("w", encoding="utf-8") as f:
        f.write("id,y,edu,job\n")
        t = pq.read_table(p).to_pylist()
        f.writelines(f"{r['id']},{r['y']},{r['edu'] or ''},{r['job']}\n" for r in t)
    exact = load_dataset(spec.model_copy(update={"reader": "csv", "path": str(c)}),
                         label_rule=LabelRule(2, "binary"), engine="python")
    assert isinstance(exact.raw["edu"], np.ndarray)
    train = np.arange(0, rows, 2)
    fitted = preprocess.fit(spec, got.raw, train)
    assert fitted == preprocess.fit(spec, exact.raw, train)
    counts: dict[str, int] = {}
    for v in edu[train]:
        key = "" if v in (None, "?") else v
        counts[key] = counts.get(key, 0) + 1
    assert fitted["columns"][0]["vocabulary"] == sorted(counts, key=lambda k: (-counts[k], k))[:2]
    np.testing.assert_array_equal(preprocess.apply(fitted, got.raw), preprocess.apply(fitted, exact.raw))


def test_parquet_without_a_block_reads_the_footer(tmp_path: Path) -> None:
    p = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"id": np.arange(50), "income": np.arange(50) % 2, "a": np.linspace(0, 1, 50),
                             "b": np.arange(50, dtype=np.int32)}), p)
    spec = _node_data(compile_pipeline(_flp(tmp_path, p, ""), tmp_path / "build").build_dir)
    assert spec.feature_columns == ["a", "b"] and spec.fields["features"].shape == [None, 2]
    got = load_dataset(spec)
    assert got.ids.tolist()[:3] == ["0", "1", "2"]
    np.testing.assert_array_equal(got.fields["features"][:, 1], np.arange(50, dtype=np.float32))


def test_parquet_every_problem_by_row_and_column(tmp_path: Path) -> None:
    p = tmp_path / "bad.parquet"
    pq.write_table(pa.table({
        "id": ["a", "b", "a", None],
        "income": [0, 1, 1, 0],
        "age": pa.array([1.0, None, 2.5, np.inf]),  # null without missing:, a fraction, infinity
        "hours-per-week": ["1", "2", "3", "4"],  # text where numbers are declared
        "edu": [1.5, 2.0, 3.0, 4.0],  # floats where a category is declared
    }), p)
    cols = [ColumnSpec(name="age", type="integer"), ColumnSpec(name="hours-per-week", type="numeric"),
            ColumnSpec(name="edu", type="category", hash_buckets=4), ColumnSpec(name="gone", type="numeric")]
    spec = _spec(p, cols, ["age"], reader="parquet", label="income", max_rows=3)
    with pytest.raises(SchemaMismatch) as e:
        check_schemas([spec])
    assert e.value.problems == [
        f"{p}: the file has no column `gone`; it has: id, income, age, hours-per-week, edu"]
    spec.columns.pop()  # type: ignore[union-attr]
    with pytest.raises(SchemaMismatch) as e:
        load_dataset(spec)
    f = str(p)
    assert e.value.exit_code == 2
    assert e.value.problems == [
        f"{f}: row 4, column `id`: missing id",
        f"{f}: row 1, column `id`: id 'a' appears more than once",
        f"{f}: row 2, column `age`: missing value (null); to fill them, declare `missing: mean` (or "
        "`median`, `constant N`) on its line",
        f"{f}: row 4, column `age`: inf is not a finite number",
        f"{f}: row 3, column `age`: 2.5 is not a whole number",
        f"{f}: column `hours-per-week` holds string; a numeric column holds numbers (Parquet integer or "
        "floating point)",
        f"{f}: column `edu` holds double; a category column holds text or integers",
        f"{f}: row 4 is past the declared bound `rows <= 3` (the file has 4 rows); raise the bound in the "
        "pipeline (every party compiles it again) or use fewer rows",
    ]


def _flp(tmp_path: Path, data: Path, block: str) -> Path:
    flp = tmp_path / "pq.flp"
    flp.write_text(PIPELINE.format(path=data, block=block))
    return flp


# ---------------------------------------------------------------------------------------------------------
# The benchmark, tiny
# ---------------------------------------------------------------------------------------------------------


def _bench() -> object:
    spec = importlib.util.spec_from_file_location("data_load_bench", ROOT / "bench" / "data_load.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["data_load_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_tiny_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _bench()
    assert bench.main(["--rows", "3000", "--old-rows", "1000", "--dir", str(tmp_path), "--json"]) == 0  # type: ignore[attr-defined]
    r = json.loads(capsys.readouterr().out)
    loads = {(x["reader"], x["engine"]): x for x in r["loads"]}
    assert sorted(loads) == [("csv", "arrow"), ("csv", "python"), ("parquet", "arrow")]
    assert loads["csv", "arrow"]["rows"] == loads["parquet", "arrow"]["rows"] == 3000
    assert loads["csv", "python"]["rows"] == 1000 and loads["csv", "python"]["scaled_seconds"] > 0
    assert all(x["peak_rss"] > x["array_bytes"] > 0 for x in r["loads"])
    # The generated Criteo-layout file reads the same through both csv engines and through Parquet.
    spec = bench.schema_spec(tmp_path / "criteo_3000.csv", 3000)  # type: ignore[attr-defined]
    fast, exact = _both(spec, LabelRule(2, "binary"))
    assert isinstance(fast, Table) and isinstance(exact, Table)
    _same(fast, exact)
    assert _raw_values(fast.raw["C1"]).dtype == np.dtype("<U8") and (_raw_values(fast.raw["C1"]) == "").any()
    assert np.isnan(fast.raw["I1"]).any()
    _same(load_dataset(bench.schema_spec(tmp_path / "criteo_3000.parquet", 3000, "parquet")), fast)  # type: ignore[attr-defined]
