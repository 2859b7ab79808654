"""The audit record at the transport: two real transports (sim RA-TLS) with audit logs attached; what the
policy refuses is recorded as a refusal by the side that refused, never as a crossing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fldsl.artifacts import TensorSpec
from fldsl.runtime.audit import AuditLog
from fldsl.runtime.audit_report import PartyKeys, build_report
from fldsl.runtime.transport import FlowRefused

from .conftest import A, B, Trust, flow, make_addresses, make_transport, pair_flows


def _keys(trust: Trust) -> PartyKeys:
    from fldsl.runtime.attestation.sim import SimDeployment

    dep = SimDeployment.load(trust.dir)  # one trust folder stands for both parties here
    return PartyKeys(sealing=dict.fromkeys(("media", "shop"), dep.sealing_key),
                     sim_roots=dict.fromkeys(("media", "shop"), dep.root_cert_pem))


def test_refused_flow_is_a_refusal_not_a_crossing(trust: Trust, tmp_path: Path) -> None:
    from fldsl.runtime.attestation.sim import SimDeployment

    # A's policy has a flow B's policy does not: A's guard lets it go, B's refuses it on arrival.
    rogue = flow("rogue", A, B, TensorSpec(shape=[None, 16], dtype="float32"), 1 << 20)
    addresses = make_addresses()
    ia, ib = trust.identity(A), trust.identity(B)
    a = make_transport(A, ia, trust.verifier(), addresses, [*pair_flows(), rogue])
    b = make_transport(B, ib, trust.verifier(), addresses, pair_flows())
    root = SimDeployment.load(trust.dir).sealing_key
    logs = [AuditLog(tmp_path, node_id=t.node_id, sealing_root=root, policy=t.policy, identity=i)
            for t, i in ((a, ia), (b, ib))]
    for t, log in zip((a, b), logs, strict=True):
        t.attach_audit(log)
    a.start()
    b.start()
    try:
        la, lb = a.link(B), b.link(A)
        x = np.ones((8, 16), np.float32)
        la.send("act", 0, x)
        assert np.array_equal(lb.recv("act", 0, timeout=10), x)
        lb.send("grad", 0, x)
        la.recv("grad", 0, timeout=10)
        with pytest.raises(FlowRefused):  # A's own guard: wrong shape, nothing leaves
            la.send("act", 1, np.ones((8, 3), np.float32))
        la.send("rogue", 1, x)
        with pytest.raises(FlowRefused):
            lb.recv("act", 1, timeout=10)
    finally:
        a.close(flush_timeout=1.0)
        b.close(flush_timeout=1.0)
        for log in logs:
            log.close()
    report = build_report([tmp_path], _keys(trust))
    crossed = {f.flow: f for bd in report.boundaries for f in bd.flows}
    assert (crossed["act"].sent, crossed["act"].received, crossed["act"].matched) == (1, 1, 1)
    assert (crossed["grad"].sent, crossed["grad"].received, crossed["grad"].matched) == (1, 1, 1)
    assert crossed["rogue"].received == 0 and crossed["rogue"].matched == 0
    assert crossed["rogue"].allowed == "float32[?, 16]"  # A's policy allowed it; B's did not
    refusals = {(r.node, r.direction, r.flow) for r in report.refusals}
    assert (A, "send", "act") in refusals  # A's guard refused the wrong shape before sending
    assert (B, "recv", "rogue") in refusals  # B refused the undeclared flow on arrival
    assert (A, "peer", "rogue") in refusals  # and told A, who recorded the peer's refusal
    # No error: each record verifies; the rogue message is a warning (sent, never received).
    assert report.ok, report.findings
    assert [f.record is not None and "never received" in f.message for f in report.findings] == [True]
    # Every message record names the peer as verified at the handshake.
    assert {s.node for s in report.signers} == {A, B}
    assert all(s.attested_by for s in report.signers)
