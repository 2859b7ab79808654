"""Progress lines and sealed checkpoints."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from fldsl.runtime.checkpoint import Checkpoint, CheckpointError, CheckpointStore, agree_resume_step
from fldsl.runtime.progress import Progress, parse_line

KEY = bytes(range(32))


def test_progress_lines_round_trip_and_ignore_noise() -> None:
    buf = io.StringIO()
    Progress("shop.trainer", buf).emit("step", step=3, total=10, loss=np.float32(0.5))
    line = buf.getvalue()
    ev = parse_line(line)
    assert ev == {"event": "step", "node": "shop.trainer", "step": 3, "total": 10, "loss": 0.5}
    assert parse_line("WARNING: some library printed this\n") is None
    assert parse_line("@fldsl {not json\n") is None


def _ckpt(step: int) -> Checkpoint:
    rng = np.random.default_rng(step)
    return Checkpoint(step=step, arrays={"w0000": rng.standard_normal((3, 4)).astype(np.float32),
                                         "ids": np.array(["a", "b"])}, meta={"history": [{"epoch": 1}]})


def test_checkpoint_round_trip_keeps_last_two(tmp_path) -> None:
    store = CheckpointStore(tmp_path / "ck", node_id="media.trainer", key=KEY)
    for s in (10, 20, 30):
        store.save(_ckpt(s))
    assert store.steps() == [20, 30]
    back = store.load(30)
    assert back.step == 30 and back.meta == {"history": [{"epoch": 1}]}
    np.testing.assert_array_equal(back.arrays["w0000"], _ckpt(30).arrays["w0000"])
    assert back.arrays["ids"].tolist() == ["a", "b"]
    raw = store.path(30).read_bytes()
    assert b"history" not in raw  # sealed, not plain
    store.discard_after(20)
    assert store.steps() == [20]


def test_checkpoint_tampering_wrong_key_and_renaming_are_refused(tmp_path) -> None:
    store = CheckpointStore(tmp_path / "ck", node_id="media.trainer", key=KEY)
    store.save(_ckpt(10))
    store.save(_ckpt(20))
    p = store.path(20)
    data = bytearray(p.read_bytes())
    data[-5] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="cannot unseal"):
        store.load(20)
    # A checkpoint renamed to another step (the logical name binds the step).
    os.replace(store.path(10), store.path(20))
    with pytest.raises(CheckpointError):
        store.load(20)
    other = CheckpointStore(tmp_path / "ck2", node_id="media.trainer", key=bytes(32))
    other.save(_ckpt(5))
    wrong = CheckpointStore(tmp_path / "ck2", node_id="media.trainer", key=KEY)
    with pytest.raises(CheckpointError):
        wrong.load(5)
    # Another node's checkpoint is not ours either.
    stranger = CheckpointStore(tmp_path / "ck2", node_id="shop.trainer", key=bytes(32))
    with pytest.raises(CheckpointError):
        stranger.load(5)


@pytest.mark.parametrize(("available", "want"), [
    ([[10, 20], [10, 20]], 20),
    ([[10, 20], [10]], 10),  # a node lost its newest checkpoint: everybody rolls back
    ([[20, 30], [10, 20]], 20),
    ([[10], []], None),  # a node without any checkpoint: fresh start
    ([], None),
])
def test_agree_resume_step(available, want) -> None:
    assert agree_resume_step(available) == want
