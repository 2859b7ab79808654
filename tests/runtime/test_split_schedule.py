"""The vertical step comes from the plan: what split_schedule reads from a compiled plan, what it refuses,
and the raw-field shape (a node that only sends) resuming exactly and staying within one checkpoint of the
label owner."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import memlink

from fldsl.artifacts import Plan, Policy, load_model, node_dir
from fldsl.runtime.roles.common import Interrupted, RoleError
from fldsl.runtime.roles.split_schedule import split_schedule

PIPELINES = Path(__file__).resolve().parents[1] / "e2e" / "pipelines"


def _compile(tmp_path: Path, name: str, edit: str = "") -> Path:
    from fldsl.api import compile_pipeline

    source = (PIPELINES / f"{name}.flp").read_text()
    if edit:
        assert "  validation: 0.2\n" in source
        source = source.replace("  validation: 0.2\n", f"  validation: 0.2\n{edit}")
    flp = tmp_path / f"{name}.flp"
    flp.write_text(source)
    return Path(compile_pipeline(flp, tmp_path / "build", {}).build_dir)


def _load(build: Path, node: str) -> tuple[Plan, Policy]:
    d = node_dir(build, node)
    return load_model(Plan, d / "plan.json"), load_model(Policy, d / "policy.json")


def test_schedule_of_two_cuts_follows_the_task_list(tmp_path: Path) -> None:
    build = _compile(tmp_path, "vertical_two_cuts")
    shop = split_schedule(*_load(build, "shop.trainer"))
    assert sorted(w.tensor for w in shop.cuts_in) == ["deep", "wide"]
    assert {w.tensor for w in shop.grads_out} == {"grad(wide)", "grad(deep)"}
    assert shop.wrt == {"grad(wide)": "wide", "grad(deep)": "deep"}
    kinds = [t.kind for t in shop.step]
    assert kinds[0] == "recv" and kinds[-1] == "apply" and shop.lead == 0
    media = split_schedule(*_load(build, "media.trainer"))
    assert {w.tensor for w in media.cuts_out} == {"wide", "deep"}
    assert media.lead == [t.kind for t in media.step].index("recv") > 0  # forward and sends come first
    assert media.trains


def test_schedule_of_a_raw_field_sender_has_no_backward(tmp_path: Path) -> None:
    build = _compile(tmp_path, "vertical_raw_field")
    media = split_schedule(*_load(build, "media.trainer"))
    assert [t.kind for t in media.step] == ["send"] and not media.trains
    assert media.cuts_out[0].flow.kind == "data" and media.cuts_out[0].tensor == "impressions.sparse"
    shop = split_schedule(*_load(build, "shop.trainer"))
    assert shop.grads_out == () and shop.wrt == {}


def test_a_task_on_a_flow_the_policy_does_not_allow_is_refused(tmp_path: Path) -> None:
    build = _compile(tmp_path, "vertical_two_cuts")
    plan, policy = _load(build, "media.trainer")
    narrowed = policy.model_copy(update={"flows": [f for f in policy.flows if f.tensor != "deep"]})
    with pytest.raises(RoleError, match="does not list or the policy does not allow"):
        split_schedule(plan, narrowed)


def test_a_gradient_the_backward_does_not_name_is_refused(tmp_path: Path) -> None:
    build = _compile(tmp_path, "vertical_two_cuts")
    plan, policy = _load(build, "shop.trainer")
    tasks = [t.model_copy(update={"params": {"wrt": {"grad(wide)": "wide"}}}) if t.kind == "backward" else t
             for t in plan.tasks]
    with pytest.raises(RoleError, match="grad\\(deep\\)"):
        split_schedule(plan.model_copy(update={"tasks": tasks}), policy)


def test_a_cut_sent_before_its_forward_is_refused(tmp_path: Path) -> None:
    build = _compile(tmp_path, "vertical_two_cuts")
    plan, policy = _load(build, "media.trainer")
    sends = [t for t in plan.tasks if t.kind == "send" and "deep" in t.id]
    reordered = [*sends, *(t for t in plan.tasks if t not in sends)]
    with pytest.raises(RoleError, match="before the forward"):
        split_schedule(plan.model_copy(update={"tasks": reordered}), policy)


def test_a_cut_and_a_raw_field_from_one_party_match_central_training(tmp_path: Path) -> None:
    """media sends act1 (its gradient comes back) and the raw impressions.sparse (nothing comes back); in
    lock-step that is the central model's computation, weights of both parties included."""
    from fldsl.stdlib.tf.central import train_central_plans

    build = _compile(tmp_path, "vertical_act_and_raw")
    media = split_schedule(*_load(build, "media.trainer"))
    assert {w.flow.kind for w in media.cuts_out} == {"activation", "data"}
    assert media.wrt == {"grad(act1)": "act1"}
    res = memlink.run_in_threads(build, tmp_path / "run")
    assert not [r for r in res.values() if isinstance(r, BaseException)], res
    plans = [_load(build, n)[0] for n in ("media.trainer", "shop.trainer")]
    central = train_central_plans(plans)
    assert res["shop.trainer"]["metrics"]["auc"] == pytest.approx(central.metrics["auc"], abs=1e-4)
    got = [h["train_loss"] for h in res["shop.trainer"]["history"]]
    assert got == pytest.approx([h["train_loss"] for h in central.history], rel=1e-4)
    media_w = _weights(tmp_path / "run", "media.trainer")
    for a, b in zip(media_w, central.weights[:len(media_w)], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _weights(run_dir: Path, node: str) -> list[np.ndarray]:
    from fldsl.runtime import sealing

    name = f"{node}/model"
    data = sealing.unseal_file(run_dir / "models" / f"{node}_model.sealed", key=memlink.KEY, node_id=node,
                               name=name)
    with np.load(io.BytesIO(data)) as npz:
        return [npz[k] for k in sorted(npz.files)]


def test_raw_field_sender_stays_within_a_checkpoint_and_resumes_exactly(tmp_path: Path) -> None:
    # ~420 training rows, batch 64: 7 steps an epoch, checkpoints after steps 3, 6, 7, 10, 13, 14.
    build = _compile(tmp_path, "vertical_raw_field", "  checkpoint: every 3 steps\n")
    trace: list[tuple[str, str, str, int]] = []
    full = memlink.run_in_threads(build, tmp_path / "full", trace=trace)
    assert not [r for r in full.values() if isinstance(r, BaseException)], full
    pos = {event: k for k, event in enumerate(trace)}
    raw = "media.trainer->shop.trainer:impressions.sparse"
    # The sender waits for the label owner to land checkpoint 3 before it sends step 5 (the step before
    # checkpoint 6): by then the label owner has received step 2.
    assert pos[("shop.trainer", "recv", raw, 2)] < pos[("media.trainer", "send", raw, 5)]

    part = memlink.run_in_threads(build, tmp_path / "part", stop_after={"shop.trainer": 8})
    assert any(isinstance(r, Interrupted) for r in part.values()), part
    resumed = memlink.run_in_threads(build, tmp_path / "part")
    assert not [r for r in resumed.values() if isinstance(r, BaseException)], resumed
    full_w, part_w = _weights(tmp_path / "full", "shop.trainer"), _weights(tmp_path / "part", "shop.trainer")
    for a, b in zip(full_w, part_w, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert resumed["shop.trainer"]["metrics"]["auc"] == pytest.approx(full["shop.trainer"]["metrics"]["auc"],
                                                                     abs=1e-6)
