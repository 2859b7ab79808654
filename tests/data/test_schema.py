"""Declared csv schemas at the node: the file is checked against the plan's columns, types and row bound,
every problem in one report as file:line:column; and `describe` infers a block that passes that check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fldsl.artifacts import ColumnSpec, DataSpec, TensorSpec
from fldsl.runtime.csvschema import (
    SchemaMismatch,
    check_csv_schema,
    describe_csv,
    field_starts,
    round_up_rows,
    value_problem,
)
from fldsl.runtime.data import DataError, load_dataset


def _spec(path: Path | str, columns: list[tuple[str, str]], max_rows: int = 100,
          features: list[str] | None = None) -> DataSpec:
    feats = features if features is not None else [n for n, _ in columns]
    return DataSpec(
        name="census", reader="csv", path=str(path), id_column="id", label_column="y",
        feature_columns=feats,
        fields={"features": TensorSpec(shape=[None, len(feats)], dtype="float32"),
                "label": TensorSpec(shape=[None], dtype="int64")},
        columns=[ColumnSpec(name=n, type=t) for n, t in columns],  # type: ignore[arg-type]
        max_rows=max_rows,
    )


COLS = [("age", "numeric"), ("hours-per-week", "numeric"), ("kids", "integer")]


def test_matching_file_loads_and_extra_columns_are_allowed(tmp_path: Path) -> None:
    p = tmp_path / "c.csv"
    p.write_text('id,y,age,"hours-per-week",kids,notes\n1,0,30,40.5,2,red\n2,1,41,38,0,blue\n\n')
    t = load_dataset(_spec(p, COLS, max_rows=2))
    assert t.ids.tolist() == ["1", "2"]
    np.testing.assert_allclose(t.fields["features"], [[30, 40.5, 2], [41, 38, 0]])


def test_every_problem_in_one_report_with_line_and_column(tmp_path: Path) -> None:
    p = tmp_path / "c.csv"
    p.write_text(
        'id,y,age,"hours-per-week",kids\n'
        "1,0,30,40.5,2\n"
        "2,1,,abc,2.5\n"  # line 3: empty age, text hours, fractional kids
        '3,,"x",1e400,1\n'  # line 4: empty label, quoted text age, infinite hours
        "4,0,1,2\n"  # line 5: a column short
        "5,1,1,1,1\n"
    )
    spec = _spec(p, [*COLS, ("agee", "numeric")], max_rows=3)
    with pytest.raises(SchemaMismatch) as ei:
        load_dataset(spec)
    e = ei.value
    f = str(p)
    assert e.exit_code == 2 and isinstance(e, DataError)
    assert str(e).splitlines()[0] == (
        f"data set `census`: {f} does not match the schema declared in the pipeline (7 problems):")
    # In a fixed order: the header, malformed rows, ids/labels, each declared column, the row bound.
    assert e.problems == [
        f"{f}:1:1: the header has no column `agee` (declared numeric); did you mean `age`?",
        f"{f}:5:1: expected 5 columns (as in the header), found 4",
        f"{f}:4:3: empty label in column `y`",
        f"{f}:3:5: column `age` (numeric): empty value; if 'x' marks a missing value, declare "
        '`missing: "x" mean` (or `median`, `constant N`) on its line (and 1 row more in this column)',
        f"{f}:3:6: column `hours-per-week` (numeric): 'abc' is not a number (and 1 row more in this column)",
        f"{f}:3:10: column `kids` (integer): '2.5' is not a whole number",
        f"{f}:5:1: row 4 is past the declared bound `rows <= 3` (the file has 5 rows); raise the bound in "
        "the pipeline (every party compiles it again) or use fewer rows",
    ]


def test_missing_id_and_label_columns_are_reported(tmp_path: Path) -> None:
    p = tmp_path / "c.csv"
    p.write_text("ID,label,age\n1,0,3\n")
    with pytest.raises(SchemaMismatch) as ei:
        check_csv_schema(_spec(p, [("age", "numeric")]), p)
    assert [q.split(": ", 1)[1] for q in ei.value.problems] == [
        "the header has no column `id` (id); did you mean `ID`?",
        "the header has no column `y` (label); it has: ID, label, age",
    ]


def test_a_spec_without_schema_is_not_checked(tmp_path: Path) -> None:
    p = tmp_path / "c.csv"
    p.write_text("id,y,age\n1,0,3.5\n")
    spec = _spec(p, [("age", "integer")]).model_copy(update={"columns": None, "max_rows": None})
    check_csv_schema(spec, p)  # no schema: nothing to check (the reader's own checks still apply)
    assert load_dataset(spec).fields["features"].tolist() == [[3.5]]


def test_missing_file_names_the_binding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as ei:
        load_dataset(_spec("data/c.csv", COLS))
    msg = str(ei.value)
    assert msg.startswith("data/c.csv: no such file (a relative path is looked up from ")
    assert "--data census=PATH" in msg


def test_field_starts_respect_quotes() -> None:
    assert field_starts('a,"b,c",,d') == [1, 3, 9, 10]
    assert field_starts('"x ""y"", z",1') == [1, 14]


@pytest.mark.parametrize(("cell", "ctype", "problem"), [
    ("3", "integer", None), ("3.0", "integer", None), ("-2", "integer", None),
    ("2.5", "integer", "'2.5' is not a whole number"), ("2.5", "numeric", None),
    (" ", "numeric", "empty value"),
    ("inf", "numeric", "'inf' is not a finite number"), ("a", "integer", "'a' is not a number"),
])
def test_value_predicates(cell: str, ctype: str, problem: str | None) -> None:
    assert value_problem(cell, ctype) == problem  # type: ignore[arg-type]


def test_describe_infers_types_in_header_order(tmp_path: Path) -> None:
    p = tmp_path / "c.csv"
    p.write_text('id,y,age,"hours-per-week",kids,colour,gaps\n1,0,30,40.5,2,red,1\n2,1,41,38,0,blue,\n')
    d = describe_csv(p, id_column="id", label_column="y")
    assert d.rows == 2
    assert [(c.name, c.type, c.options) for c in d.columns] == [
        ("age", "integer", ""), ("hours-per-week", "numeric", ""), ("kids", "integer", ""),
        ("colour", "category", "vocabulary: top 2"), ("gaps", "integer", "missing: mean")]
    with pytest.raises(DataError, match="no label column `Y` in the header; did you mean `y`"):
        describe_csv(p, id_column="id", label_column="Y")


def test_round_up_rows() -> None:
    assert [round_up_rows(n) for n in (7, 99, 100, 569, 8000, 30000, 50123, 123456)] == [
        7, 99, 100, 570, 8000, 30000, 51000, 130000]


def test_described_categories_and_missing_values_compile_as_printed(tmp_path: Path) -> None:
    """What `data describe` prints for a messy file (empty cells, a "?" placeholder, text) is a block the
    compiler takes as it is, without the file."""
    from click.testing import CliRunner

    from fldsl.api import compile_pipeline
    from fldsl.cli import main

    p = tmp_path / "guest.csv"
    rows = [f"{i},{i % 2},{'' if i % 7 == 0 else 20 + i % 50},{['BSc', 'MSc', 'PhD'][i % 3]},"
            f"{'?' if i % 5 == 0 else i * 1.5}" for i in range(60)]
    p.write_text("id,y,age,edu,income\n" + "\n".join(rows) + "\n")
    res = CliRunner().invoke(main, ["data", "describe", str(p), "--label", "y", "--name", "patients"])
    assert res.exit_code == 0, res.output
    block = res.stdout
    assert "integer age  missing: mean" in block and "category edu  vocabulary: top 3" in block
    assert 'numeric income  missing: "?" mean' in block
    flp = tmp_path / "p.flp"
    flp.write_text(f"""pipeline described
use std.models.{{dense, concat}}
party guest {{
  node trainer
  {block.strip().replace(chr(10), chr(10) + "  ")}
}}
party host {{
  node trainer
  data other = csv("host.csv", id: id) {{
    rows <= 60
    numeric h
  }}
}}
partition vertical {{
  align guest.patients, host.other on id using psi.ecdh
}}
model {{
  at host: act = dense(other.features, units: [4])
  at guest: logits = dense(concat(patients.features, act), units: [2])
  loss softmax_cross_entropy(logits, patients.label)
}}
train {{
  epochs: 1
  batch_size: 8
  optimizer: sgd(learning_rate: 0.1)
}}
trust {{
  attestation sim
  allow host -> guest: act
  allow guest -> host: grad(act)
}}
""")
    p.unlink()  # compiled without the file, from the printed block alone
    result = compile_pipeline(flp, tmp_path / "build")
    plan = (result.build_dir / "nodes" / "guest.trainer" / "plan.json").read_text()
    assert '"category"' in plan and "vocabulary" in plan


def test_describe_a_parquet_file_then_its_block_checks_the_file(tmp_path: Path) -> None:
    """`data describe x.parquet` types the columns from the file (integers, floats with nulls, text with
    nulls, a column of infinities left out by row) and prints a `parquet(...)` declaration; compiled, the
    node's start-up check passes on the same file and reads it."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from click.testing import CliRunner

    from fldsl.api import compile_pipeline
    from fldsl.artifacts import Plan, load_model
    from fldsl.cli import main
    from fldsl.runtime.csvschema import check_schemas
    from fldsl.runtime.data import load_dataset

    n = 80
    age = np.arange(n, dtype=float) + 18
    age[::9] = np.nan
    p = tmp_path / "guest.parquet"
    pq.write_table(pa.table({
        "id": [f"u{i}" for i in range(n)], "y": np.arange(n) % 2,
        "age": pa.array(age, mask=np.isnan(age)), "visits": np.arange(n) % 7,
        "edu": pa.array([None if i % 11 == 0 else ["BSc", "MSc", "PhD"][i % 3] for i in range(n)]),
        "odd": np.where(np.arange(n) == 5, np.inf, 1.0)}), p)
    res = CliRunner().invoke(main, ["data", "describe", str(p), "--label", "y", "--name", "patients"])
    assert res.exit_code == 0, res.output
    block = res.stdout
    assert block.startswith(f'data patients = parquet("{p}", id: id, label: y) {{')
    assert "integer age  missing: mean" in block and "integer visits\n" in block
    assert "category edu  vocabulary: top 3" in block
    assert "# not declared: odd: a value that is not finite in row 6" in block
    flp = tmp_path / "p.flp"
    flp.write_text(f"""pipeline described
use std.models.{{dense}}
party bank[1..2] {{
  node worker
  {block.strip().replace(chr(10), chr(10) + "  ").replace("vocabulary: top 3", "hash: 4 buckets")}
}}
party hub {{ node ps }}
partition horizontal over bank aggregate at hub.ps every step
model {{
  logits = dense(patients.features, units: [2])
  loss softmax_cross_entropy(logits, patients.label)
}}
train {{ epochs: 1  batch_size: 8 }}
trust {{
  allow bank -> hub.ps: gradients  allow hub.ps -> bank: weights
  allow bank -> hub.ps: stats  allow hub.ps -> bank: stats
}}
""")
    build = compile_pipeline(flp, tmp_path / "build").build_dir
    spec = load_model(Plan, build / "nodes" / "bank1.worker" / "plan.json").data[0]
    assert spec.reader == "parquet"
    check_schemas([spec])
    assert len(load_dataset(spec)) == n
