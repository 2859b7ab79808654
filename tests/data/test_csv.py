"""CSV reader: good files load fast; every bad row is reported as file:line with what is wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fldsl.artifacts import DataSpec, TensorSpec
from fldsl.runtime.data import DataError, load_dataset, read_csv, relocate_csv

HEADER = "id,y,x0,x1\n"


def _read(path: Path, label: str | None = "y", label_dtype: str = "int64"):
    return read_csv(path, id_column="id", label_column=label, feature_columns=["x0", "x1"],
                    label_dtype=label_dtype)


def test_good_file_loads_with_ids_features_and_labels(tmp_path: Path) -> None:
    p = tmp_path / "ok.csv"
    p.write_text(HEADER + "a,1,0.5,-1\nb,0,2,3e-1\n\n")  # a trailing blank line is not a row
    t = _read(p)
    assert t.ids.tolist() == ["a", "b"]
    np.testing.assert_allclose(t.fields["features"], [[0.5, -1.0], [2.0, 0.3]])
    assert t.fields["features"].dtype == np.float32
    assert t.fields["label"].tolist() == [1, 0] and t.fields["label"].dtype == np.int64
    assert _read(p, label_dtype="float32").fields["label"].dtype == np.float32


BAD = [  # (file body after the header, expected "line: message" fragment)
    ("a,1,0.5\n", ":2: expected 4 columns (as in the header), found 3"),
    ("a,1,0.5,1\nb,0,1,2,3\n", ":3: expected 4 columns (as in the header), found 5"),
    ("a,1,0.5,1\nb,0,abc,2\n", ":3: column `x0`: 'abc' is not a number"),
    ("a,1,0.5,1\nb,0,1,\n", ":3: column `x1`: empty value"),
    ("a,1,0.5,1\nb,0,nan,1\n", ":3: column `x0`: 'nan' is not a finite number"),
    ("a,,0.5,1\n", ":2: missing label in column `y`"),
    ("a,0.5,0.5,1\n", ":2: label `y` must be a whole number"),
    ("a,1,0.5,1\nb,0,1,1\na,1,2,2\n", ":4: duplicate id 'a' (first seen at line 2)"),
    ("a,1,0.5,1\n,0,1,1\n", ":3: missing id in column `id`"),
    ("a,1,0.5,1\n\nb,x,1,1\n", ":4: column `y`: 'x' is not a number"),  # blank lines still count
]


@pytest.mark.parametrize(("body", "message"), BAD)
def test_bad_rows_name_file_and_line(tmp_path: Path, body: str, message: str) -> None:
    p = tmp_path / "bad.csv"
    p.write_text(HEADER + body)
    with pytest.raises(DataError) as e:
        _read(p)
    assert str(e.value).startswith(str(p) + ":"), str(e.value)
    assert message in str(e.value), str(e.value)


@pytest.mark.parametrize(("content", "message"), [
    ("id,y,x0\n", ":1: missing column `x1` (the header has: id, y, x0)"),
    ("", ":1: empty file"),
    (HEADER, ":1: no data rows"),
    ("id,y,x0,x0\na,1,1,1\n", ":1: column `x0` appears twice"),
])
def test_bad_headers(tmp_path: Path, content: str, message: str) -> None:
    p = tmp_path / "h.csv"
    p.write_text(content)
    with pytest.raises(DataError, match=None) as e:
        _read(p)
    assert message in str(e.value)


def test_missing_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        _read(tmp_path / "nope.csv")
    p = tmp_path / "bin.csv"
    p.write_bytes(b"id,y\n\xff\xfe\n")
    with pytest.raises(DataError, match="not UTF-8"):
        _read(p)


def test_30k_rows_load_exactly(tmp_path: Path) -> None:
    """Values survive the fast path (the load time itself is measured in bench/micro_bench.py csv)."""
    rng = np.random.default_rng(0)
    n, k = 30_000, 23
    x = rng.standard_normal((n, k))
    lines = ["id,y," + ",".join(f"x{j}" for j in range(k))]
    lines += [f"{i},{i % 2}," + ",".join(f"{v:.6f}" for v in row) for i, row in enumerate(x)]
    p = tmp_path / "big.csv"
    p.write_text("\n".join(lines) + "\n")
    t = read_csv(p, id_column="id", label_column="y", feature_columns=[f"x{j}" for j in range(k)])
    assert len(t) == n and t.fields["features"].shape == (n, k)
    np.testing.assert_allclose(t.fields["features"], x, atol=1e-5)
    assert list(t.ids[:3]) == ["0", "1", "2"] and t.ids[-1] == str(n - 1)  # ids are strings, in file order


def test_load_dataset_returns_the_declared_fields(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text(HEADER + "a,1,1,2\nb,0,3,4\n")
    spec = DataSpec(name="d", reader="csv", path="d.csv", id_column="id", label_column="y",
                    feature_columns=["x0", "x1"],
                    fields={"features": TensorSpec(shape=[None, 2], dtype="float32"),
                            "label": TensorSpec(shape=[None], dtype="int64")})
    t = load_dataset(spec, base_dir=tmp_path)
    assert sorted(t.fields) == ["features", "label"]
    wrong = spec.model_copy(update={"fields": {"features": TensorSpec(shape=[None, 3], dtype="float32")}})
    with pytest.raises(DataError, match="field `features` has 2 columns, the plan expects 3"):
        load_dataset(wrong, base_dir=tmp_path)
    gen = DataSpec(name="g", reader="criteo", params={"rows": 10, "seed": 1},
                   fields={"dense": TensorSpec(shape=[None, 13], dtype="float32")})
    assert sorted(load_dataset(gen).fields) == ["dense"]
    bad = DataSpec(name="g", reader="criteo", params={"rows": 10, "colour": 1})
    with pytest.raises(DataError, match="unknown criteo parameter"):
        load_dataset(bad)


def test_relocate_csv_reads_each_file_by_name_from_the_enclave_mount() -> None:
    specs = [DataSpec(name="a", reader="csv", path="/host/owner/train.csv"),
             DataSpec(name="g", reader="criteo", params={"rows": 10})]
    out = relocate_csv(specs, "/fldsl/data")
    assert [s.path for s in out] == ["/fldsl/data/train.csv", None] and out[1] is specs[1]
    assert specs[0].path == "/host/owner/train.csv"  # the plan itself is not changed
    twice = [specs[0], DataSpec(name="b", reader="csv", path="/elsewhere/train.csv")]
    with pytest.raises(DataError, match=r"`a` and `b` both read a file named train\.csv"):
        relocate_csv(twice, "/fldsl/data")


@pytest.mark.shared_data
def test_fate_default_credit_guest_loads(fate_data: Path) -> None:
    t = read_csv(fate_data / "default_credit_hetero_guest.csv", id_column="id", label_column="y",
                 feature_columns=[f"x{i}" for i in range(13)])
    assert len(t) == 30_000 and int(t.fields["label"].sum()) == 6636
