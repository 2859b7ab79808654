"""csv(...) data sets: the header is read at compile time; patterns, ids, labels and paths are resolved."""

from __future__ import annotations

from pathlib import Path

import pytest

from fldsl.api import check
from fldsl.diagnostics import FldslError

PIPELINE = """\
pipeline csvtest
param data_dir: path = "data"
use std.models.{{dense}}
party a {{
  node n
  data t = csv("${{data_dir}}/a.csv", {args})
}}
party b {{
  node n
  data t = csv("${{data_dir}}/b.csv", id: id, label: y)
}}
party s {{ node ps }}
partition horizontal over a, b aggregate at s.ps every epoch
model {{
  out = dense(t.features, units: [4, {width}])
  loss {loss}(out, t.label)
}}
train {{ epochs: 1  batch_size: 8 }}
trust {{ allow a, b -> s: weights  allow s -> a, b: weights }}
"""


def _write(tmp_path: Path, args: str, width: int = 2, loss: str = "softmax_cross_entropy") -> Path:
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    (d / "a.csv").write_text('"id","y","x0","x1","z"\n1,0,0.1,0.2,5\n2,1,0.3,0.4,6\n')
    (d / "b.csv").write_text("id,y,x0,x1,z\n3,1,0.5,0.6,7\n")
    f = tmp_path / "p.flp"
    f.write_text(PIPELINE.format(args=args, width=width, loss=loss))
    return f


def test_columns_and_fields(tmp_path: Path) -> None:
    f = _write(tmp_path, 'id: id, label: y, columns: ["x*", "z"]')
    # b uses all columns but id/label: the same three, so both share one schema.
    p = check(f)
    ds = {(d.party, d.spec.name): d for d in p.datasets}
    a = ds[("a", "t")]
    assert a.spec.feature_columns == ["x0", "x1", "z"] and a.rows == 2
    assert a.spec.fields["features"].shape == [None, 3] and a.spec.fields["label"].dtype == "int64"
    assert a.spec.path == str((tmp_path / "data" / "a.csv").resolve())


def test_schema_mismatch_between_workers(tmp_path: Path) -> None:
    f = _write(tmp_path, 'id: id, label: y, columns: ["x*"]')
    with pytest.raises(FldslError) as ei:
        check(f)
    assert ei.value.errors[0].message.startswith("horizontal parties share one schema: `b.t` has {features: ")


def test_mse_label_is_float(tmp_path: Path) -> None:
    f = _write(tmp_path, "id: id, label: y", width=1, loss="mse")
    p = check(f)
    assert all(d.spec.fields["label"].dtype == "float32" for d in p.datasets)


def test_missing_columns_and_patterns(tmp_path: Path) -> None:
    f = _write(tmp_path, "id: ID, label: y")
    with pytest.raises(FldslError) as ei:
        check(f)
    d = ei.value.errors[0]
    assert d.message == "id column `ID` is not in the header of a.csv; did you mean `id`?"
    assert (d.line, d.column) == (6, 37)
    f = _write(tmp_path, 'label: y, columns: ["w*"]')
    with pytest.raises(FldslError) as ei:
        check(f)
    assert ei.value.errors[0].message == "column pattern `w*` matches no column of a.csv"


def test_data_dir_param_and_cwd_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = _write(tmp_path, "label: y")
    other = tmp_path / "elsewhere"
    other.mkdir()
    (tmp_path / "data").rename(other / "data")
    with pytest.raises(FldslError) as ei:
        check(f)
    assert len(ei.value.errors) == 1 and "`--set data_dir=DIR`" in ei.value.errors[0].message
    assert check(f, {"data_dir": str(other / "data")}).scenario == "horizontal"
    monkeypatch.chdir(other)  # relative to the .flp's folder first, then the current directory
    assert check(f).scenario == "horizontal"
