"""Progress lines and sealed checkpoints."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

from fldsl.runtime.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointStore,
    ForeignCheckpoint,
    agree_resume_step,
)
from fldsl.runtime.progress import Progress, parse_line

KEY = bytes(range(32))
PIPE = "a1" * 32  # a pins digest
OTHER = "b2" * 32


def _store(d, node: str = "media.trainer", key: bytes = KEY, pipeline: str = PIPE) -> CheckpointStore:
    return CheckpointStore(d, node_id=node, key=key, pipeline_digest=pipeline)


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
    store = _store(tmp_path / "ck")
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
    assert store.path(30).exists()  # no longer offered; retention removes it once a newer one lands


def test_checkpoint_tampering_wrong_key_and_renaming_are_refused(tmp_path) -> None:
    store = _store(tmp_path / "ck")
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
    other = _store(tmp_path / "ck2", key=bytes(32))
    other.save(_ckpt(5))
    wrong = _store(tmp_path / "ck2")
    with pytest.raises(CheckpointError):
        wrong.load(5)
    # Another node's checkpoint is not ours either.
    stranger = _store(tmp_path / "ck2", node="shop.trainer", key=bytes(32))
    with pytest.raises(CheckpointError):
        stranger.load(5)


def test_checkpoints_of_another_pipeline_are_refused_naming_both_digests(tmp_path) -> None:
    theirs = _store(tmp_path / "ck", pipeline=OTHER)
    theirs.save(_ckpt(10))
    mine = _store(tmp_path / "ck")
    with pytest.raises(ForeignCheckpoint) as err:
        mine.verify_files()
    assert OTHER[:16] in str(err.value) and PIPE[:16] in str(err.value), err.value
    with pytest.raises(ForeignCheckpoint):
        mine.steps()  # its state file is the other pipeline's too
    # Only the checkpoint file planted (no state): still refused, by its sealed name.
    (tmp_path / "ck" / "state.sealed").unlink()
    (tmp_path / "ck" / "versions.json").unlink()
    with pytest.raises(ForeignCheckpoint, match=OTHER[:16]):
        _store(tmp_path / "ck").verify_files()
    # An unbound store reads and writes nothing.
    with pytest.raises(CheckpointError, match="not bound"):
        CheckpointStore(tmp_path / "ck3", node_id="media.trainer", key=KEY).save(_ckpt(1))


def test_an_older_copy_of_a_checkpoint_fails_its_version(tmp_path) -> None:
    store = _store(tmp_path / "ck")
    store.save(_ckpt(10))
    store.save(_ckpt(20))
    old = store.path(20).read_bytes()
    store.discard_after(10)  # the peers went back to step 10; step 20 is trained (and saved) again
    store.save(_ckpt(20))
    store.path(20).write_bytes(old)
    with pytest.raises(CheckpointError, match="version"):
        _store(tmp_path / "ck").load(20)


def test_deleted_checkpoints_and_state_are_rollback_evidence(tmp_path) -> None:
    store = _store(tmp_path / "ck")
    for s in (10, 20):
        store.save(_ckpt(s))
    assert _store(tmp_path / "ck").rollback_evidence() == []
    store.path(20).unlink()
    fresh = _store(tmp_path / "ck")
    assert fresh.steps() == [10]
    assert any("step 20" in e for e in fresh.rollback_evidence())
    (tmp_path / "ck" / "state.sealed").unlink()
    evidence = _store(tmp_path / "ck").rollback_evidence()
    assert evidence and "state" in evidence[0], evidence


def test_agreement_never_deletes_only_retention_does(tmp_path) -> None:
    store = _store(tmp_path / "ck")
    for s in (10, 20):
        store.save(_ckpt(s))
    store.note_peer("shop.trainer", 20)
    store.settle(None, ["shop.trainer"])  # a fresh start: nothing offered any more, nothing deleted
    assert store.steps() == [] and store.path(10).exists() and store.path(20).exists()
    assert store.peers_seen() == {}
    store.save(_ckpt(5))  # a newer save: retention removes what is no longer offered
    assert store.steps() == [5] and not store.path(10).exists() and not store.path(20).exists()
    store.save(_ckpt(10))
    store.settle(5, ["shop.trainer"])
    assert store.steps() == [5] and store.path(10).exists()
    assert _store(tmp_path / "ck").peers_seen() == {"shop.trainer": 5}


@pytest.mark.parametrize(("available", "want"), [
    ([[10, 20], [10, 20]], 20),
    ([[10, 20], [10]], 10),  # a node lost its newest checkpoint: everybody rolls back
    ([[20, 30], [10, 20]], 20),
    ([[10], []], None),  # a node without any checkpoint: fresh start
    ([], None),
])
def test_agree_resume_step(available, want) -> None:
    assert agree_resume_step(available) == want
