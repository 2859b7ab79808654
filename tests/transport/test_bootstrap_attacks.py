"""The red team's attacks on the bootstrap port, against real node processes on loopback.

1. A client that opens Hello calls whose body never arrives must not stop genuine peers from attesting.
2. A captured genuine certificate replayed at Hello (without its key) must never replace the pinned one,
   nor keep the genuine peer from connecting or reconnecting.
3. A corrupted or forged Hello reply is not the peer's verdict: it must not end the run as a trust failure.

Processes: the acceptor shop.trainer (peer_proc.py), the dialer media.trainer (dialer_proc.py, which exits
as a node does: 3 for a trust failure, 1 otherwise) and the attacker (stall_proc.py, replay_proc.py,
hello_mitm_proc.py).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from fldsl.runtime.transport import Addresses, NodeAddress, save_addresses
from fldsl.runtime.transport import fldsl_pb2 as pb
from fldsl.runtime.transport import fldsl_pb2_grpc as pb_grpc

from .conftest import A, B, Pair, Trust, free_port, make_addresses

HERE = Path(__file__).parent


@dataclass
class Procs:
    """Every process a test started, stopped (by its own pid) at the end."""

    tmp: Path
    started: list[subprocess.Popen[str]] = field(default_factory=list)

    def spawn(self, script: str, *args: object, wait_for: str | None = None) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, str(HERE / script), *map(str, args)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.started.append(proc)
        if wait_for is not None:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if wait_for not in line:
                proc.kill()
                _, err = proc.communicate()
                raise AssertionError(f"{script} did not start: {line!r}\n{err[-3000:]}")
        return proc

    def acceptor(self, trust: Trust, addresses: Addresses) -> subprocess.Popen[str]:
        path = self.tmp / "addresses-b.json"
        save_addresses(addresses, path)
        return self.spawn("peer_proc.py", trust.dir, path, B, 0, wait_for="READY")

    def dialer(self, trust: Trust, addresses: Addresses, timeout: float, steps: int = 3,
               flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        path = self.tmp / "addresses-a.json"
        save_addresses(addresses, path)
        proc = self.spawn("dialer_proc.py", trust.dir, path, timeout, steps, *flags)
        out, err = proc.communicate(timeout=timeout + 60)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    @staticmethod
    def finish(proc: subprocess.Popen[str], timeout: float = 15) -> tuple[str, str]:
        """SIGTERM (the attackers print their counts on it) and collect the output."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.communicate()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        for proc in p.started:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def _connected_within(result: subprocess.CompletedProcess[str]) -> float:
    assert result.returncode == 0, \
        f"dialer exit {result.returncode}\n{result.stdout}\n{result.stderr[-3000:]}"
    found = re.search(r"CONNECTED ([0-9.]+)", result.stdout)
    assert found and "DONE" in result.stdout, result.stdout
    return float(found.group(1))


def _acceptor_ended_cleanly(procs: Procs, acceptor: subprocess.Popen[str]) -> None:
    out, err = procs.finish(acceptor, timeout=30)
    assert acceptor.returncode in (0, -signal.SIGTERM), f"{out}\n{err[-3000:]}"


# --------------------------------------------------------------------------------------------------------
# 1. Stalled Hello calls
# --------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("source", "connections", "streams"), [
    ("127.0.0.1", 1, 64),  # the red team's attack: one connection, many calls, from the peers' own address
    ("127.0.0.2", 6, 16),  # many connections from another address: the per-source limit holds them
], ids=["one-connection-same-address", "many-connections-other-address"])
def test_stalled_hello_calls_do_not_stop_genuine_peers(
    trust: Trust, procs: Procs, source: str, connections: int, streams: int,
) -> None:
    addresses = make_addresses()
    acceptor = procs.acceptor(trust, addresses)
    boot = addresses[B]
    staller = procs.spawn("stall_proc.py", boot.host, boot.bootstrap_port, connections, streams, source,
                          wait_for="STALLING")
    time.sleep(1.0)  # the stalled calls are in place before the genuine peer comes
    seconds = _connected_within(procs.dialer(trust, addresses, timeout=20))
    assert seconds < 6, f"the genuine peer needed {seconds:.1f} s to attest and connect"
    assert staller.poll() is None, "the attacker gave up: the attack was not sustained"
    out, _ = procs.finish(staller)
    opened = int(re.search(r"OPENED (\d+)", out).group(1))  # type: ignore[union-attr]
    assert opened >= connections * streams, out
    _acceptor_ended_cleanly(procs, acceptor)


# --------------------------------------------------------------------------------------------------------
# 2. Replayed certificates
# --------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_replayed_certificate_neither_evicts_nor_blocks_the_genuine_peer(
    trust: Trust, procs: Procs, tmp_path: Path,
) -> None:
    addresses = make_addresses()
    acceptor = procs.acceptor(trust, addresses)
    captured = tmp_path / "captured-a.pem"
    captured.write_bytes(trust.identity(A).cert_pem)  # an earlier incarnation's genuine, valid certificate
    replayer = procs.spawn("replay_proc.py", addresses[B].bootstrap_target(), captured, A, B, 15,
                           wait_for="REPLAYING")
    time.sleep(0.5)
    # The genuine dialer connects and crashes; restarted (fresh key and certificate), it reconnects and the
    # acceptor carries on with it, all while the replay runs: neither is evicted from the pinned roots.
    for first, flags in ((0, ("--crash",)), (10, ())):
        result = procs.dialer(trust, addresses, timeout=20, steps=10,
                              flags=("--first-step", str(first), *flags))
        seconds = _connected_within(result)
        assert seconds < 6, f"the genuine peer needed {seconds:.1f} s to attest and connect"
    out, err = replayer.communicate(timeout=60)
    counts = re.search(r"SENT (\d+) OK (\d+) REFUSED (\d+)", out)
    assert counts, out + err[-3000:]
    sent, ok, refused = map(int, counts.groups())
    assert sent >= 50 and ok == 0 and refused >= sent, out  # replayed a lot, never accepted
    assert "possession" in out and "challenge" in out, out  # the refusal says why
    _acceptor_ended_cleanly(procs, acceptor)


def test_replay_leaves_the_pinned_certificate_in_place(pair: Pair) -> None:
    """In-process view of the same attack: the registry still pins the live certificate afterwards."""
    from fldsl.runtime.transport import handshake

    pair.a.link(B, timeout=15)
    registry = pair.b._server.registry  # type: ignore[union-attr]
    live = pair.a._identity.cert_pem
    old = pair.trust.identity(A)  # a genuine certificate of an earlier incarnation
    attacker_key = pair.trust.identity(A).key_pem  # a key, but not that certificate's
    with grpc.insecure_channel(pair.addresses[B].bootstrap_target()) as ch:
        stub = pb_grpc.BootstrapStub(ch)
        for _ in range(20):
            challenge = stub.Challenge(pb.ChallengeRequest(), timeout=5).challenge
            reply = stub.Hello(handshake.hello_request(
                old.cert_pem, attacker_key, node_id=A, expect_node=B, challenge=challenge), timeout=5)
            assert not reply.ok and reply.field == "possession", reply.reason
        assert registry.node_of(live) == A and registry.node_of(old.cert_pem) is None
        # Whoever holds the key (a restarted peer) replaces the pin once; its Hello replayed does not.
        challenge = stub.Challenge(pb.ChallengeRequest(), timeout=5).challenge
        genuine = handshake.hello_request(old.cert_pem, old.key_pem, node_id=A, expect_node=B,
                                          challenge=challenge)
        assert stub.Hello(genuine, timeout=5).ok
        again = stub.Hello(genuine, timeout=5)
        assert not again.ok and again.field == "challenge" and "already used" in again.reason
    assert registry.node_of(old.cert_pem) == A


# --------------------------------------------------------------------------------------------------------
# 3. Corrupted and forged Hello replies
# --------------------------------------------------------------------------------------------------------


def _behind_mitm(procs: Procs, trust: Trust, mode: str, seconds: float) -> tuple[Addresses, int]:
    """The acceptor at its real address; the dialer's view of it with a MITM on the bootstrap port."""
    real = make_addresses()
    procs.acceptor(trust, real)
    mitm_port = free_port()
    procs.spawn("hello_mitm_proc.py", mitm_port, real[B].bootstrap_target(), mode, seconds,
                wait_for="LISTENING")
    b = real[B]
    seen_by_a = Addresses({A: real[A], B: NodeAddress(host=b.host, port=b.port, bootstrap_port=mitm_port)})
    return seen_by_a, mitm_port


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["flip", "refuse"])
def test_tampered_replies_then_the_genuine_path_connects(trust: Trust, procs: Procs, mode: str) -> None:
    addresses, _ = _behind_mitm(procs, trust, mode, seconds=3)
    result = procs.dialer(trust, addresses, timeout=30)
    assert result.returncode != 3, f"a tampered reply ended the run as a trust failure:\n{result.stdout}"
    _connected_within(result)


@pytest.mark.timeout(120)
def test_forged_refusal_until_the_deadline_is_a_network_failure_quoting_the_text(
    trust: Trust, procs: Procs,
) -> None:
    addresses, mitm_port = _behind_mitm(procs, trust, "refuse", seconds=-1)
    result = procs.dialer(trust, addresses, timeout=4)
    out = result.stdout
    assert result.returncode == 1, f"exit {result.returncode}:\n{out}\n{result.stderr[-2000:]}"
    assert "trust failure" not in out and f"127.0.0.1:{mitm_port}" in out, out
    said = re.search(r'peer said: "([^"]*)"', out)
    assert said, out
    assert "YOUR NODE IS COMPROMISED" in said.group(1)  # quoted for the operator...
    assert not re.search(r"[\x00-\x1f\x7f]", said.group(1)) and len(said.group(1)) <= 300  # ...defanged


@pytest.mark.timeout(120)
def test_a_genuine_refusal_through_the_same_path_is_still_a_trust_failure(trust: Trust, procs: Procs) -> None:
    """Through a MITM that forwards faithfully: the attested acceptor's refusal is signed, so it is final."""
    addresses, _ = _behind_mitm(procs, trust, "flip", seconds=0)
    result = procs.dialer(trust, addresses, timeout=30, steps=1, flags=("--bad-mr",))
    assert result.returncode == 3, f"exit {result.returncode}:\n{result.stdout}\n{result.stderr[-2000:]}"
    assert "mr_enclave" in result.stdout and f"refused by {B}" in result.stdout, result.stdout
    assert "peer said" not in result.stdout


@pytest.mark.timeout(60)
def test_evidence_we_cannot_verify_decides_only_at_the_connect_deadline(trust: Trust, tmp_path: Path) -> None:
    """B runs with another deployment's trust material: each side refuses the other's quote. Anyone can
    make a certificate whose quote does not verify, so neither refusal ends a run at once; at the connect
    deadline, both sides report the trust failure (the same outcome on both, whoever gives up first)."""
    from fldsl.runtime.attestation.verify import PeerRefused
    from fldsl.runtime.transport import PeerUnreachable

    from .conftest import make_transport, make_trust

    other = make_trust(tmp_path / "other")
    addresses = make_addresses()
    b = make_transport(B, other.identity(B), other.verifier(), addresses, connect_timeout_s=4)
    a = make_transport(A, trust.identity(A), trust.verifier(), addresses, connect_timeout_s=4)
    b.start()
    a.start()
    try:
        for link in (a.links[B], b.links[A]):
            with pytest.raises(PeerUnreachable):  # not decided yet: still retried
                link.wait_connected(1.0)
        for t, peer in ((a, B), (b, A)):
            with pytest.raises(PeerRefused) as err:
                t.link(peer, timeout=15)
            assert err.value.field == "quote", err.value
    finally:
        a.close()
        b.close()
