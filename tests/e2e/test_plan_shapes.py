"""Vertical pipeline shapes the runtime knows only from their plans (issue #13): one passive party sending
two cut tensors of different widths, a party that only sends a raw field it allows across (no model, no
gradient back), three passive parties. Each runs as one OS process per node and ends with the metrics and
the training losses of the same model trained centrally on the joined data (lock-step split learning is
exactly that computation)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import describe, launch

from fldsl.artifacts import Plan, load_model, node_dir

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PIPELINES = Path(__file__).resolve().parent / "pipelines"


def _run(name: str, tmp_path: Path, trust_dir: Path) -> tuple[dict, list[Plan], Path]:
    from fldsl.api import compile_pipeline

    build = tmp_path / "build" / name

    def make() -> Path:
        return Path(compile_pipeline(PIPELINES / f"{name}.flp", out_dir=build, params={}).build_dir)

    res = launch(make, tmp_path / "run", trust_dir)
    assert res.exit_code == 0, describe(res)
    plans = [load_model(Plan, d / "plan.json") for d in sorted((build / "nodes").iterdir())]
    return res.to_json(), plans, res.run_dir


def _matches_central(doc: dict, plans: list[Plan], active: str) -> None:
    from fldsl.stdlib.tf.central import train_central_plans

    central = train_central_plans(plans)
    fed = doc["nodes"][active]
    assert fed["metrics"]["auc"] == pytest.approx(central.metrics["auc"], abs=1e-4)
    assert fed["metrics"]["loss"] == pytest.approx(central.metrics["loss"], rel=1e-4)
    got = [h["train_loss"] for h in fed["history"]]
    want = [h["train_loss"] for h in central.history]
    assert got == pytest.approx(want, rel=1e-4)
    assert fed["steps"] == central.steps


def test_one_passive_sends_two_cuts_of_different_widths(tmp_path: Path, trust_dir: Path) -> None:
    doc, plans, _ = _run("vertical_two_cuts", tmp_path, trust_dir)
    sent = doc["nodes"]["media.trainer"]["bytes_sent"]
    back = doc["nodes"]["shop.trainer"]["bytes_sent"]
    for cut in ("wide", "deep"):
        assert sent[f"media.trainer->shop.trainer:{cut}"] > 0
        assert back[f"shop.trainer->media.trainer:grad({cut})"] > 0
    # 8 and 16 float32 columns per row: the deep cut carries twice the bytes of the wide one.
    wide, deep = sent["media.trainer->shop.trainer:wide"], sent["media.trainer->shop.trainer:deep"]
    assert 1.8 < deep / wide < 2.2
    _matches_central(doc, plans, "shop.trainer")


def test_a_raw_field_allowed_across_is_sent_and_nothing_comes_back(tmp_path: Path, trust_dir: Path) -> None:
    doc, plans, _ = _run("vertical_raw_field", tmp_path, trust_dir)
    media = next(p for p in plans if p.node == "media.trainer")
    assert media.model == [] and media.export is None
    assert not [t for t in media.tasks if t.kind in ("backward", "apply")]
    assert doc["nodes"]["media.trainer"]["bytes_sent"]["media.trainer->shop.trainer:impressions.sparse"] > 0
    back = doc["nodes"]["shop.trainer"]["bytes_sent"]
    assert not [f for f in back if f.startswith("shop.trainer->media.trainer:grad")]
    _matches_central(doc, plans, "shop.trainer")


def test_three_passive_parties(tmp_path: Path, trust_dir: Path) -> None:
    doc, plans, _ = _run("vertical_three_passives", tmp_path, trust_dir)
    steps = {n: r["steps"] for n, r in doc["nodes"].items()}
    assert len(steps) == 4 and len(set(steps.values())) == 1, steps
    for p in ("media", "social", "search"):
        assert doc["nodes"][f"{p}.trainer"]["bytes_sent"][f"{p}.trainer->shop.trainer:act_{p}"] > 0
        assert doc["nodes"]["shop.trainer"]["bytes_sent"][f"shop.trainer->{p}.trainer:grad(act_{p})"] > 0
    _matches_central(doc, plans, "shop.trainer")


def test_plan_shapes_compile_to_the_tasks_that_run(tmp_path: Path) -> None:
    """The task lists the runtime executes: the label owner sends each gradient before it applies its own
    update, and each backward names the cut every gradient is of."""
    from fldsl.api import compile_pipeline

    build = Path(compile_pipeline(PIPELINES / "vertical_two_cuts.flp", out_dir=tmp_path / "b", params={}
                                  ).build_dir)
    shop = load_model(Plan, node_dir(build, "shop.trainer") / "plan.json")
    kinds = [t.kind for t in shop.tasks]
    last_send = max(i for i, t in enumerate(shop.tasks) if t.kind == "send" and "grad(" in str(t.params))
    assert kinds.index("backward") < last_send < kinds.index("apply")
    back = next(t for t in shop.tasks if t.kind == "backward")
    assert back.params["wrt"] == {"grad(wide)": "wide", "grad(deep)": "deep"}
    media = load_model(Plan, node_dir(build, "media.trainer") / "plan.json")
    assert next(t for t in media.tasks if t.kind == "backward").params["wrt"] == back.params["wrt"]
