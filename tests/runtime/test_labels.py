"""Labels outside the loss's classes (issue #11): every offending row named as file:line:column, at most
MAX_LABELS_LISTED of them then a count; the rule comes from the plan's loss and logits width."""

from __future__ import annotations

from pathlib import Path

import buildkit
import numpy as np
import pytest

from fldsl.artifacts import DataSpec, LossSpec, Plan, TensorSpec, load_model, node_dir
from fldsl.runtime.data import MAX_LABELS_LISTED, DataError, LabelRule, load_dataset, read_csv
from fldsl.runtime.roles.common import label_rule, load_tables

BINARY = LabelRule(2, "a binary task: loss sigmoid_cross_entropy")


def _csv(tmp_path: Path, labels: list[str]) -> Path:
    p = tmp_path / "labels.csv"
    p.write_text("x0,id,y\n" + "".join(f"1.5,r{i},{y}\n" for i, y in enumerate(labels)))
    return p


def _read(p: Path, rule: LabelRule | None, label_dtype: str = "int64"):
    return read_csv(p, id_column="id", label_column="y", feature_columns=["x0"], label_dtype=label_dtype,
                    label_rule=rule)


def test_every_label_outside_the_classes_is_named_with_line_and_column(tmp_path: Path) -> None:
    p = _csv(tmp_path, ["0", "2", "1", "-1", " 0.5 ", "1e9", "1"])
    with pytest.raises(DataError) as e:
        _read(p, BINARY)
    assert str(e.value) == (
        f"{p}: label column `y` (column 3) must hold 0 or 1 (a binary task: loss sigmoid_cross_entropy); "
        f"4 rows are not: {p}:3:3 ('2'), {p}:5:3 ('-1'), {p}:6:3 ('0.5'), {p}:7:3 ('1e9')")
    assert e.value.file == str(p)


def test_the_list_stops_at_twenty_rows_and_counts_the_rest(tmp_path: Path) -> None:
    p = _csv(tmp_path, ["3"] * 25 + ["0", "1", "2"])
    with pytest.raises(DataError) as e:
        _read(p, LabelRule(3, "3 classes"))
    msg = str(e.value)
    assert "25 rows are not: " in msg and msg.endswith(f"{p}:21:3 ('3') and 5 more"), msg
    assert msg.count(f"{p}:") == 1 + MAX_LABELS_LISTED  # the prefix, then one per listed row
    assert f"{p}:2:3 ('3')" in msg and f"{p}:22:3" not in msg


def test_labels_within_the_classes_load_as_before(tmp_path: Path) -> None:
    p = _csv(tmp_path, ["0", "2", "1"])
    assert _read(p, LabelRule(3, "3 classes")).fields["label"].tolist() == [0, 2, 1]
    assert _read(_csv(tmp_path, ["0", "1.0"]), BINARY, "float32").fields["label"].tolist() == [0.0, 1.0]
    assert _read(_csv(tmp_path, ["7", "-3"]), None).fields["label"].tolist() == [7, -3]  # regression: no rule


def test_generated_labels_are_checked_by_row_number() -> None:
    spec = DataSpec(name="clicks", reader="criteo", params={"rows": 50, "seed": 5},
                    fields={"label": TensorSpec(shape=[None], dtype="int64")})
    assert set(load_dataset(spec, label_rule=BINARY).fields["label"].tolist()) == {0, 1}
    with pytest.raises(DataError, match=r"^data set `clicks` \(criteo\): the label must hold a whole number "
                       r"in \[0, 1\) \(one class\); \d+ rows are not: row \d+ \(1\)"):
        load_dataset(spec, label_rule=LabelRule(1, "one class"))


def test_the_rule_follows_the_loss_and_the_logits_width(tmp_path: Path) -> None:
    build = buildkit.vertical_csv_build(tmp_path, {0: "5"}, classes=4)
    plan = load_model(Plan, node_dir(build, "shop.trainer") / "plan.json")
    assert label_rule(plan) == LabelRule(4, "4 classes: loss softmax_cross_entropy over logits `logits` of "
                                            "width 4")
    with pytest.raises(DataError, match=r"conversions\.csv:2:2 \('5'\)$"):
        load_tables(plan)
    binary = plan.model_copy(update={"loss": LossSpec(op="sigmoid_cross_entropy", logits="logits",
                                                      label="conversions.label", party="shop")})
    assert label_rule(binary) == LabelRule(2, "a binary task: loss sigmoid_cross_entropy")
    mse = plan.model_copy(update={"loss": LossSpec(op="mse", logits="logits", label="conversions.label",
                                                   party="shop")})
    assert label_rule(mse) is None and load_tables(mse)["conversions"].fields["label"][0] == 5
    passive = load_model(Plan, node_dir(build, "media.trainer") / "plan.json")
    assert label_rule(passive) is None  # no loss, no labels
    assert np.asarray(load_tables(passive)["impressions"].ids).size > 0
