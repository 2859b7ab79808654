"""Two real processes: the acceptor is killed and restarted (fresh key, fresh certificate, same ports);
the dialer re-attests, reconnects, and traffic continues; pending receives survive the restart."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fldsl.runtime.transport import PeerUnreachable, TransportError, save_addresses

from .conftest import A, B, Trust, make_addresses, make_transport

PROC = Path(__file__).with_name("peer_proc.py")


def _spawn(trust: Trust, addresses_file: Path, first_step: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(PROC), str(trust.dir), str(addresses_file), B, str(first_step)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "READY" not in line:
        proc.kill()
        raise AssertionError(f"peer process did not start: {line}{proc.stderr.read() if proc.stderr else ''}")
    return proc


def _roundtrip(link, step: int) -> None:
    x = np.full((8, 16), step, np.float32)
    link.send("act", step, x)
    np.testing.assert_array_equal(link.recv("grad", step, timeout=30), -x)


@pytest.mark.timeout(120)
def test_acceptor_process_restart_dialer_reconnects(trust: Trust, tmp_path: Path) -> None:
    addresses = make_addresses()
    addresses_file = tmp_path / "addresses.json"
    save_addresses(addresses, addresses_file)
    proc = _spawn(trust, addresses_file, 0)
    a = make_transport(A, trust.identity(A), trust.verifier(), addresses, connect_timeout_s=60)
    reconnected = threading.Event()
    generations: list[int] = []
    try:
        a.start()
        link = a.link(B, timeout=30)
        link.on_reconnect(lambda gen: (generations.append(gen), reconnected.set()))
        first_cert = link.peer_summary
        for step in range(3):
            _roundtrip(link, step)

        pending: list[np.ndarray] = []
        waiter = threading.Thread(target=lambda: pending.append(link.recv("grad", 100, timeout=60)))
        waiter.start()  # waits across the restart

        proc.kill()
        proc.wait(10)
        proc = _spawn(trust, addresses_file, 100)
        assert reconnected.wait(30), "the dialer did not reconnect to the restarted acceptor"
        assert generations == [2] and link.generation == 2
        assert first_cert  # the restarted peer was verified again (fresh certificate)

        link.send("act", 100, np.ones((8, 16), np.float32))
        waiter.join(30)
        assert pending and float(pending[0][0, 0]) == -1.0
        for step in range(101, 104):
            _roundtrip(link, step)
    finally:
        a.close()
        try:
            _out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            _out, err = proc.communicate()
    assert proc.returncode == 0, err[-2000:]


def test_dialer_restart_acceptor_accepts_new_incarnation(trust: Trust) -> None:
    addresses = make_addresses()
    b = make_transport(B, trust.identity(B), trust.verifier(), addresses)
    b.start()
    a1 = make_transport(A, trust.identity(A), trust.verifier(), addresses)
    a1.start()
    try:
        lb = b.link(A, timeout=15)
        a1.link(B, timeout=15).send("act", 0, np.ones((1, 16), np.float32))
        assert lb.recv("act", 0, timeout=10).shape == (1, 16)
        a1.close()
        a2 = make_transport(A, trust.identity(A), trust.verifier(), addresses)  # fresh key and certificate
        a2.start()
        try:
            a2.link(B, timeout=15).send("act", 1, np.ones((2, 16), np.float32))
            assert lb.recv("act", 1, timeout=15).shape == (2, 16)
            assert lb.generation == 2
        finally:
            a2.close()
    finally:
        b.close()


def test_start_order_does_not_matter_dialer_first(trust: Trust) -> None:
    addresses = make_addresses()
    a = make_transport(A, trust.identity(A), trust.verifier(), addresses)
    b = make_transport(B, trust.identity(B), trust.verifier(), addresses)
    a.start()  # dials a port nobody listens on yet: retried with backoff
    try:
        time.sleep(1.5)
        b.start()
        a.link(B, timeout=15).send("act", 0, np.ones((1, 16), np.float32))
        assert b.link(A, timeout=15).recv("act", 0, timeout=10).shape == (1, 16)
    finally:
        a.close()
        b.close()


def test_unreachable_peer_fails_after_connect_timeout_with_address(trust: Trust) -> None:
    addresses = make_addresses()
    a = make_transport(A, trust.identity(A), trust.verifier(), addresses, connect_timeout_s=1.5)
    a.start()
    try:
        with pytest.raises(PeerUnreachable) as err:
            a.link(B, timeout=15)
        msg = str(err.value)
        assert "could not connect to shop.trainer" in msg and addresses[B].bootstrap_target() in msg
        assert "UNAVAILABLE" in msg  # the last error says what went wrong
    finally:
        a.close()


def test_port_already_in_use_is_a_clear_error(pair) -> None:
    # SO_REUSEPORT is off: a second process on the same port fails loudly instead of sharing it.
    twin = make_transport(B, pair.trust.identity(B), pair.trust.verifier(), pair.addresses)
    with pytest.raises(TransportError, match=r"cannot listen on 127\.0\.0\.1:\d+"):
        twin.start()
