"""Quality on the real FATE data (fixed seeds, 80/20 stratified holdout): the federated runs learn as well as
the same model trained centrally. Needs ../shared/data (skipped with the reason where absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import describe, launch

from fldsl.artifacts import Plan, load_model, node_dir

pytestmark = [pytest.mark.e2e, pytest.mark.shared_data, pytest.mark.slow]

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"


def _compile(name: str, tmp_path: Path, fate: Path, **params: str):
    def make() -> Path:
        from fldsl.api import compile_pipeline

        return compile_pipeline(PIPELINES / f"{name}.flp", out_dir=tmp_path / "build" / name,
                                params={"data_dir": str(fate), **params}).build_dir
    return make


def _central_vertical(build: Path, active: str, passive: str) -> float:
    """Holdout AUC of the same model trained in one process on the joined data (stdlib reference)."""
    from fldsl.runtime.data import load_dataset
    from fldsl.stdlib.tf import train_central

    a = load_model(Plan, node_dir(build, active) / "plan.json")
    p = load_model(Plan, node_dir(build, passive) / "plan.json")
    ta, tp = load_dataset(a.data[0]), load_dataset(p.data[0])
    common = sorted(set(map(str, ta.ids.tolist())) & set(map(str, tp.ids.tolist())))
    ia = {str(v): i for i, v in enumerate(ta.ids.tolist())}
    ip = {str(v): i for i, v in enumerate(tp.ids.tolist())}
    ra, rp = np.array([ia[c] for c in common]), np.array([ip[c] for c in common])
    data = {f"{a.data[0].name}.{f}": ta.fields[f][ra] for f in ta.fields if f != "label"}
    data.update({f"{p.data[0].name}.{f}": tp.fields[f][rp] for f in tp.fields})
    res = train_central([*p.model, *a.model], a.loss, a.train, data, ta.fields["label"][ra],
                        ids=np.array(common))
    return res.metrics["auc"]


def test_vertical_default_credit_matches_central(tmp_path: Path, trust_dir: Path, fate_data: Path) -> None:
    make = _compile("fate_credit_vertical", tmp_path, fate_data)
    res = launch(make, tmp_path / "run", trust_dir)
    assert res.exit_code == 0, describe(res)
    auc = res.to_json()["nodes"]["guest.trainer"]["metrics"]["auc"]
    assert auc >= 0.75
    central = _central_vertical(tmp_path / "build" / "fate_credit_vertical", "guest.trainer", "host.trainer")
    print(f"default_credit vertical: federated AUC {auc:.4f}, central {central:.4f}")
    assert abs(auc - central) <= 0.005, (auc, central)


def test_vertical_breast(tmp_path: Path, trust_dir: Path, fate_data: Path) -> None:
    res = launch(_compile("fate_breast_vertical", tmp_path, fate_data), tmp_path / "run", trust_dir)
    assert res.exit_code == 0, describe(res)
    auc = res.to_json()["nodes"]["guest.trainer"]["metrics"]["auc"]
    print(f"breast vertical: holdout AUC {auc:.4f}")
    assert auc >= 0.98


@pytest.mark.parametrize(("name", "floor"),
                         [("fate_breast_horizontal", 0.98), ("fate_credit_horizontal", 0.77)])
def test_horizontal_fedavg(tmp_path: Path, trust_dir: Path, fate_data: Path, name: str, floor: float) -> None:
    res = launch(_compile(name, tmp_path, fate_data), tmp_path / "run", trust_dir)
    assert res.exit_code == 0, describe(res)
    doc = res.to_json()
    tested = [n for n in doc["nodes"].values() if "auc" in (n["metrics"] or {})]
    assert tested, "a worker holding the test set reports its AUC"
    best = max(n["metrics"]["auc"] for n in tested)
    print(f"{name}: test AUC {best:.4f}")
    assert best >= floor
