"""`fldsl audit` on a real run of the vertical demo (two processes, sim RA-TLS): the clean records verify and
match flow for flow what `fldsl check` lists; each kind of tampering with a copy is detected and located."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import describe, launch

from fldsl.auditlog import AuditRecord

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "pipelines" / "vertical_wide_deep.flp"
PARAMS = {"rows": "600"}
MEDIA, SHOP = "media.trainer", "shop.trainer"
FLDSL = [sys.executable, "-c", "import sys; from fldsl.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory, trust_dir: Path) -> tuple[Path, dict]:
    from fldsl.api import compile_pipeline

    tmp = tmp_path_factory.mktemp("audit")

    def build() -> Path:
        return Path(compile_pipeline(DEMO, tmp / "build", PARAMS).build_dir)

    res = launch(build, tmp / "run", trust_dir)
    assert res.exit_code == 0, describe(res)
    return res.run_dir, res.to_json()


def _keys(trust_dir: Path):
    from fldsl.runtime.audit_report import PartyKeys

    return PartyKeys(sealing={p: (trust_dir / p / "sealing.key").read_bytes() for p in ("media", "shop")},
                     sim_roots={p: (trust_dir / p / "root_ca.pem").read_bytes() for p in ("media", "shop")})


def _report(run_dir: Path, trust_dir: Path):
    from fldsl.runtime.audit_report import build_report

    return build_report([run_dir], _keys(trust_dir))


def test_clean_run_verifies_and_shows_exactly_the_checked_flows(demo_run: tuple[Path, dict],
                                                                 trust_dir: Path) -> None:
    from fldsl.api import check

    run_dir, doc = demo_run
    report = _report(run_dir, trust_dir)
    assert report.ok and report.findings == [], report.findings
    assert report.nodes == [MEDIA, SHOP] and report.files == 4
    crossed = {f.flow: f for b in report.boundaries for f in b.flows}
    assert set(crossed) == {f.id for f in check(str(DEMO), PARAMS).flows}
    assert all(b.cross_party for b in report.boundaries)
    for f in crossed.values():  # both ends recorded every message, same digest; all within the policy
        assert f.sent == f.received == f.matched > 0 and f.allowed is not None, f
    steps = doc["nodes"][SHOP]["steps"]
    assert steps == doc["nodes"][MEDIA]["steps"] > 0
    act = crossed[f"{MEDIA}->{SHOP}:act1"]
    assert act.training_steps == steps and act.allowed == "float32[?, 64]"
    assert all(s.startswith("float32[") and s.endswith(", 64]") for s in act.shapes)
    assert crossed[f"{SHOP}->{MEDIA}:grad(act1)"].training_steps == steps
    # The bytes agree with the run summary's per-flow counters.
    assert act.bytes == doc["nodes"][MEDIA]["bytes_sent"][act.flow]
    signers = {s.node: s for s in report.signers}
    assert signers[MEDIA].attested_by == [SHOP] and signers[SHOP].attested_by == [MEDIA]
    assert all(s.simulated and "chains to the party's sim root" in s.quote for s in report.signers)
    assert {e.event for e in report.events} == {"checkpoint", "export"} and report.refusals == []
    assert all(e.digest for e in report.events if e.event == "export")  # ties each model file to the run
    assert doc["nodes"][MEDIA]["audit"] == str(run_dir / "audit" / MEDIA)  # the run summary points to it


def test_cli_prints_boundaries_and_json(demo_run: tuple[Path, dict], trust_dir: Path) -> None:
    run_dir, _ = demo_run
    cmd = [*FLDSL, "audit", str(run_dir), "--trust", str(trust_dir)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"{MEDIA} -> {SHOP} (party boundary)" in out.stdout and "act1" in out.stdout
    doc = json.loads(subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=120).stdout)
    assert doc["ok"] is True and doc["findings"] == []
    missing = subprocess.run([*cmd[:5], "--trust", str(run_dir / "nowhere")], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2 and "sealing key" in missing.stderr and "Traceback" not in missing.stderr


# ---------------------------------------------------------------------------------------------------------
# Tampering with copies of the real records
# ---------------------------------------------------------------------------------------------------------


def _copy(demo_run: tuple[Path, dict], tmp_path: Path) -> tuple[Path, Path]:
    dst = tmp_path / "run"
    shutil.copytree(demo_run[0] / "audit", dst / "audit")
    return dst, dst / "audit" / MEDIA / f"{SHOP}.audit"


def _sealer(trust_dir: Path):
    from fldsl.runtime.audit import SEAL_LABEL
    from fldsl.runtime.sealing import LineSealer

    return LineSealer((trust_dir / "media" / "sealing.key").read_bytes(), MEDIA, SEAL_LABEL)


def _errors(run_dir: Path, trust_dir: Path) -> list:
    report = _report(run_dir, trust_dir)
    assert not report.ok
    return [f for f in report.findings if f.severity == "error"]


def _first_send(lines: list[bytes], trust_dir: Path) -> int:
    sealer = _sealer(trust_dir)
    for i, line in enumerate(lines[1:], start=1):
        if AuditRecord.model_validate_json(sealer.open(SHOP, line)).event == "send":
            return i
    raise AssertionError("no send record")


def test_a_flipped_byte_is_located(demo_run: tuple[Path, dict], tmp_path: Path, trust_dir: Path) -> None:
    run_dir, path = _copy(demo_run, tmp_path)
    lines = path.read_bytes().split(b"\n")
    raw = bytearray(base64.b64decode(lines[5]))
    raw[20] ^= 1
    lines[5] = base64.b64encode(bytes(raw))
    path.write_bytes(b"\n".join(lines))
    errors = _errors(run_dir, trust_dir)
    assert (errors[0].node, errors[0].chain, errors[0].record) == (MEDIA, SHOP, 5)
    assert "does not open" in errors[0].message


def test_a_deleted_line_is_located(demo_run: tuple[Path, dict], tmp_path: Path, trust_dir: Path) -> None:
    run_dir, path = _copy(demo_run, tmp_path)
    lines = path.read_bytes().split(b"\n")
    i = _first_send(lines, trust_dir)
    del lines[i]
    path.write_bytes(b"\n".join(lines))
    errors = _errors(run_dir, trust_dir)
    assert any(e.record == i and e.chain == SHOP and "missing" in e.message for e in errors), errors
    # And the receiver's record of that message now has no send to match it.
    assert any(e.node == SHOP and "has no send" in e.message for e in errors), errors


def test_swapped_records_are_located(demo_run: tuple[Path, dict], tmp_path: Path, trust_dir: Path) -> None:
    run_dir, path = _copy(demo_run, tmp_path)
    lines = path.read_bytes().split(b"\n")
    lines[6], lines[7] = lines[7], lines[6]
    path.write_bytes(b"\n".join(lines))
    errors = _errors(run_dir, trust_dir)
    assert errors[0].record == 6 and "missing" in errors[0].message  # record 7 where 6 was due
    assert any(e.record == 7 and "out of order" in e.message for e in errors), errors


def test_a_record_resigned_with_another_key_is_located(demo_run: tuple[Path, dict], tmp_path: Path,
                                                       trust_dir: Path) -> None:
    """The host holds the sim sealing key: it opens a record, shrinks what it says was sent, recomputes the
    hash and signs it with a key of its own. The signature does not verify with the node's certificate."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    run_dir, path = _copy(demo_run, tmp_path)
    lines = path.read_bytes().split(b"\n")
    i = _first_send(lines, trust_dir)
    sealer = _sealer(trust_dir)
    rec = AuditRecord.model_validate_json(sealer.open(SHOP, lines[i]))
    rec.nbytes, rec.shapes, rec.signed = 4, [[1, 1]], True
    rec.hash = rec.compute_hash()
    forged = ec.generate_private_key(ec.SECP256R1()).sign(bytes.fromhex(rec.hash), ec.ECDSA(hashes.SHA256()))
    rec.sig = base64.b64encode(forged).decode()
    lines[i] = sealer.seal(SHOP, rec.model_dump_json().encode())
    path.write_bytes(b"\n".join(lines))
    errors = _errors(run_dir, trust_dir)
    assert any(e.record == i and "re-signed" in e.message for e in errors), errors
    assert any(e.record == i + 1 and "does not follow" in e.message for e in errors), errors
    cli = subprocess.run([*FLDSL, "audit", str(run_dir), "--trust", str(trust_dir)],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 3 and f"record {i}" in cli.stderr and "Traceback" not in cli.stderr


def test_a_stripped_signature_is_located(demo_run: tuple[Path, dict], tmp_path: Path,
                                         trust_dir: Path) -> None:
    """Only the last record of each batch is signed, and whether a record is signed is inside its hash: a
    signature cannot be removed to pass the batch off as still waiting for one."""
    run_dir, path = _copy(demo_run, tmp_path)
    lines = path.read_bytes().split(b"\n")
    sealer = _sealer(trust_dir)
    records = [AuditRecord.model_validate_json(sealer.open(SHOP, x)) for x in lines[1:] if x]
    assert any(not r.signed for r in records) and records[-1].signed  # batches; the close record signed
    i = next(n for n, r in enumerate(records, start=1) if r.signed and r.event == "send")
    rec = records[i - 1]
    rec.sig = ""
    lines[i] = sealer.seal(SHOP, rec.model_dump_json().encode())
    path.write_bytes(b"\n".join(lines))
    errors = _errors(run_dir, trust_dir)
    assert errors[0].record == i and "does not verify" in errors[0].message, errors


class _KillAt:
    """A launcher display that SIGKILLs ``node`` once it has trained ``step`` steps (no clean shutdown)."""

    def __init__(self, node: str, step: int) -> None:
        self.node, self.step, self.fired, self.launcher = node, step, False, None

    def begin(self, launcher) -> None:
        self.launcher = launcher

    def update(self, st) -> None:
        if not self.fired and st.id == self.node and st.phase == "train" and st.step >= self.step:
            self.fired = True
            st.proc.kill()

    def end(self) -> None:
        pass


class _RestartAt(_KillAt):
    """Kills ``node`` and starts it again at once while its peer keeps running (a live rejoin)."""

    def update(self, st) -> None:
        if not self.fired and st.id == self.node and st.phase == "train" and st.step >= self.step:
            self.fired = True
            import threading

            threading.Thread(target=self.launcher.restart_node, args=(self.node,), daemon=True).start()


@pytest.mark.parametrize("node", [MEDIA, SHOP])
def test_a_node_restarted_alone_keeps_the_records_verifiable(tmp_path: Path, trust_dir: Path,
                                                             node: str) -> None:
    """The peer's link survives, re-attests the restarted node (a new certificate) and goes on: both
    certificates of the restarted node are attested in the peer's record, and nothing is an error."""
    import buildkit

    from fldsl.runtime.audit_report import build_report

    fault = _RestartAt(node, 3)
    def make() -> Path:
        return buildkit.vertical_build(tmp_path, rows=1000, epochs=2, batch=16, checkpoint_every=10)

    res = launch(make, tmp_path / "run", trust_dir, display=fault)
    assert fault.fired and res.exit_code == 0, describe(res)
    report = build_report([res.run_dir], _keys(trust_dir))
    assert report.ok, [f for f in report.findings if f.severity == "error"]
    restarted = [s for s in report.signers if s.node == node]
    assert len(restarted) == 2 and all(s.attested_by for s in restarted)


def test_a_node_killed_and_resumed_keeps_one_verifiable_chain(tmp_path: Path, trust_dir: Path) -> None:
    """SIGKILL mid-training, then `fldsl run --run-dir` again: the restarted node continues its chain after
    its last signed record. The records it never signed are reported (warnings) and not counted; the rest,
    before and after the restart, verify and match the peer's."""
    import buildkit

    from fldsl.runtime.audit_report import build_report
    from fldsl.runtime.launcher import run_pipeline

    def make() -> Path:
        return buildkit.vertical_build(tmp_path, rows=1000, epochs=2, batch=16, checkpoint_every=10)

    fault = _KillAt(MEDIA, 12)
    part = launch(make, tmp_path / "run", trust_dir, display=fault)
    assert fault.fired and part.exit_code != 0, describe(part)
    resumed = run_pipeline(tmp_path / "build" / "vertical_test", run_dir=part.run_dir, trust_dir=trust_dir)
    assert resumed.exit_code == 0, describe(resumed)
    report = build_report([part.run_dir], _keys(trust_dir))
    assert report.ok, [f for f in report.findings if f.severity == "error"]
    media = [(p, r) for p, r in _chain_records(part.run_dir, trust_dir, MEDIA, SHOP)]
    assert sum(1 for _, r in media if r.event == "open") == 2  # the first run's and the resumed run's
    act = next(f for b in report.boundaries for f in b.flows if f.flow.endswith(":act1"))
    assert act.matched and act.matched >= resumed.to_json()["nodes"][SHOP]["steps"]


def _chain_records(run_dir: Path, trust_dir: Path, node: str, peer: str) -> list[tuple[int, AuditRecord]]:
    from fldsl.runtime.audit import SEAL_LABEL
    from fldsl.runtime.sealing import LineSealer

    sealer = LineSealer((trust_dir / node.split(".")[0] / "sealing.key").read_bytes(), node, SEAL_LABEL)
    lines = (run_dir / "audit" / node / f"{peer}.audit").read_bytes().split(b"\n")[1:]
    return [(i, AuditRecord.model_validate_json(sealer.open(peer, x))) for i, x in enumerate(lines, 1) if x]


@pytest.mark.parametrize("scenario", ["fedavg", "distributed"])
def test_horizontal_and_distributed_records_verify_and_match(tmp_path: Path, trust_dir: Path,
                                                             scenario: str) -> None:
    """Hub-and-spoke links, weights as lists of arrays, shards as blobs, a party with several nodes."""
    import buildkit

    from fldsl.runtime.audit_report import PartyKeys, build_report

    def make() -> Path:
        if scenario == "fedavg":
            return buildkit.horizontal_build(tmp_path, mode="fedavg", rows=300)
        return buildkit.distributed_build(tmp_path, rows=400)

    res = launch(make, tmp_path / "run", trust_dir)
    assert res.exit_code == 0, describe(res)
    doc = res.to_json()
    parties = sorted({n.split(".")[0] for n in doc["nodes"]})
    keys = PartyKeys(sealing={p: (trust_dir / p / "sealing.key").read_bytes() for p in parties},
                     sim_roots={p: (trust_dir / p / "root_ca.pem").read_bytes() for p in parties})
    report = build_report([res.run_dir], keys)
    assert report.ok and report.findings == [], report.findings
    assert report.nodes == sorted(doc["nodes"])
    crossed = {f.flow: f for b in report.boundaries for f in b.flows}
    for nid, node in doc["nodes"].items():  # every counted byte is in the record, matched at both ends
        for fid, nbytes in node["bytes_sent"].items():
            assert crossed[fid].bytes == nbytes and crossed[fid].sent == crossed[fid].matched, (nid, fid)


def test_one_party_audits_its_own_record_alone(demo_run: tuple[Path, dict], tmp_path: Path,
                                               trust_dir: Path) -> None:
    """Across organisations each party holds only its own nodes' records and its own key: the shop's officer
    verifies the shop's side; each flow then shows one end's count. A wrong key is named, exit 3."""
    own = tmp_path / "shop-run"
    shutil.copytree(demo_run[0] / "audit" / SHOP, own / "audit" / SHOP)
    key = ["--trust", str(trust_dir), "--key", f"shop={trust_dir / 'shop' / 'sealing.key'}"]
    out = subprocess.run([*FLDSL, "audit", str(own), *key, "--json"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["nodes"] == [SHOP] and doc["findings"] == []
    flows = {f["flow"]: f for b in doc["boundaries"] for f in b["flows"]}
    act = flows[f"{MEDIA}->{SHOP}:act1"]
    assert act["received"] > 0 and act["sent"] is None and act["matched"] is None
    assert flows[f"{SHOP}->{MEDIA}:grad(act1)"]["sent"] == demo_run[1]["nodes"][SHOP]["steps"]
    other = ["--trust", str(trust_dir), "--key", f"shop={trust_dir / 'media' / 'sealing.key'}"]
    wrong = subprocess.run([*FLDSL, "audit", str(own), *other], capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 3 and "is not the one that sealed this file" in wrong.stderr
