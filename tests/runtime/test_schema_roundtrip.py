"""`fldsl data describe` round trip: each party describes its own csv, the blocks are pasted into one
pipeline, which compiles without any file and trains (roles in one process over in-memory links); a file
that no longer matches its block stops its node before alignment, with every problem named, exit code 2."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
import memlink

from fldsl.api import compile_pipeline
from fldsl.cli import main
from fldsl.runtime.csvschema import SchemaMismatch

PIPELINE = """\
pipeline census
use std.models.{{mlp, dense, concat}}
party bank {{
  node n
  {bank}
}}
party shop {{
  node n
  {shop}
}}
partition vertical {{ align bank.people, shop.baskets on id using psi.ecdh }}
model {{
  at shop: a = mlp(baskets.features, units: [4])
  at bank: logits = dense(concat(mlp(people.features, units: [4]), a), units: [4, 2])
  loss softmax_cross_entropy(logits, people.label)
}}
train {{ epochs: 1  batch_size: 32  validation: 0.2  seed: 3  metrics: [loss, auc] }}
trust {{ allow shop -> bank: a  allow bank -> shop: grad(a) }}
"""


def _write_data(d: Path, rows: int = 160) -> None:
    rng = np.random.default_rng(0)
    d.mkdir()
    age, hours = rng.integers(18, 90, rows), rng.normal(40, 8, rows).round(2)
    y = (hours + rng.normal(0, 4, rows) > 40).astype(int)
    bank = ["id,income,age,hours-per-week"] + [f"u{i},{y[i]},{age[i]},{hours[i]}" for i in range(rows)]
    (d / "bank.csv").write_text("\n".join(bank) + "\n")
    spend, kids = rng.normal(100, 30, rows).round(1), rng.integers(0, 4, rows)
    shop = ["id,spend,kids,note"] + [f"u{i},{spend[i]},{kids[i]},n{i % 3}" for i in range(rows)]
    (d / "shop.csv").write_text("\n".join(shop) + "\n")


def _describe(*args: str) -> str:
    r = CliRunner().invoke(main, ["data", "describe", *args])
    assert r.exit_code == 0, r.output
    return r.stdout


def test_describe_paste_compile_without_files_and_train(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the blocks carry the paths as given: relative to the nodes' folder
    _write_data(tmp_path / "data")
    bank = _describe("data/bank.csv", "--label", "income", "--name", "people")
    shop = _describe("data/shop.csv", "--name", "baskets")
    assert bank == ('data people = csv("data/bank.csv", id: id, label: income) {\n'
                    "  rows <= 160  # 160 rows in bank.csv\n"
                    '  integer age\n  numeric "hours-per-week"\n}\n')
    # The text column is a category with a vocabulary of its values, one-hot encoded by the node.
    assert shop == ('data baskets = csv("data/shop.csv", id: id) {\n'
                    "  rows <= 160  # 160 rows in shop.csv\n"
                    "  numeric spend\n  integer kids\n  category note  vocabulary: top 3\n}\n")
    flp = tmp_path / "census.flp"
    flp.write_text(PIPELINE.format(bank=bank.strip().replace("\n", "\n  "),
                                   shop=shop.strip().replace("\n", "\n  ")))

    (tmp_path / "data").rename(tmp_path / "elsewhere")
    build = compile_pipeline(flp, tmp_path / "build").build_dir  # no party's file on this machine
    (tmp_path / "elsewhere").rename(tmp_path / "data")

    res = memlink.run_in_threads(build, tmp_path / "run")
    for node, r in res.items():
        assert not isinstance(r, BaseException), f"{node}: {r!r}"
    assert 0.0 <= res["bank.n"]["metrics"]["auc"] <= 1.0 and res["bank.n"]["history"]

    # The shop's file changes after compiling: a fraction where the block says integer, and more rows
    # than the bound. Its node refuses the file before any row is aligned, naming both problems.
    lines = (tmp_path / "data/shop.csv").read_text().splitlines()
    lines[5] = "u4,99.5,1.5,n1"
    lines += [f"x{i},1,1,n0" for i in range(3)]
    (tmp_path / "data/shop.csv").write_text("\n".join(lines) + "\n")
    res = memlink.run_in_threads(build, tmp_path / "run2", timeout=60)
    err = res["shop.n"]
    assert isinstance(err, SchemaMismatch), repr(err)
    assert err.problems == [
        "data/shop.csv:6:9: column `kids` (integer): '1.5' is not a whole number",
        "data/shop.csv:162:1: row 161 is past the declared bound `rows <= 160` (the file has 163 rows); "
        "raise the bound in the pipeline (every party compiles it again) or use fewer rows",
    ]
    from fldsl.runtime.node import _classify

    assert _classify(err)[0] == 2  # an input error, as the README's exit code table says


def test_describe_errors_rounding_and_wrapping(tmp_path: Path) -> None:
    run = CliRunner().invoke
    r = run(main, ["data", "describe", str(tmp_path / "nope.csv")])
    assert r.exit_code == 2 and "no such file" in r.stderr
    f = tmp_path / "2024 sales-q1.csv"
    cols = [f"feature_{k:02d}" for k in range(12)]
    f.write_text("key," + ",".join(cols) + "\n" + "".join(
        f"k{i}," + ",".join(str(i + k) for k in range(12)) + "\n" for i in range(569)))
    r = run(main, ["data", "describe", str(f)])
    assert r.exit_code == 2 and "no id column `id` in the header" in r.stderr and "--id COL" in r.stderr
    r = run(main, ["data", "describe", str(f), "--id", "key"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == f'data d_2024_sales_q1 = csv("{f}", id: key) {{'
    assert lines[1] == "  rows <= 570  # 569 rows in 2024 sales-q1.csv, rounded up"
    assert lines[2].startswith("  integer feature_00, ") and all(len(x) <= 100 for x in lines[2:])
    assert lines[3].startswith(" " * 10 + "feature_") and lines[-1] == "}"
    r = run(main, ["data", "describe", str(f), "--id", "key", "--exact-rows", "--name", "sales"])
    assert r.stdout.splitlines()[:2] == [f'data sales = csv("{f}", id: key) {{',
                                         "  rows <= 569  # 569 rows in 2024 sales-q1.csv"]
    r = run(main, ["data", "describe", str(f), "--id", "key", "--label", "key"])
    assert r.exit_code == 2 and "--id and --label both name `key`" in r.stderr
