"""The three scenarios end to end: one OS process per node, sim attestation, RA-TLS, pinned mutual TLS."""

from __future__ import annotations

import io
import json
from pathlib import Path

import buildkit
import numpy as np
import pytest
from conftest import describe, launch

pytestmark = pytest.mark.e2e


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _unseal_model(trust_dir: Path, path: Path, node: str, name: str) -> list[np.ndarray]:
    from fldsl.runtime import sealing
    from fldsl.runtime.attestation.sim import SimDeployment

    key = SimDeployment.load(trust_dir / node.split(".")[0]).sealing_key  # the sealing node's party's key
    data = sealing.unseal_file(path, key=key, node_id=node, name=name)
    with np.load(io.BytesIO(data)) as npz:
        return [npz[k] for k in sorted(npz.files)]


def test_vertical_two_processes_learn_and_export_sealed_models(tmp_path: Path, trust_dir: Path) -> None:
    res = launch(lambda: buildkit.vertical_build(tmp_path, rows=600, epochs=2), tmp_path / "run", trust_dir)
    assert res.exit_code == 0, describe(res)
    doc = res.to_json()
    shop = doc["nodes"]["shop.trainer"]
    assert shop["metrics"]["auc"] > 0.5
    assert shop["steps"] == doc["nodes"]["media.trainer"]["steps"] > 0
    # Activations and gradients crossed on their flows; PSI ran on the psi flows.
    sent = doc["nodes"]["media.trainer"]["bytes_sent"]
    assert sent["media.trainer->shop.trainer:act1"] > 0 and sent["media.trainer->shop.trainer:psi"] > 0
    assert shop["bytes_sent"]["shop.trainer->media.trainer:grad(act1)"] > 0
    kinds = {e["event"] for e in _events(res.run_dir)}
    assert {"started", "phase", "plan", "step", "epoch", "checkpoint", "export", "done"} <= kinds
    for node in ("media.trainer", "shop.trainer"):
        model = Path(doc["nodes"][node]["exports"][f"{node}/model"])
        assert model.is_file() and model.is_relative_to(res.run_dir)
        assert model.read_bytes().startswith(b"FLDSLSL1")  # sealed envelope, not an npz
        weights = _unseal_model(trust_dir, model, node, f"{node}/model")
        assert weights and all(np.isfinite(w).all() for w in weights)
        assert (res.run_dir / "logs" / f"{node}.log").is_file()


@pytest.mark.parametrize("mode", ["sync", "fedavg"])
def test_horizontal_server_and_workers(tmp_path: Path, trust_dir: Path, mode: str) -> None:
    res = launch(lambda: buildkit.horizontal_build(tmp_path, mode=mode, rows=300), tmp_path / "run",
                 trust_dir)
    assert res.exit_code == 0, describe(res)
    doc = res.to_json()
    assert set(doc["nodes"]) == {"bank1.worker", "bank2.worker", "hub.ps"}
    up = "gradients" if mode == "sync" else "weights"
    assert doc["nodes"]["bank1.worker"]["bytes_sent"][f"bank1.worker->hub.ps:{up}"] > 0
    assert doc["nodes"]["hub.ps"]["bytes_sent"]["hub.ps->bank2.worker:weights"] > 0
    assert "auc" in doc["nodes"]["bank2.worker"]["metrics"]
    assert "hub.ps/model" in doc["nodes"]["hub.ps"]["exports"]


def test_distributed_chief_streams_shards(tmp_path: Path, trust_dir: Path) -> None:
    res = launch(lambda: buildkit.distributed_build(tmp_path, rows=400), tmp_path / "run", trust_dir)
    assert res.exit_code == 0, describe(res)
    doc = res.to_json()
    assert doc["nodes"]["owner.chief"]["metrics"]["rows_sharded"] == 400
    for w in ("cloud.worker1", "cloud.worker2"):
        assert doc["nodes"]["owner.chief"]["bytes_sent"][f"owner.chief->{w}:shard"] > 200 * 13 * 4
        assert doc["nodes"][w]["steps"] == doc["nodes"]["cloud.ps"]["steps"] > 0
