"""Red-team findings 4-6 against real node processes: a peer flooding a node with messages nobody reads, a
decompression bomb as the alignment bundle, a malformed resume answer, a checkpoint planted from another
pipeline, a deleted newest checkpoint, and (issue #11) a peer opening thousands of streams at once. Each is
refused by name; memory stays bounded; nothing is deleted on a peer's word. The misbehaving peers are real,
attested node processes (``rogue_node.py``)."""

from __future__ import annotations

import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import buildkit
import pytest
from conftest import describe, launch

from fldsl.artifacts import Pins, Plan, Policy, load_model, node_dir
from fldsl.measurement import code_digest
from fldsl.runtime import launcher
from fldsl.runtime.launcher import RunResult, run_pipeline
from fldsl.runtime.roles.common import artifacts_digest
from fldsl.runtime.transport.link import MAX_STREAMS_PER_PEER, _mib, receive_budget

pytestmark = pytest.mark.e2e

ROGUE = Path(__file__).with_name("rogue_node.py")
MEDIA, SHOP = "media.trainer", "shop.trainer"
# A node's resident memory: TensorFlow and gRPC take ~0.6 GB; a node that buffered the flood or expanded the
# bomb (1-3 GB) is far above this.
PEAK_LIMIT_KB = 1_300_000


def _vertical(root: Path, lr: float = 0.01) -> Path:
    return buildkit.vertical_build(root, rows=200, epochs=2, checkpoint_every=2, lr=lr)


def _as(monkeypatch: pytest.MonkeyPatch, modes: dict[str, str]) -> None:
    """Start the given nodes as ``rogue_node.py MODE`` (same arguments) instead of the honest node."""
    real = launcher.node_command

    def command(*args: Any, **kw: Any) -> list[str]:
        cmd = real(*args, **kw)
        nid = cmd[cmd.index("--node") + 1]
        if nid in modes:  # [python, flags..., -m, fldsl.runtime.node, args...]: the flags (-I) stay
            at = cmd.index("fldsl.runtime.node")
            assert cmd[at - 1] == "-m", cmd
            cmd = [*cmd[:at - 1], str(ROGUE), modes[nid], *cmd[at + 1:]]
        return cmd

    monkeypatch.setattr(launcher, "node_command", command)


class _PeakMemory:
    """A launcher display that records the peak resident memory (VmHWM) of one node's process."""

    def __init__(self, node: str) -> None:
        self.node, self.peak_kb = node, 0
        self._done = threading.Event()

    def begin(self, launcher: Any) -> None:
        threading.Thread(target=self._poll, args=(launcher,), daemon=True).start()

    def _poll(self, launcher: Any) -> None:
        while not self._done.is_set():
            proc = launcher.nodes[self.node].proc
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text() if proc is not None else ""
            except OSError:
                status = ""
            m = re.search(r"VmHWM:\s+(\d+) kB", status)
            if m:
                self.peak_kb = max(self.peak_kb, int(m.group(1)))
            time.sleep(0.05)

    def update(self, st: Any) -> None:
        pass

    def end(self) -> None:
        self._done.set()


def _errors(res: RunResult) -> str:
    return "\n".join(f"{n}: {st.error}" for n, st in res.nodes.items() if st.error)


def _listing(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _rerun(make: Any, run_dir: Path, trust_dir: Path, **kw: Any) -> RunResult:
    """Run a build again in ``run_dir`` (a resume); rebuilt first, and again if the installed code changed
    meanwhile (other work in this checkout changes the simulated measurement)."""
    res = None
    for _ in range(3):
        code_digest.cache_clear()
        before = code_digest()
        res = run_pipeline(make(), run_dir=run_dir, trust_dir=trust_dir, **kw)
        if code_digest.__wrapped__() == before:
            break
    assert res is not None
    return res


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, trust_dir: Path) -> Path:
    """A completed run of the vertical pipeline (its build is next to it): both nodes hold their last two
    checkpoints."""
    root = tmp_path_factory.mktemp("finished")
    res = launch(lambda: _vertical(root), root / "run", trust_dir)
    assert res.exit_code == 0, describe(res)
    return res.run_dir


def _copy_run(finished: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished / "checkpoints", run / "checkpoints")
    return run


def test_a_flooding_peer_is_refused_with_the_limit_named(tmp_path: Path, trust_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _as(monkeypatch, {MEDIA: "flood"})
    peak = _PeakMemory(SHOP)
    res = launch(lambda: _vertical(tmp_path), tmp_path / "run", trust_dir, display=peak)
    assert res.nodes[SHOP].exit_code == 3, describe(res)
    policy = load_model(Policy, node_dir(tmp_path / "build" / "vertical_test", SHOP) / "policy.json")
    limit = _mib(receive_budget(policy.flows, MEDIA, SHOP))
    err = res.nodes[SHOP].error or ""
    assert re.search(r"media\.trainer sent [\d,]+ messages \([\d.,]+ MiB\) that shop\.trainer has not read, "
                     rf"ahead of its first step \(limit {re.escape(limit)} per link", err), err
    assert err.endswith("refusing"), err
    assert 0 < peak.peak_kb < PEAK_LIMIT_KB, peak.peak_kb


def test_a_decompression_bomb_is_refused_before_it_expands(tmp_path: Path, trust_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    _as(monkeypatch, {SHOP: "bomb"})
    peak = _PeakMemory(MEDIA)
    res = launch(lambda: _vertical(tmp_path), tmp_path / "run", trust_dir, display=peak)
    assert res.nodes[MEDIA].exit_code == 3, describe(res)
    err = res.nodes[MEDIA].error or ""
    want = r"shop\.trainer sent more than [\d,]+ bytes of the train/holdout positions \(its limit\)"
    assert re.search(want, err), err
    assert 0 < peak.peak_kb < PEAK_LIMIT_KB, peak.peak_kb
    assert not (res.run_dir / "checkpoints" / MEDIA).exists()  # it never trained on it


def test_a_null_resume_answer_is_refused_and_deletes_nothing(finished: Path, tmp_path: Path, trust_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    run = _copy_run(finished, tmp_path)
    before = _listing(run / "checkpoints" / MEDIA)
    assert any(name.startswith("ckpt-") for name in before)
    _as(monkeypatch, {SHOP: "null-resume"})
    res = _rerun(lambda: _vertical(tmp_path), run, trust_dir)
    assert res.nodes[MEDIA].exit_code == 3, describe(res)
    err = res.nodes[MEDIA].error or ""
    assert "shop.trainer answered the resume agreement with step null" in err, err
    assert "no checkpoint was touched" in err
    assert _listing(run / "checkpoints" / MEDIA) == before  # every file, byte for byte


def _digests(build: Path, node: str) -> set[str]:
    """What a node may bind its checkpoints to: the pins digest, or (not passed) its plan and policy."""
    d = node_dir(build, node)
    plan, policy = load_model(Plan, d / "plan.json"), load_model(Policy, d / "policy.json")
    return {load_model(Pins, d / "pins.json").digest()[:16], artifacts_digest(plan, policy)[:16]}


def test_a_checkpoint_of_another_pipeline_is_refused_naming_both(finished: Path, tmp_path: Path,
                                                                 trust_dir: Path) -> None:
    run = _copy_run(finished, tmp_path)  # the same node ids, the same deployment keys, another pipeline
    res = _rerun(lambda: _vertical(tmp_path, lr=0.02), run, trust_dir)
    assert res.exit_code == 3, describe(res)
    err = res.nodes[SHOP].error or ""
    assert "a checkpoint of another pipeline" in err, _errors(res)
    ours = _digests(tmp_path / "build" / "vertical_test", SHOP)
    theirs = _digests(finished.parent / "build" / "vertical_test", SHOP)
    assert any(d in err for d in ours) and any(d in err for d in theirs), (ours, theirs, err)
    assert not (run / "models").exists() or not any((run / "models").iterdir())  # nothing exported


def test_a_deleted_newest_checkpoint_is_refused_and_allowed_explicitly(
        finished: Path, tmp_path: Path, trust_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _copy_run(finished, tmp_path)
    newest = sorted((run / "checkpoints" / MEDIA).glob("ckpt-*.sealed"))[-1]
    step = int(newest.name[5:14])
    newest.unlink()
    shop_before = _listing(run / "checkpoints" / SHOP)
    res = _rerun(lambda: _vertical(tmp_path), run, trust_dir)
    assert res.exit_code == 3, describe(res)
    err = res.nodes[SHOP].error or ""
    assert "rollback detected" in err and f"its checkpoint of step {step}" in err, _errors(res)
    assert f"shop.trainer saw it land step {step}" in err, err  # the peer's record says so too
    assert "--allow-rollback" in err
    assert _listing(run / "checkpoints" / SHOP) == shop_before
    _as(monkeypatch, {MEDIA: "allow-rollback", SHOP: "allow-rollback"})
    res = _rerun(lambda: _vertical(tmp_path), run, trust_dir)
    assert res.exit_code == 0, describe(res)
    assert '"resumed_from": ' in (run / "metrics.jsonl").read_text()


def test_a_node_whose_checkpoints_were_wiped_is_refused_by_its_peer(finished: Path, tmp_path: Path,
                                                                    trust_dir: Path) -> None:
    """Its checkpoints, sealed state and counters all gone: it looks like a new node, which used to send
    every node back to step 0. Its peer saw it land its checkpoints."""
    run = _copy_run(finished, tmp_path)
    step = int(sorted((run / "checkpoints" / MEDIA).glob("ckpt-*.sealed"))[-1].name[5:14])
    shutil.rmtree(run / "checkpoints" / MEDIA)
    res = _rerun(lambda: _vertical(tmp_path), run, trust_dir)
    assert res.exit_code == 3, describe(res)
    err = res.nodes[SHOP].error or ""
    assert f"media.trainer holds checkpoints up to no checkpoint, but shop.trainer saw it land step {step}" \
        in err, _errors(res)



def test_a_peer_opening_thousands_of_streams_is_refused_with_the_limit_named(
        tmp_path: Path, trust_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """2,000 Exchange calls at once from an attested peer: each used to replace the link's stream (the
    generation went past 1,900 and the run ended as "internal error" or a confused close). Now the calls past
    the per-peer limit are refused and the honest node stops, naming the limit and the peer."""
    _as(monkeypatch, {MEDIA: "streams"})
    peak = _PeakMemory(SHOP)
    t0 = time.monotonic()
    res = launch(lambda: _vertical(tmp_path), tmp_path / "run", trust_dir, display=peak)
    assert res.nodes[SHOP].exit_code == 3, describe(res)
    err = res.nodes[SHOP].error or ""
    limit = MAX_STREAMS_PER_PEER
    assert err.startswith(f"policy violation: {MEDIA} opened more than {limit} Exchange streams to {SHOP} at "
                          f"once (limit {limit} per peer"), err
    assert err.endswith("refusing"), err
    assert "internal error" not in err
    log = (res.run_dir / "logs" / f"{SHOP}.log").read_text()
    assert "Traceback" not in log, log[-3000:]
    generations = [int(g) for g in re.findall(r"<-> media\.trainer up \(generation (\d+)\)", log)]
    assert generations and max(generations) <= 1 + MAX_STREAMS_PER_PEER, generations
    assert 0 < peak.peak_kb < PEAK_LIMIT_KB, peak.peak_kb
    assert time.monotonic() - t0 < 120  # refused at once, not after the connect or receive timeouts
