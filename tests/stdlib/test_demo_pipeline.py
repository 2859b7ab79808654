"""The README demo (pipelines/vertical_wide_deep.flp), compiled by the real compiler, builds with the
stdlib and its model learns centrally: the reference the federated demo is compared with."""

from __future__ import annotations

from pathlib import Path

from fldsl.runtime.data import load_dataset
from fldsl.stdlib.tf import train_central

from fldsl.artifacts import Plan, load_model

REPO = Path(__file__).resolve().parents[2]


def test_demo_plans_build_and_the_joined_model_learns(tmp_path: Path) -> None:
    from fldsl.api import compile_pipeline

    result = compile_pipeline(REPO / "pipelines" / "vertical_wide_deep.flp", tmp_path / "build", {})
    plans = {d.name: load_model(Plan, d / "plan.json") for d in (Path(result.build_dir) / "nodes").iterdir()}
    shop, media = plans["shop.trainer"], plans["media.trainer"]
    s, m = load_dataset(shop.data[0]), load_dataset(media.data[0])
    common = set(m.ids.tolist())
    s = s.select([i for i in s.ids.tolist() if i in common])
    m = m.select(s.ids)
    data = {f"{shop.data[0].name}.sparse": s.fields["sparse"],
            f"{media.data[0].name}.sparse": m.fields["sparse"]}
    mine = {c.output for c in media.model}
    ops = media.model + [c for c in shop.model if c.output not in mine]
    assert shop.loss is not None
    result = train_central(ops, shop.loss, shop.train, data, s.fields["label"], ids=s.ids)
    assert result.metrics["auc"] > 0.75, result.history
