"""Resume agreement and peer bundles against a misbehaving or rolled-back peer, in one process: a malformed
answer deletes nothing, bundles are bounded before they expand, rollback is caught across peers."""

from __future__ import annotations

import io
import json
import shutil
import sys
import threading
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import buildkit
import memlink

from fldsl.artifacts import Plan, Policy, load_model, node_dir
from fldsl.runtime.checkpoint import Checkpoint, RollbackDetected
from fldsl.runtime.progress import Progress
from fldsl.runtime.roles.common import (
    PeerLimitExceeded,
    ResumeRefused,
    RoleContext,
    send_chunked,
)
from fldsl.runtime.transport import keys

MEDIA, SHOP = "media.trainer", "shop.trainer"

CTRL_ALIGN = keys.control(keys.Control.ALIGN)
CTRL_RESUME = keys.control(keys.Control.RESUME)
CTRL_RESUME_AGREED = keys.control(keys.Control.RESUME_AGREED)


def _contexts(build: Path, run_dir: Path) -> dict[str, RoleContext]:
    boxes: dict[tuple[str, str], Any] = {}
    out = {}
    for node in (MEDIA, SHOP):
        d = node_dir(build, node)
        plan, policy = load_model(Plan, d / "plan.json"), load_model(Policy, d / "policy.json")
        links = {p.id: memlink.MemLink(node, p.id, boxes, policy) for p in plan.peers}
        out[node] = RoleContext(plan=plan, policy=policy, links=links, progress=Progress(node, io.StringIO()),
                                store=memlink.store_of(build, run_dir, node), run_dir=run_dir,
                                seal_key=memlink.KEY, recv_timeout_s=10)
    return out


def _in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def body() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, out


def _listing(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("answer", [{"step": None, "line": "0" * 32}, {"line": "0" * 32}, {"step": 999},
                                    {"step": "10", "line": "0" * 32}, ["fresh"], {"step": 10}])
def test_a_malformed_resume_answer_is_refused_and_deletes_nothing(tmp_path: Path, answer: Any) -> None:
    build = buildkit.vertical_build(tmp_path, rows=200, epochs=1)
    ctx = _contexts(build, tmp_path / "run")
    store = ctx[MEDIA].store
    for s in (10, 20):
        store.save(Checkpoint(step=s, arrays={"w": np.ones(3, np.float32)}))
    before = _listing(store.dir)
    t, out = _in_thread(lambda: ctx[MEDIA].agree_resume(SHOP, []))
    shop = ctx[SHOP]
    report = json.loads(shop.links[MEDIA].recv_blob(shop.control_flow(MEDIA, SHOP), CTRL_RESUME, 5))
    assert report["steps"] == [10, 20]
    reply = json.dumps(answer).encode()
    shop.links[MEDIA].send_blob(shop.control_flow(SHOP, MEDIA), CTRL_RESUME_AGREED, reply)
    t.join(10)
    err = out.get("error")
    assert isinstance(err, ResumeRefused), out
    assert "shop.trainer answered the resume agreement" in str(err), err
    assert "no checkpoint was touched" in str(err), err
    assert _listing(store.dir) == before  # every file, byte for byte
    assert memlink.store_of(build, tmp_path / "run", MEDIA).steps() == [10, 20]


def _bomb(rows: int) -> bytes:
    """A zip of .npy members whose deflated data expands to ``rows`` int64 positions (zeros: ~1000:1)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, n in (("train.npy", rows), ("holdout.npy", 1)):
            with zf.open(name, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.zeros(n, np.int64))
    return buf.getvalue()


def test_a_decompression_bomb_alignment_is_refused_before_expanding(tmp_path: Path) -> None:
    from fldsl.runtime.roles.vertical import _recv_positions

    build = buildkit.vertical_build(tmp_path, rows=200, epochs=1)
    ctx = _contexts(build, tmp_path / "run")
    bomb = _bomb(4_000_000)  # 32 MB of positions in ~32 KB: within the wire limit for 5,000 aligned rows
    assert len(bomb) < 8 * 5000
    send_chunked(ctx[SHOP], MEDIA, ctx[SHOP].holdout_flow(SHOP, MEDIA), CTRL_ALIGN, bomb)
    tracemalloc.start()
    try:
        with pytest.raises(PeerLimitExceeded) as err:
            _recv_positions(ctx[MEDIA], SHOP, 5000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    msg = str(err.value)
    assert "would expand to at least 32,000,128 bytes, more than the limit of 43,072" in msg, msg
    assert "before expanding anything" in msg
    assert peak < 2 << 20, peak  # nothing near the 32 MB was allocated


def test_a_header_announcing_a_huge_array_is_refused_before_allocating(tmp_path: Path) -> None:
    from fldsl.runtime.bundle import BundleTooLarge, read_npz

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:  # stored, but the .npy header claims 10^10 rows
        with zf.open("train.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False,
                                                     "shape": (10**10,)})
            f.write(bytes(64))
    with pytest.raises(BundleTooLarge, match="80,000,000,"):
        read_npz(buf.getvalue(), limit=1 << 20)


@pytest.mark.parametrize(("positions", "refusal"), [
    (10_000, "sent more than 3,872 bytes of the train/holdout positions"),  # by its size on the wire
    (300, "sent 300 train/holdout positions, more than the 100 rows this node aligned"),  # by its count
])
def test_more_positions_than_aligned_rows_are_refused(tmp_path: Path, positions: int, refusal: str) -> None:
    from fldsl.runtime.roles.common import pack_arrays
    from fldsl.runtime.roles.vertical import _recv_positions

    build = buildkit.vertical_build(tmp_path, rows=200, epochs=1)
    ctx = _contexts(build, tmp_path / "run")
    bundle = pack_arrays({"train": np.arange(positions, dtype=np.int64), "holdout": np.zeros(0, np.int64)})
    send_chunked(ctx[SHOP], MEDIA, ctx[SHOP].holdout_flow(SHOP, MEDIA), CTRL_ALIGN, bundle)
    with pytest.raises(PeerLimitExceeded, match=refusal):
        _recv_positions(ctx[MEDIA], SHOP, 100)


def test_psi_peer_announcing_more_ids_than_the_plan_allows_is_refused(tmp_path: Path) -> None:
    from fldsl.runtime import psi
    from fldsl.runtime.roles.vertical import _align_peer

    build = buildkit.vertical_build(tmp_path, rows=200, epochs=1)
    ctx = _contexts(build, tmp_path / "run")
    send, _ = memlink_channel(ctx[SHOP], MEDIA)
    send(psi._frame(psi._HELLO, psi.struct.pack(">BQI", psi._LEADER, 150_000_000, psi.BATCH)))
    with pytest.raises(PeerLimitExceeded, match=r"announces 150,000,000 ids for PSI, more than the limit of "
                                                r"262,144"):
        _align_peer(ctx[MEDIA], SHOP, ["a", "b"], leader=False)


def memlink_channel(ctx: RoleContext, peer: str) -> Any:
    from fldsl.runtime.roles.common import blob_channel

    return blob_channel(ctx, peer, "psi")


def _vertical(root: Path) -> Path:
    return buildkit.vertical_build(root, rows=300, epochs=2, checkpoint_every=2)


def test_a_node_whose_checkpoints_were_wiped_is_refused_by_its_peer(tmp_path: Path) -> None:
    """Every checkpoint file of one node (and its sealed state and counters) deleted: it looks like a fresh
    node, which used to restart everybody from step 0. Its peer saw it land its checkpoints: refused."""
    build = _vertical(tmp_path)
    first = memlink.run_in_threads(build, tmp_path / "run")
    assert all(not isinstance(r, BaseException) for r in first.values()), first
    shop = memlink.store_of(build, tmp_path / "run", SHOP)
    seen = shop.peers_seen()[MEDIA]
    assert seen == shop.latest(), (seen, shop.steps())  # the final notice was collected too
    kept = _listing(shop.dir)
    shutil.rmtree(tmp_path / "run" / "checkpoints" / MEDIA)
    again = memlink.run_in_threads(build, tmp_path / "run")
    for node in (MEDIA, SHOP):
        assert isinstance(again[node], RollbackDetected), again
    msg = str(again[SHOP])
    assert f"media.trainer holds checkpoints up to no checkpoint, but shop.trainer saw it land step {seen}" \
        in msg, msg
    assert "--allow-rollback" in msg
    assert _listing(shop.dir) == kept  # refused before anything changed
    allowed = memlink.run_in_threads(build, tmp_path / "run", allow_rollback=True)
    assert all(not isinstance(r, BaseException) for r in allowed.values()), allowed


def test_deleting_the_newest_checkpoint_is_refused_and_allowed_explicitly(tmp_path: Path) -> None:
    build = _vertical(tmp_path)
    full = memlink.run_in_threads(build, tmp_path / "run")
    assert all(not isinstance(r, BaseException) for r in full.values()), full
    media = memlink.store_of(build, tmp_path / "run", MEDIA)
    newest = media.latest()
    media.path(newest).unlink()
    refused = memlink.run_in_threads(build, tmp_path / "run")
    assert isinstance(refused[MEDIA], RollbackDetected) and isinstance(refused[SHOP], RollbackDetected)
    assert f"its checkpoint of step {newest}" in str(refused[SHOP])
    allowed = memlink.run_in_threads(build, tmp_path / "run", allow_rollback=True)
    assert all(not isinstance(r, BaseException) for r in allowed.values()), allowed
    assert allowed[SHOP]["metrics"]["auc"] == pytest.approx(full[SHOP]["metrics"]["auc"], abs=1e-6)
