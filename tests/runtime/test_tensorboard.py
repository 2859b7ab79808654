"""Per-epoch metrics are also TensorBoard scalars under <run-dir>/tensorboard/<node>/ (issue #12 item 4): the
event files, read back, hold exactly the epoch metrics the node reported."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import buildkit
import memlink


def _scalars(logdir: Path) -> dict[tuple[int, str], float]:
    import tensorflow as tf

    out: dict[tuple[int, str], float] = {}
    files = sorted(logdir.glob("events.out.tfevents.*"))
    assert files, f"no event file in {logdir}"
    for f in files:
        for ev in tf.compat.v1.train.summary_iterator(str(f)):
            for v in ev.summary.value:
                out[(ev.step, v.tag)] = float(tf.make_ndarray(v.tensor))
    return out


def _history_scalars(history: list[dict]) -> dict[tuple[int, str], float]:
    return {(int(h["epoch"]), k): float(v) for h in history for k, v in h.items() if k != "epoch"}


@pytest.mark.parametrize("kind", ["vertical", "horizontal"])
def test_epoch_metrics_are_written_as_tensorboard_scalars(tmp_path: Path, kind: str) -> None:
    if kind == "vertical":
        build, nodes = buildkit.vertical_build(tmp_path, rows=300, epochs=2), ["shop.trainer"]
    else:
        build = buildkit.horizontal_build(tmp_path, mode="sync", epochs=2, rows=300)
        nodes = ["bank1.worker", "bank2.worker"]
    res = memlink.run_in_threads(build, tmp_path / "run")
    for node in nodes:
        history = res[node]["history"]
        assert len(history) == 2 and {"train_loss", "loss", "auc"} <= set(history[-1])
        got = _scalars(tmp_path / "run" / "tensorboard" / node)
        want = _history_scalars(history)
        assert set(got) == set(want)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-6), key


def test_a_tensorboard_folder_the_node_cannot_write_costs_the_curves_not_the_run(tmp_path: Path) -> None:
    """Inside an enclave whose manifest lacked the folder, the writer's PermissionDenied ended every node
    with an internal error; the curves are a copy of metrics the node reports anyway."""
    build = buildkit.vertical_build(tmp_path, rows=300, epochs=2)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tensorboard").write_text("not a folder")
    res = memlink.run_in_threads(build, tmp_path / "run")
    for node, r in res.items():
        assert not isinstance(r, BaseException), f"{node}: {r!r}"
    assert len(res["shop.trainer"]["history"]) == 2
