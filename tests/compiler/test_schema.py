"""Schema blocks on csv data sets: the pipeline compiles without the file, to the same bytes on every
machine; mistakes in the block get the usual diagnostics (line, column, caret, suggestion)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fldsl.api import check, check_source, compile_pipeline
from fldsl.diagnostics import FldslError, render

# A vertical pipeline whose two parties both declare their files: nothing to read at compile time.
PIPELINE = """\
pipeline census
param data_dir: path = "data"
use std.models.{mlp, dense, concat}
party bank {
  node n
  data people = csv("${data_dir}/bank.csv", id: id, label: income) {
    rows <= 500
    numeric age, "hours-per-week", "capital-gain"
    integer children
  }
}
party shop {
  node n
  data baskets = csv("${data_dir}/shop.csv", id: id, columns: ["s*"]) {
    rows <= 400 + 100
    integer spend, other, size
  }
}
partition vertical { align bank.people, shop.baskets on id using psi.ecdh }
model {
  at shop: a = mlp(baskets.features, units: [4])
  at bank: logits = dense(concat(mlp(people.features, units: [4]), a), units: [4, 2])
  loss softmax_cross_entropy(logits, people.label)
}
train { epochs: 1  batch_size: 8  validation: 0.2 }
trust { allow shop -> bank: a  allow bank -> shop: grad(a) }
"""


def _tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _errors(src: str) -> list[tuple[int | None, int | None, str, str | None]]:
    with pytest.raises(FldslError) as ei:
        check_source(src, "census.flp")
    return [(d.line, d.column, d.message, d.hint) for d in ei.value.errors]


def _mutate(old: str, new: str) -> str:
    assert PIPELINE.count(old) == 1, old
    return PIPELINE.replace(old, new)


def test_declared_columns_become_the_plan_without_the_file(tmp_path: Path) -> None:
    flp = tmp_path / "census.flp"
    flp.write_text(PIPELINE)
    p = check(flp)  # no data folder at all
    ds = {d.spec.name: d for d in p.datasets}
    people, baskets = ds["people"], ds["baskets"]
    assert people.spec.path == "data/bank.csv"  # as declared (after ${data_dir}), not resolved
    assert people.spec.feature_columns == ["age", "hours-per-week", "capital-gain", "children"]
    assert [(c.name, c.type) for c in people.spec.columns or []] == [
        ("age", "numeric"), ("hours-per-week", "numeric"), ("capital-gain", "numeric"),
        ("children", "integer"),
    ]
    assert people.rows == people.spec.max_rows == 500
    assert people.spec.fields["features"].shape == [None, 4] and people.spec.fields["label"].dtype == "int64"
    # `columns:` patterns select among the declared names, as they select among a header's.
    assert baskets.spec.feature_columns == ["spend", "size"] and baskets.rows == 500
    assert [c.name for c in baskets.spec.columns or []] == ["spend", "other", "size"]
    # The bound sizes the holdout ids message as the counted rows did: 8 bytes an id.
    holdout = next(f for f in p.flows if f.tensor == "holdout")
    assert holdout.max_bytes == -(-(8 * 500 + 4096) // 1024) * 1024


def test_same_bytes_with_the_file_present_absent_or_unreadable(tmp_path: Path) -> None:
    """What each party sees on its own machine: its own file, nobody's, or something else at the path."""
    data = tmp_path / "data"
    builds = {}
    for case in ("absent", "present", "garbage"):
        where = tmp_path / case
        where.mkdir()
        flp = where / "census.flp"  # the same file name: positions in artifacts name the file only
        flp.write_text(PIPELINE)
        if case != "absent":
            data.mkdir(exist_ok=True)
            (data / "bank.csv").write_text("id,income,age,hours-per-week,capital-gain,children\n"
                                           "1,0,3,4,5,6\n")
            shop = b"\xff\xfe not a csv" if case == "garbage" else b"id,spend\n1,2\n"
            (data / "shop.csv").write_bytes(shop)
        builds[case] = compile_pipeline(flp, tmp_path / f"build-{case}", {"data_dir": str(data)})
        shutil.rmtree(data, ignore_errors=True)
    ref = builds["absent"]
    for case in ("present", "garbage"):
        assert builds[case].digest == ref.digest, case
        assert _tree(builds[case].build_dir) == _tree(ref.build_dir), case
    plan = (ref.build_dir / "nodes/bank.n/plan.json").read_text()
    assert f'"path": "{data}/bank.csv"' in plan and '"max_rows": 500' in plan


def test_undeclared_data_sets_keep_their_plan_bytes(tmp_path: Path) -> None:
    """No block: the header is read and the plan has no schema keys (measurements do not move)."""
    d = tmp_path / "data"
    d.mkdir()
    (d / "bank.csv").write_text("id,income,age\n1,0,3\n")
    flp = tmp_path / "p.flp"
    flp.write_text(_mutate(
        """{
    rows <= 500
    numeric age, "hours-per-week", "capital-gain"
    integer children
  }""", ""))
    p = check(flp)
    people = next(ds for ds in p.datasets if ds.spec.name == "people")
    assert people.spec.columns is None and people.rows == 1
    assert people.spec.path == str((d / "bank.csv").resolve())
    dumped = people.spec.model_dump(mode="json")
    assert "columns" not in dumped and "max_rows" not in dumped


CASES = [
    # (id, old, new, [(line, column, message, hint)])
    ("duplicate-column", "integer children", "integer children, age",
     [(9, 23, "column `age` is declared twice", "first declared at line 8, column 13; remove one")]),
    ("label-as-feature", "integer children", "integer children, income",
     [(9, 23, "`income` is the label column (`label: income`); a label cannot be a feature column",
       "remove it from the block: the model would be given the answer it should predict")]),
    ("id-as-feature", "integer spend, other", 'integer "id", spend, other',
     [(16, 13, "`id` is the id column (`id: id`); it cannot also be a feature column",
       "remove it from the block: ids align rows, they are never fed to the model")]),
    ("unknown-type", "integer children", "integr children",
     [(9, 5, "unknown column type `integr`; did you mean `integer`?", None)]),
    ("category-without-width", "integer children", "category children",
     [(9, 5, "a `category` line needs `vocabulary: top K` or `hash: N buckets`: the number of feature "
       "columns it becomes is declared, so every party compiles the same model",
       "e.g. `category children vocabulary: top 100`")]),
    ("numeric-missing-without-fill", "integer children", 'integer children missing: "?"',
     [(9, 22, "`missing:` on a numeric or integer line needs a fill: `mean`, `median` or `constant N`",
       'e.g. `missing: "?" mean` or `missing: constant 0 indicator`')]),
    ("category-fill", "integer children", "category children missing: mean vocabulary: top 3",
     [(9, 32, "`mean` fills numbers; a `category` column has no such fill: a missing value is a category "
       "of its own (the empty value)", 'declare only the token, e.g. `missing: "?"`')]),
    ("category-indicator", "integer children", 'category children missing: "?" indicator hash: 8 buckets',
     [(9, 36, "`indicator` is for numeric and integer columns: a missing category value is already a "
       "category of its own (the empty value)", "remove `indicator`")]),
    ("scale-category", "integer children", "category children scale: standard vocabulary: top 3",
     [(9, 23, "`scale:` is for numeric and integer columns; a category becomes one-hot columns of 0 and 1",
       "remove `scale:` from this line")]),
    ("vocabulary-numeric", "integer children", "integer children vocabulary: top 3",
     [(9, 22, "`vocabulary:` is for `category` columns, not `integer` ones",
       "declare the columns as `category` to one-hot their values")]),
    ("both-widths", "integer children", "category children vocabulary: top 3 hash: 8 buckets",
     [(9, 5, "a category line takes `vocabulary:` or `hash:`, not both",
       "keep one: the feature columns are either the vocabulary's or the buckets'")]),
    ("option-twice", "integer children", "integer children scale: standard scale: minmax",
     [(9, 38, "`scale:` is given twice on one line", "first given at line 9, column 22; keep one")]),
    ("clip-order", "integer children", "integer children scale: clip(5, 1)",
     [(9, 22, "`clip(lo, hi)` needs lo < hi, got clip(5, 1)", None)]),
    ("zero-vocabulary", "integer children", "category children vocabulary: top 0",
     [(9, 39, "the vocabulary size must be between 1 and 100,000, got 0", None)]),
    ("fractional-integer-fill", "integer children", "integer children missing: constant 0.5",
     [(9, 40, "the fill constant of an integer column must be a whole number, got 0.5", None)]),
    ("empty-token", "integer children", 'integer children missing: "" mean',
     [(9, 31, 'missing-value token "" is empty or starts or ends with a space',
       "cells are compared without surrounding spaces, and an empty cell is always missing")]),
    ("no-bound", "    rows <= 500\n", "",
     [(6, 68, "the schema block needs `rows <= N`: the most rows the file may hold (it sizes the messages "
       "that carry ids or rows)", "add `rows <= N` (`fldsl data describe FILE` prints the block)")]),
    ("two-bounds", "    rows <= 500\n", "    rows <= 500\n    rows <= 600\n",
     [(8, 5, "`rows <=` is given twice in one schema block", "keep one bound")]),
    ("zero-bound", "rows <= 500", "rows <= 0", [(7, 13, "the row bound must be positive, got 0", None)]),
    ("float-bound", "rows <= 500", "rows <= 5.5",
     [(7, 13, "the row bound must be an integer, got a number", None)]),
    ("unknown-param-in-bound", "rows <= 500", "rows <= max_rows",
     [(7, 13, "the row bound must be an integer, got `max_rows`", None)]),
    ("pattern-matches-nothing", 'columns: ["s*"]', 'columns: ["w*"]',
     [(14, 54, "column pattern `w*` matches no column declared in the schema block of `baskets`",
       "declared: spend, other, size")]),
    ("empty-name", "integer children", 'integer ""', [(9, 13, "a column name cannot be empty", None)]),
    ("no-columns", "    integer spend, other, size\n", "",
     [(14, 71, "the schema block of `baskets` declares no column",
       "add a line such as `numeric x1, x2` (`fldsl data describe FILE` prints the block)")]),
]


@pytest.mark.parametrize(("old", "new", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_schema_block_diagnostics(old: str, new: str,
                                  expected: list[tuple[int, int, str, str | None]]) -> None:
    assert _errors(_mutate(old, new)) == expected


def test_every_block_error_is_reported_in_one_pass_with_a_caret() -> None:
    src = _mutate("integer spend, other", 'integer "id", spend, other').replace(
        "integer children", "integr children, income")
    with pytest.raises(FldslError) as ei:
        check_source(src, "census.flp")
    assert [(e.line, e.column, e.message) for e in ei.value.errors] == [
        (9, 5, "unknown column type `integr`; did you mean `integer`?"),
        (16, 13, "`id` is the id column (`id: id`); it cannot also be a feature column"),
    ]
    text = render(ei.value.errors, {"census.flp": src})
    assert "census.flp:9:5: error: unknown column type `integr`; did you mean `integer`?" in text
    assert "9 |     integr children, income\n" in text and "|     ^~~~~~\n" in text
    assert "census.flp:16:13: error: `id` is the id column" in text and "|             ^~~~\n" in text


def test_a_schema_block_on_a_generator_is_refused() -> None:
    from ._base import BASE

    src = BASE.replace('side: "follower", features: 8)', 'side: "follower", features: 8) { rows <= 5 }')
    with pytest.raises(FldslError) as ei:
        check_source(src, "demo.flp")
    (d,) = ei.value.errors
    assert (d.line, d.column, d.message, d.hint) == (
        9, 86, "a schema block describes a csv or Parquet file; `wide_n_deep(...)` generates its own columns",
        "remove the block")


@pytest.mark.parametrize(("old", "new", "line", "column", "message"), [
    ("rows <= 500", "rows = 500", 7, 10, "unexpected `=`; expected `<=`"),
    ("integer children", "integer", 10, 3, "unexpected `}`; expected a column name or a string"),
    ("integer children", "integer children,", 10, 3, "unexpected `}`; expected a name or a string"),
])
def test_schema_block_syntax_errors(old: str, new: str, line: int, column: int, message: str) -> None:
    assert _errors(_mutate(old, new)) == [(line, column, message, None)]


@pytest.mark.parametrize(("new", "line", "column", "message", "hint"), [
    ("integer children missing: meen", 9, 31,
     "unexpected `meen`; expected a string, `constant`, `indicator`, `mean` or `median`",
     "did you mean `mean`?"),
    ("integer children scale: standrd", 9, 29,
     "unexpected `standrd`; expected `clip`, `minmax` or `standard`", "did you mean `standard`?"),
    ("integer children missng: mean", 9, 22,
     "unknown column option `missng:`; the options are `missing:`, `scale:`, `vocabulary:`, `hash:`",
     "did you mean `missing:`?"),
    ("category children vocabulary: 100", 9, 35, "unexpected number `100`; expected `top`",
     "write `vocabulary: top K` (the K most frequent values get a column each)"),
    ("category children hash: 100\n  ", 11, 3, "unexpected `}`; expected `buckets`",
     "write `hash: N buckets`"),
    ("integer children scale: clip(0)", 9, 35, "unexpected `)`; expected `,`", "write `clip(lo, hi)`"),
])
def test_column_option_syntax_errors(new: str, line: int, column: int, message: str, hint: str) -> None:
    assert _errors(_mutate("integer children", new)) == [(line, column, message, hint)]


def test_column_options_become_the_plan_and_size_the_features() -> None:
    src = _mutate("numeric age, \"hours-per-week\", \"capital-gain\"\n    integer children",
                  'numeric age, "hours-per-week" missing: "?" median indicator scale: standard\n'
                  '    integer children missing: constant -1 scale: clip(0, 10)\n'
                  '    category education, "native-country" missing: "?" vocabulary: top 20\n'
                  '    category zip hash: 64 buckets\n'
                  '    numeric scale, mean scale: minmax')
    people = next(d for d in check_source(src, "census.flp").datasets if d.spec.name == "people")
    cols = {c.name: c for c in people.spec.columns or []}
    assert people.spec.feature_columns == ["age", "hours-per-week", "children", "education", "native-country",
                                           "zip", "scale", "mean"]
    # 2 x (value + indicator) + 1 + 2 x (20 + other) + 64 + 2
    assert people.spec.fields["features"].shape == [None, 4 + 1 + 42 + 64 + 2]
    assert cols["age"].model_dump(mode="json") == {
        "name": "age", "type": "numeric", "missing": {"token": "?", "fill": "median", "value": None,
                                                      "indicator": True},
        "scale": {"kind": "standard", "lo": None, "hi": None}}  # unset options are not written
    assert cols["children"].missing is not None and cols["children"].missing.value == -1.0
    clip = cols["children"].scale
    assert clip is not None and (clip.kind, clip.lo, clip.hi) == ("clip", 0, 10)
    assert cols["education"].vocabulary == 20 and cols["zip"].hash_buckets == 64
    # A plain column serialises exactly as before preprocessing existed (plans keep their bytes).
    assert cols["mean"].model_dump(mode="json")["scale"] == {"kind": "minmax", "hi": None, "lo": None}
    from fldsl.artifacts import ColumnSpec, dump_json

    assert '"missing"' not in dump_json(ColumnSpec(name="x", type="numeric"))


def test_vocabulary_is_refused_in_a_horizontal_pipeline() -> None:
    src = """\
pipeline h
use std.models.{mlp, dense}
party bank[1..2] {
  node worker
  data people = csv("people.csv", id: id, label: y) {
    rows <= 100
    numeric age missing: mean scale: standard
    category job vocabulary: top 10
    category town hash: 16 buckets
  }
}
party hub { node ps }
partition horizontal over bank aggregate at hub.ps every step
model {
  logits = dense(mlp(people.features, units: [4]), units: [4, 2])
  loss softmax_cross_entropy(logits, people.label)
}
train { epochs: 1  batch_size: 8 }
trust {
  allow bank -> hub.ps: gradients  allow hub.ps -> bank: weights
  allow bank -> hub.ps: stats  allow hub.ps -> bank: stats
}
"""
    with pytest.raises(FldslError) as ei:
        check_source(src, "h.flp")
    assert [(d.line, d.column, d.message, d.hint) for d in ei.value.errors] == [
        (8, 18, "`vocabulary:` is not available in a horizontal pipeline: each worker would choose its own "
         "most frequent values, so a one-hot column would mean a different value at each worker under one "
         "shared model", "use `hash: N buckets` (the same buckets at every worker, nothing to fit)")]
    ok = check_source(src.replace("vocabulary: top 10", "hash: 10 buckets"), "h.flp")
    people = next(d for d in ok.datasets if d.spec.name == "people")
    assert people.spec.fields["features"].shape == [None, 1 + 10 + 16]


def test_keywords_and_odd_names_are_column_names() -> None:
    """`rows`, `data`, `true` are names where a column is expected; strings carry any header cell."""
    src = _mutate('numeric age, "hours-per-week", "capital-gain"',
                  'numeric rows, data, true, "a,b", "caf\\u00e9 \\"x\\""')
    people = next(d for d in check_source(src, "census.flp").datasets if d.spec.name == "people")
    assert people.spec.feature_columns == ["rows", "data", "true", "a,b", 'café "x"', "children"]


def test_a_party_family_reports_its_block_once() -> None:
    src = PIPELINE.replace("party shop {", "party shop[1..3] {").replace(
        "integer spend, other, size", "integer spend, spend").replace("align bank.people, shop.baskets",
                                                                       "align bank.people, shop1.baskets")
    errors = _errors(src)
    assert [e for e in errors if "declared twice" in e[2]] == [
        (16, 20, "column `spend` is declared twice", "first declared at line 16, column 13; remove one")]


BUCKETS = """\
pipeline b
use std.models.{mlp, dense}
party bank[1..2] {
  node worker
  data people = csv("people.csv", id: id, label: y) {
    rows <= 100
    integer age  missing: mean indicator  bucketize: [18, 30, 50]
    category town hash: 16 buckets
  }
}
party hub { node ps }
partition horizontal over bank aggregate at hub.ps every step
model {
  logits = dense(mlp(people.features, units: [4]), units: [4, 2])
  loss softmax_cross_entropy(logits, people.label)
}
train { epochs: 1  batch_size: 8 }
trust {
  allow bank -> hub.ps: gradients  allow hub.ps -> bank: weights
  allow bank -> hub.ps: stats  allow hub.ps -> bank: stats
}
"""


def test_bucketize_is_a_one_hot_of_declared_boundaries() -> None:
    ok = check_source(BUCKETS, "b.flp")
    people = next(d for d in ok.datasets if d.spec.name == "people")
    age = next(c for c in people.spec.columns or [] if c.name == "age")
    assert age.buckets == [18.0, 30.0, 50.0] and age.width == 4 + 1
    assert people.spec.fields["features"].shape == [None, 5 + 16]


@pytest.mark.parametrize(("option", "message"), [
    ("bucketize: [30, 18]", "the bucket boundaries must be finite and strictly increasing, got [30, 18]"),
    ("bucketize: []", "`bucketize:` needs between 1 and"),
    ("bucketize: [18]  scale: standard", "a line takes `bucketize:` or `scale:`, not both"),
])
def test_bucketize_errors(option: str, message: str) -> None:
    with pytest.raises(FldslError) as ei:
        check_source(BUCKETS.replace("bucketize: [18, 30, 50]", option), "b.flp")
    assert any(message in d.message and d.line == 7 for d in ei.value.errors), ei.value.errors


def test_bucketize_is_for_numbers() -> None:
    with pytest.raises(FldslError) as ei:
        check_source(BUCKETS.replace("hash: 16 buckets", "hash: 16 buckets  bucketize: [1]"), "b.flp")
    assert [d.message for d in ei.value.errors] == [
        "`bucketize:` is for numeric and integer columns; a category is already one-hot"]
