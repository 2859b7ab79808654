"""Metrics and classes the checker can know (issue #12 item 4): a softmax over a number of logits that is not
the label's class count (generated 0/1 labels) and classification metrics of a regression are errors with a
caret, not a crash or silently missing metrics at run time."""

from __future__ import annotations

from pathlib import Path

import pytest

from fldsl.api import check_source
from fldsl.diagnostics import FldslError

SRC = (Path(__file__).resolve().parents[2] / "pipelines" / "horizontal_dlrm.flp").read_text()


def _errors(source: str) -> list:
    with pytest.raises(FldslError) as ei:
        check_source(source, "h.flp")
    return ei.value.errors


def _where(source: str, needle: str) -> tuple[int, int]:
    for n, line in enumerate(source.splitlines(), 1):
        if needle in line:
            return n, line.index(needle) + 1
    raise AssertionError(needle)


def test_shipped_pipeline_checks() -> None:
    assert check_source(SRC, "h.flp").train.metrics == ["loss", "auc"]


def test_softmax_wider_than_the_generated_labels_classes_is_refused() -> None:
    src = SRC.replace("top: [32, 2]", "top: [32, 4]")
    (e,) = _errors(src)
    assert e.message == ("`clicks.label` of a `criteo` data set has 2 classes (0 and 1), but the softmax is "
                         "over 4 logits (`logits` is float32[batch, 4])")
    assert (e.line, e.column) == _where(src, "softmax_cross_entropy(")
    assert e.hint is not None and "2 units" in e.hint


@pytest.mark.parametrize("metric", ["auc", "accuracy"])
def test_classification_metrics_of_a_regression_are_refused(metric: str) -> None:
    src = SRC.replace("top: [32, 2]", "top: [32, 1]").replace("softmax_cross_entropy", "mse") \
             .replace("metrics: [loss, auc]", f"metrics: [loss, {metric}]")
    (e,) = _errors(src)
    assert e.message == f"`{metric}` needs a classification loss, but the loss is mse"
    assert (e.line, e.column) == _where(src, f"{metric}]")
    ok = src.replace(f"metrics: [loss, {metric}]", "metrics: [loss]")
    assert check_source(ok, "h.flp").train.metrics == ["loss"]
