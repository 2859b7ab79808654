"""Run-time policing: undeclared or mis-shaped tensors are refused on the receiver, the sender learns why."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from fldsl.artifacts import TensorSpec
from fldsl.runtime.transport import FlowGuard, FlowRefused, TransportError
from fldsl.runtime.transport.guard import WireSpec

from .conftest import A, B, Trust, flow, pair_flows, policy_for, start_pair


def _close(p) -> None:
    p.a.close()
    p.b.close()


def _expect_refused_on_both(p, flow_id: str, send) -> tuple[str, str]:
    """Send with A's (laxer) policy; B must refuse and A must learn why. Returns both messages."""
    la, lb = p.a.link(B, timeout=15), p.b.link(A, timeout=15)
    errors: list[BaseException] = []

    def wait_recv() -> None:
        try:
            lb.recv("act", 99, timeout=15)  # an unrelated pending recv on the receiver
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=wait_recv)
    t.start()
    send(la)
    t.join(20)
    assert errors and isinstance(errors[0], FlowRefused), errors
    receiver_msg = str(errors[0])
    with pytest.raises(FlowRefused) as sender_err:
        la.recv("grad", 0, timeout=15)
    return receiver_msg, str(sender_err.value)


def test_undeclared_flow_refused_by_receiver_and_sender_told(trust: Trust) -> None:
    extra = flow("exfiltrate", A, B, TensorSpec(shape=[None, 16], dtype="float32"), 1 << 20)
    p = start_pair(trust, flows_a=[*pair_flows(), extra])
    try:
        recv_msg, send_msg = _expect_refused_on_both(
            p, "exfiltrate", lambda la: la.send("exfiltrate", 0, np.ones((4, 16), np.float32)))
        assert "'exfiltrate'" in recv_msg and "not declared" in recv_msg and A in recv_msg
        assert f"refused by {B}" in send_msg and "'exfiltrate'" in send_msg and "not declared" in send_msg
        # Fail closed: the link stays refused, even for declared flows.
        with pytest.raises(FlowRefused):
            p.b.link(A).recv("weights", 0, timeout=1)
    finally:
        _close(p)


def test_wrong_shape_refused_with_expected_and_actual(trust: Trust) -> None:
    lax = [f if f.id != "act" else flow("act", A, B, TensorSpec(shape=[None, 8], dtype="float32"), 1 << 20)
           for f in pair_flows()]
    p = start_pair(trust, flows_a=lax)
    try:
        recv_msg, send_msg = _expect_refused_on_both(
            p, "act", lambda la: la.send("act", 0, np.ones((4, 8), np.float32)))
        assert "expects float32[batch, 16], got float32[4, 8]" in recv_msg
        assert "expects float32[batch, 16], got float32[4, 8]" in send_msg
    finally:
        _close(p)


def test_oversized_message_refused(trust: Trust) -> None:
    lax = [f if f.id != "small" else flow("small", A, B, TensorSpec(shape=[None], dtype="int64"), 1 << 20)
           for f in pair_flows()]
    p = start_pair(trust, flows_a=lax)
    try:
        recv_msg, _ = _expect_refused_on_both(p, "small", lambda la: la.send("small", 0, np.arange(1000)))
        assert "at most 32 bytes" in recv_msg and "8000" in recv_msg
    finally:
        _close(p)


def test_sender_checks_its_own_sends(pair) -> None:
    la = pair.a.link(B, timeout=15)
    with pytest.raises(FlowRefused, match=r"'grad' is declared shop\.trainer -> media\.trainer"):
        la.send("grad", 0, np.ones((2, 16), np.float32))
    with pytest.raises(FlowRefused, match=r"'nope' .*not declared.*declared media\.trainer -> shop\.trainer"):
        la.send("nope", 0, np.ones(3))
    with pytest.raises(FlowRefused, match=r"expects float32\[batch, 16\], got float64\[2, 16\]"):
        la.send("act", 0, np.ones((2, 16)))
    with pytest.raises(FlowRefused, match="carries tensors"):
        la.send_blob("act", 0, b"xx")
    # Nothing was sent, so the link is still healthy.
    la.send("act", 1, np.ones((2, 16), np.float32))
    assert pair.b.link(A).recv("act", 1, timeout=10).shape == (2, 16)


def test_guard_rules_unit() -> None:
    g = FlowGuard(policy_for(B, pair_flows()), B)
    spec = [WireSpec("float32", (1000, 16))]
    assert g.check_recv(A, "act", "tensor", spec, 64000).id == "act"
    with pytest.raises(FlowRefused, match=r"this message goes shop\.trainer -> media\.trainer"):
        FlowGuard(policy_for(A, pair_flows()), A).check_recv(B, "act", "tensor", spec, 64000)
    with pytest.raises(FlowRefused, match="expects float32"):
        g.check_recv(A, "act", "tensor", [WireSpec("float32", (16,))], 64)
    assert g.check_recv(A, "weights", "arrays", [WireSpec("float64", (3,)), WireSpec("int8", ())], 25)
    assert g.check_recv(A, "psi", "blob", [], 100)
    with pytest.raises(FlowRefused, match="at most 1048576 bytes"):
        g.check_recv(A, "psi", "blob", [], (1 << 20) + 1)
    with pytest.raises(ValueError, match=r"policy\.json is for"):
        FlowGuard(policy_for(B, pair_flows()), A)


def test_unknown_peer_link_and_string_dtype(pair) -> None:
    with pytest.raises(TransportError, match=r"not a peer of media\.trainer"):
        pair.a.link("evil.node", timeout=1)
    with pytest.raises(TransportError, match="cannot travel as a raw tensor"):
        pair.a.link(B, timeout=15).send("act", 0, np.array([["a"] * 16]))
