"""Compiled example pipelines build with the stdlib and their joined models learn centrally: the
references federated runs are compared with (``train_central_plans``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fldsl.artifacts import Plan, load_model
from fldsl.stdlib.tf.central import train_central_plans

REPO = Path(__file__).resolve().parents[2]


def _plans(name: str, out: Path, params: dict[str, str] | None = None) -> list[Plan]:
    from fldsl.api import compile_pipeline

    result = compile_pipeline(REPO / "pipelines" / f"{name}.flp", out, params or {})
    return [load_model(Plan, d / "plan.json") for d in sorted((Path(result.build_dir) / "nodes").iterdir())]


def test_vertical_demo_joined_model_learns(tmp_path: Path) -> None:
    result = train_central_plans(_plans("vertical_wide_deep", tmp_path))
    assert result.metrics["auc"] > 0.75, result.history


def test_horizontal_reference_trains_on_every_workers_rows(tmp_path: Path) -> None:
    plans = _plans("horizontal_dlrm", tmp_path)
    result = train_central_plans(plans, keep_segment=True)
    workers = [p for p in plans if p.loss is not None]
    assert len(workers) == 4
    # 4 x 10000 rows, 10 % held out, batch 128: the steps prove all workers' rows were joined.
    assert result.steps == -(-36000 // 128)
    assert set(result.metrics) == {"loss", "auc"}


# Floors: the central scikit-learn MLP reference of the data README (default_credit 0.758, 80/20 holdout)
# rounded down, and breast's near-separability. The pipelines' own federated targets (0.75 / 0.77 / 0.98)
# are the runtime's tests; these check that the stdlib trains real data as well as a standard MLP.
@pytest.mark.shared_data
@pytest.mark.parametrize(("name", "floor"), [("fate_credit_vertical", 0.75), ("fate_breast_vertical", 0.98),
                                              ("fate_breast_horizontal", 0.98),
                                              ("fate_credit_horizontal", 0.75)])
def test_fate_central_references_reach_the_quality_floors(tmp_path: Path, fate_data: Path, name: str,
                                                          floor: float) -> None:
    result = train_central_plans(_plans(name, tmp_path, {"data_dir": str(fate_data)}))
    assert result.metrics["auc"] >= floor, result.history
