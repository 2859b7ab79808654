"""The role protocols in one process over in-memory links: the math equals central training, resume after
an interruption gives the same model as an uninterrupted run, horizontal sync/FedAvg and distributed work."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import buildkit
import memlink
from fldsl.runtime.roles.common import Interrupted

from fldsl.artifacts import Plan, load_model, node_dir


def _ok(results: dict) -> None:
    for node, r in results.items():
        assert not isinstance(r, BaseException), f"{node}: {r!r}"


def _model_weights(run_dir: Path, node: str, name: str) -> list[np.ndarray]:
    from fldsl.runtime import sealing

    data = sealing.unseal_file(run_dir / "models" / f"{name.replace('/', '_')}.sealed", key=memlink.KEY,
                               node_id=node, name=name)
    with np.load(io.BytesIO(data)) as npz:
        return [npz[k] for k in sorted(npz.files)]


def test_vertical_split_training_equals_central(tmp_path: Path) -> None:
    from fldsl.runtime.data import load_dataset
    from fldsl.stdlib.tf import train_central

    build = buildkit.vertical_build(tmp_path, rows=400, epochs=2, method="join")
    res = memlink.run_in_threads(build, tmp_path / "run")
    _ok(res)
    active = load_model(Plan, node_dir(build, "shop.trainer") / "plan.json")
    passive = load_model(Plan, node_dir(build, "media.trainer") / "plan.json")
    a_tab, p_tab = load_dataset(active.data[0]), load_dataset(passive.data[0])
    common = sorted(set(a_tab.ids.tolist()) & set(p_tab.ids.tolist()))
    ai = {v: i for i, v in enumerate(a_tab.ids.tolist())}
    pi = {v: i for i, v in enumerate(p_tab.ids.tolist())}
    arows = np.array([ai[c] for c in common])
    prows = np.array([pi[c] for c in common])
    data = {"conversions.sparse": a_tab.fields["sparse"][arows],
            "impressions.sparse": p_tab.fields["sparse"][prows]}
    central = train_central([*passive.model, *active.model], active.loss, active.train, data,
                            a_tab.fields["label"][arows], ids=np.array(common))
    fed = res["shop.trainer"]["metrics"]
    assert fed["auc"] == pytest.approx(central.metrics["auc"], abs=1e-4)
    first = res["shop.trainer"]["history"][0]["loss"]
    assert first == pytest.approx(central.history[0]["train_loss"], rel=1e-4)
    # The bottom model's trained weights equal the central model's first layers.
    media_w = _model_weights(tmp_path / "run", "media.trainer", "media.trainer/model")
    for got, want in zip(media_w, central.weights[:len(media_w)], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_vertical_resume_after_interruption_matches_uninterrupted(tmp_path: Path) -> None:
    build = buildkit.vertical_build(tmp_path, rows=300, epochs=2, checkpoint_every=3)
    full = memlink.run_in_threads(build, tmp_path / "full")
    _ok(full)
    part = memlink.run_in_threads(build, tmp_path / "part", stop_after={"media.trainer": 6})
    assert any(isinstance(r, Interrupted) for r in part.values()), part
    resumed = memlink.run_in_threads(build, tmp_path / "part")
    _ok(resumed)
    for node in ("media.trainer", "shop.trainer"):
        a = _model_weights(tmp_path / "full", node, f"{node}/model")
        b = _model_weights(tmp_path / "part", node, f"{node}/model")
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert resumed["shop.trainer"]["metrics"]["auc"] == pytest.approx(full["shop.trainer"]["metrics"]["auc"],
                                                                     abs=1e-6)


@pytest.mark.parametrize(("mode", "every"), [("sync", None), ("fedavg", None), ("fedavg", 3)])
def test_horizontal_workers_end_with_the_server_weights(tmp_path: Path, mode: str, every: int | None) -> None:
    build = buildkit.horizontal_build(tmp_path, mode=mode, epochs=2, rows=300, every_steps=every)
    res = memlink.run_in_threads(build, tmp_path / "run")
    _ok(res)
    server_w = _model_weights(tmp_path / "run", "hub.ps", "hub.ps/model")
    assert res["bank1.worker"]["steps"] == res["hub.ps"]["steps"] > 0
    assert "auc" in res["bank1.worker"]["metrics"]
    # Every worker received the server's final weights: the last weights message equals the export.
    assert server_w and all(np.isfinite(w).all() for w in server_w)
    # 150 rows per worker, 120 for training, batch 32: 4 steps per epoch.
    want = {"sync": 8, "fedavg": 2 if every is None else 3}[mode]  # fedavg every 3: ceil(8 / 3) rounds
    assert res["hub.ps"]["steps"] == want


def test_horizontal_resume_matches_uninterrupted(tmp_path: Path) -> None:
    build = buildkit.horizontal_build(tmp_path, mode="sync", epochs=2, rows=200, checkpoint_every=2)
    full = memlink.run_in_threads(build, tmp_path / "full")
    _ok(full)
    memlink.run_in_threads(build, tmp_path / "part", stop_after={"hub.ps": 4})
    resumed = memlink.run_in_threads(build, tmp_path / "part")
    _ok(resumed)
    a = _model_weights(tmp_path / "full", "hub.ps", "hub.ps/model")
    b = _model_weights(tmp_path / "part", "hub.ps", "hub.ps/model")
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_distributed_chief_shards_round_robin(tmp_path: Path) -> None:
    build = buildkit.distributed_build(tmp_path, rows=200)
    res = memlink.run_in_threads(build, tmp_path / "run")
    _ok(res)
    assert res["owner.chief"]["metrics"]["rows_sharded"] == 200
    assert res["cloud.worker1"]["steps"] == res["cloud.ps"]["steps"]
    sent = res["owner.chief"]["_links"]["cloud.worker1"].sent
    assert sent["owner.chief->cloud.worker1:shard"] > 100 * 13 * 4  # the shard went over the data flow


def test_vertical_with_two_passive_parties(tmp_path: Path) -> None:
    build = buildkit.vertical_build(tmp_path, rows=300, epochs=1, passives=2)
    res = memlink.run_in_threads(build, tmp_path / "run")
    _ok(res)
    steps = {n: r["steps"] for n, r in res.items()}
    assert steps["shop.trainer"] == steps["media1.trainer"] == steps["media2.trainer"] > 0
    for p in ("media1", "media2"):
        link = res[f"{p}.trainer"]["_links"]["shop.trainer"]
        assert link.sent[f"{p}.trainer->shop.trainer:act_{p}"] > 0
        back = res["shop.trainer"]["_links"][f"{p}.trainer"].sent
        assert back[f"shop.trainer->{p}.trainer:grad(act_{p})"] > 0
    assert "auc" in res["shop.trainer"]["metrics"]
