"""Every shipped example on generated data, run with its defaults, visibly learns (issue #12): the model's
holdout AUC, as the aggregator reports it, clearly above chance and within 0.01 of the same model trained
centrally on the same rows.

"The same model trained centrally": synchronous aggregation averages the workers' batch gradients weighted
by their rows, which is one step on the union of their batches, so the central reference trains with batch
size = workers x batch size, on the union of the workers' training rows. The run's side is the aggregator's
(parameter server's) combined AUC over the union of the workers' holdout rows (the split each worker makes:
stratified_split of its ids), binned into 1000 bins (docs/language.md, "Training"); the central side is the
exact AUC of the central model over the same union. The vertical demo has its own exact equivalence tests
(tests/runtime/test_roles_inprocess.py, tests/stdlib)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import describe, launch

from fldsl.artifacts import Plan, load_model

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # ~40 s each on 2 cores (runs and central reference)

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"


def _worker_rows(plans: list[Plan]) -> dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Each worker's rows (ids, fields) as the run gives them: its own data set, or the chief's shard."""
    from fldsl.runtime.data import load_dataset
    from fldsl.runtime.roles.distributed import shard_rows

    chief = next((p for p in plans if p.role == "distributed.chief"), None)
    if chief is not None:
        assert chief.sharding is not None
        t = load_dataset(chief.data[0])
        workers = chief.sharding.workers
        out = {}
        for k, w in enumerate(workers):
            r = shard_rows(len(t.ids), len(workers), k, chief.sharding.strategy)
            out[w] = (np.asarray(t.ids)[r], {f: v[r] for f, v in t.fields.items()})
        return out
    return {p.node: (np.asarray(t.ids), t.fields) for p in plans if p.loss is not None
            for t in [load_dataset(p.data[0])]}


def _central_union(plans: list[Plan]) -> tuple[float, int]:
    """The central reference's exact AUC over the union of the workers' holdout rows, and its size."""
    from fldsl.runtime.data import stratified_split
    from fldsl.stdlib.tf import train_central
    from fldsl.stdlib.tf.central import evaluate

    lead = next(p for p in plans if p.loss is not None)
    assert lead.loss is not None
    ds = lead.loss.label.split(".")[0]
    v = lead.train.validation
    train_x: list[dict[str, np.ndarray]] = []
    train_y: list[np.ndarray] = []
    hold_x: list[dict[str, np.ndarray]] = []
    hold_y: list[np.ndarray] = []
    rows = _worker_rows(plans)
    for ids, fields in rows.values():
        tr, ho = stratified_split(ids, fields["label"], v.fraction, v.seed)
        pos = {str(i): k for k, i in enumerate(ids.tolist())}
        rt = np.array([pos[str(i)] for i in tr.tolist()])
        rh = np.array([pos[str(i)] for i in ho.tolist()])
        train_x.append({f"{ds}.{f}": a[rt] for f, a in fields.items() if f != "label"})
        train_y.append(fields["label"][rt])
        hold_x.append({f"{ds}.{f}": a[rh] for f, a in fields.items() if f != "label"})
        hold_y.append(fields["label"][rh])
    data = {k: np.concatenate([x[k] for x in train_x]) for k in train_x[0]}
    hx = {k: np.concatenate([x[k] for x in hold_x]) for k in hold_x[0]}
    hy = np.concatenate(hold_y)
    train = lead.train.model_copy(update={"batch_size": lead.train.batch_size * len(rows)})
    res = train_central(lead.model, lead.loss, train, data, np.concatenate(train_y), eval_data=hx,
                        eval_labels=hy, keep_segment=True)
    assert res.segment is not None
    return evaluate(res.segment, lead.loss, hx, hy, ["auc"])["auc"], len(hy)


@pytest.mark.parametrize("name", ["horizontal_dlrm", "distributed_dlrm"])
def test_shipped_example_learns_like_its_central_counterpart(tmp_path: Path, trust_dir: Path,
                                                              name: str) -> None:
    from fldsl.api import compile_pipeline

    def make() -> Path:
        return compile_pipeline(PIPELINES / f"{name}.flp", out_dir=tmp_path / "build").build_dir

    res = launch(make, tmp_path / "run", trust_dir)
    assert res.exit_code == 0, describe(res)
    nodes = res.to_json()["nodes"]
    plans = [load_model(Plan, d / "plan.json") for d in sorted((tmp_path / "build" / "nodes").iterdir())]
    aggregator = next(p.node for p in plans if p.role.endswith(".server"))
    ref, total = _central_union(plans)
    fed = nodes[aggregator]["metrics"]["auc"]
    print(f"{name}: federated holdout AUC {fed:.4f} (binned, at {aggregator}), central {ref:.4f} (exact; "
          f"{total} holdout rows)")
    assert fed > 0.75, nodes
    assert abs(fed - ref) <= 0.01, (fed, ref)
