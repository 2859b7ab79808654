"""Micro benchmark: 4 MiB float32 tensors over the attested transport vs plain gRPC + mutual TLS.

    /work/venv/bin/python bench/transport_bench.py [--reps 5] [--mib-per-rep 128] [--tensor-mib 4]

Sender = this process, receiver = a child process (one
stream, the client streams without waiting for acks). Both configurations run interleaved in every rep
and use the same kind of certificates (sim RA-TLS, P-256):

- ``plain``: a bare gRPC bidi stream over mutual TLS with identity serializers; per message the client
  does ``arr.tobytes()`` and the server ``np.frombuffer`` and answers an 8-byte ack (the baseline's
  "4MB bidi_pipelined raw" configuration, ~545 MB/s on the project's box).
- ``attested``: ``Transport``/``PeerLink`` between two sim-attested nodes: ``link.send`` per tensor,
  ``link.recv`` per step on the receiver (policy-checked), one small reply when all arrived.

Then, per rep, a lock-step phase (the split-learning pattern): 200 x 16 KiB tensors, each answered before
the next is sent; prints the mean round trip of both configurations.

Prints MB/s (10^6 bytes/s) per rep, the medians and the attested/plain ratio (paired median).

``--audit``: both attested nodes keep the audit record a node keeps in a run (``fldsl.runtime.audit``: per
message a SHA-256 of the payload, an ECDSA signature, a sealed line appended and flushed), so the ratio
then includes its cost.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from fldsl.artifacts import AttestationRequirement, Flow, Identity, PeerRef, Pins, Policy, TensorSpec
from fldsl.runtime.transport import Addresses, NodeAddress, Transport, load_addresses, save_addresses

A, B = "media.trainer", "shop.trainer"
ROWS_PER_MIB = 1024 * 1024 // (16 * 4)
PLAIN_METHOD = "/bench.Plain/Upload"
# Lock-step phase (the split-learning pattern): small tensors, each answered before the next is sent.
LOCKSTEP_MESSAGES = 200
LOCKSTEP_ROWS = 256  # 256 x 16 float32 = 16 KiB
LOCKSTEP_BASE = 1_000_000


# -------------------------------------------------------------------------------------------------------
# Shared set-up (both processes derive the same deployment from the trust dir)
# -------------------------------------------------------------------------------------------------------


def _pins() -> tuple[Pins, dict[str, bytes]]:
    mr = {n: hashlib.sha256(f"bench {n}".encode()).digest() for n in (A, B)}
    pins = Pins(pipeline="bench", nodes={
        n: Identity(mr_enclave=[m.hex()], isv_prod_id=1, isv_svn_min=1) for n, m in mr.items()})
    return pins, mr


def _identity_and_verifier(trust_dir: Path, node: str) -> tuple[Any, Any]:
    from fldsl.runtime.attestation.ratls import make_identity
    from fldsl.runtime.attestation.sim import SimDeployment, trust_init
    from fldsl.runtime.attestation.verify import PeerVerifier

    trust_init(trust_dir)
    dep = SimDeployment.load(trust_dir)
    pins, mr = _pins()
    ident = make_identity(dep.backend(mr_enclave=mr[node], isv_prod_id=1, isv_svn=1, debug=False),
                          node_id=node, pins_digest=pins.digest())
    verifier = PeerVerifier(pins, AttestationRequirement(mode="sim"),
                            sim_roots=dict.fromkeys(pins.parties(), dep.root_cert_pem),
                            own_pins_digest=pins.digest())
    return ident, verifier


def _policy(node: str) -> Policy:
    flows = [
        Flow(id="act", tensor="act", kind="activation", src=A, dst=B,
             spec=TensorSpec(shape=[None, 16], dtype="float32"), max_bytes=1 << 30,
             rule="allow media -> shop"),
        Flow(id="done", tensor="done", kind="control", src=B, dst=A,
             spec=TensorSpec(shape=[1], dtype="int64"), max_bytes=64, rule="allow shop -> media"),
    ]
    return Policy(pipeline="bench", node=node, attestation=AttestationRequirement(mode="sim"),
                  accept_peers=[B if node == A else A], flows=flows, max_message_bytes=4 * 1024 * 1024)


SEND_BUFFER = [None]  # --send-buffer-mib (None = the Transport default)
AUDIT: list[Path | None] = [None]  # --audit: the folder the attested nodes' audit records go to


def _transport(trust_dir: Path, node: str, addresses: Addresses) -> Transport:
    ident, verifier = _identity_and_verifier(trust_dir, node)
    other = B if node == A else A
    t = Transport(node_id=node, policy=_policy(node), peers=[PeerRef(id=other, party="x", dial=node == A)],
                  identity=ident, verifier=verifier, addresses=addresses, connect_timeout_s=60,
                  **({} if SEND_BUFFER[0] is None else {"send_buffer_bytes": SEND_BUFFER[0]}))
    if AUDIT[0] is not None:
        from fldsl.runtime.attestation.sim import SimDeployment
        from fldsl.runtime.audit import AuditLog

        root = SimDeployment.load(trust_dir).sealing_key
        t.attach_audit(AuditLog(AUDIT[0], node_id=node, sealing_root=root, policy=t.policy, identity=ident))
    return t


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -------------------------------------------------------------------------------------------------------
# Receiver processes
# -------------------------------------------------------------------------------------------------------


def serve_attested(trust_dir: Path, addresses_file: Path, messages: int, reps: int) -> None:
    t = _transport(trust_dir, B, load_addresses(addresses_file))
    t.start()
    print("READY", flush=True)
    link = t.link(A)
    for rep in range(reps):
        for i in range(messages):
            x = link.recv("act", rep * messages + i, timeout=300)
            assert x.shape[1] == 16
        link.send("done", rep, np.array([messages], np.int64))
        for i in range(LOCKSTEP_MESSAGES):  # lock-step phase: answer every message
            step = LOCKSTEP_BASE + rep * LOCKSTEP_MESSAGES + i
            link.recv("act", step, timeout=300)
            link.send("done", step, np.array([i], np.int64))
    t.close()


def serve_plain(trust_dir: Path, port: int) -> None:
    ident, _ = _identity_and_verifier(trust_dir, B)
    client_ident, _ = _identity_and_verifier(trust_dir, A)  # pinned client root, as the transport does

    def upload(request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for data in request_iterator:
            arr = np.frombuffer(data, dtype=np.float32)
            yield arr.nbytes.to_bytes(8, "little")

    server = grpc.server(futures.ThreadPoolExecutor(4), options=[
        ("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Plain", {"Upload": grpc.stream_stream_rpc_method_handler(upload)}),))
    creds = grpc.ssl_server_credentials(
        [(ident.key_pem, ident.cert_pem)], root_certificates=client_ident.cert_pem, require_client_auth=True)
    server.add_secure_port(f"127.0.0.1:{port}", creds)
    server.start()
    (trust_dir / "plain_client_key.pem").write_bytes(client_ident.key_pem)
    (trust_dir / "plain_client_cert.pem").write_bytes(client_ident.cert_pem)
    (trust_dir / "plain_server_cert.pem").write_bytes(ident.cert_pem)
    print("READY", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.stop(0)


# -------------------------------------------------------------------------------------------------------
# Sender (this process)
# -------------------------------------------------------------------------------------------------------


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux /proc), summed over its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Meter:
    """MB/s plus CPU seconds per GB spent by sender (this process) and receiver (a child)."""

    def __init__(self, receiver_pid: int) -> None:
        self.pid = receiver_pid
        self.mbps: list[float] = []
        self.send_cpu: list[float] = []
        self.recv_cpu: list[float] = []

    def run(self, nbytes: int, fn: Callable[[], None]) -> None:
        c0, r0, t0 = time.process_time(), _cpu_s(self.pid), time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        gb = nbytes / 1e9
        self.mbps.append(nbytes / dt / 1e6)
        self.send_cpu.append((time.process_time() - c0) / gb)
        self.recv_cpu.append((_cpu_s(self.pid) - r0) / gb)


def run_plain(trust_dir: Path, port: int, tensor: np.ndarray, messages: int) -> None:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(trust_dir / "plain_server_cert.pem").read_bytes(),
        private_key=(trust_dir / "plain_client_key.pem").read_bytes(),
        certificate_chain=(trust_dir / "plain_client_cert.pem").read_bytes())
    opts = [("grpc.ssl_target_name_override", B), ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20)]
    with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=opts) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        call = ch.stream_stream(PLAIN_METHOD)
        acks = sum(1 for _ in call(tensor.tobytes() for _ in range(messages)))
    assert acks == messages


def plain_lockstep_ms(trust_dir: Path, port: int) -> float:
    """Mean round trip (ms) of a 16 KiB message and its 8-byte ack on one plain mTLS bidi stream."""
    import queue

    creds = grpc.ssl_channel_credentials(
        root_certificates=(trust_dir / "plain_server_cert.pem").read_bytes(),
        private_key=(trust_dir / "plain_client_key.pem").read_bytes(),
        certificate_chain=(trust_dir / "plain_client_cert.pem").read_bytes())
    small = np.ones((LOCKSTEP_ROWS, 16), np.float32)
    opts = [("grpc.ssl_target_name_override", B)]
    with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=opts) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        q: queue.Queue[bytes | None] = queue.Queue()
        responses = ch.stream_stream(PLAIN_METHOD)(iter(q.get, None))
        t0 = time.perf_counter()
        for _ in range(LOCKSTEP_MESSAGES):
            q.put(small.tobytes())
            next(responses)
        dt = time.perf_counter() - t0
        q.put(None)
        for _ in responses:
            pass
    return dt / LOCKSTEP_MESSAGES * 1e3


def attested_lockstep_ms(t: Transport, rep: int) -> float:
    link = t.link(B)
    small = np.ones((LOCKSTEP_ROWS, 16), np.float32)
    t0 = time.perf_counter()
    for i in range(LOCKSTEP_MESSAGES):
        step = LOCKSTEP_BASE + rep * LOCKSTEP_MESSAGES + i
        link.send("act", step, small)
        link.recv("done", step, timeout=60)
    return (time.perf_counter() - t0) / LOCKSTEP_MESSAGES * 1e3


def run_attested(t: Transport, tensor: np.ndarray, messages: int, rep: int) -> None:
    link = t.link(B)
    for i in range(messages):
        link.send("act", rep * messages + i, tensor)
    link.recv("done", rep, timeout=300)


def _spawn(args: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "READY" not in line:
        proc.kill()
        raise SystemExit(f"receiver did not start: {line!r}")
    return proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--mib-per-rep", type=int, default=128)
    ap.add_argument("--tensor-mib", type=int, default=4)
    ap.add_argument("--send-buffer-mib", type=int, help="Transport send buffer (default: Transport's)")
    ap.add_argument("--audit", action="store_true", help="the attested nodes keep their audit record")
    ap.add_argument("--audit-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--role", choices=["attested", "plain"], help=argparse.SUPPRESS)
    ap.add_argument("--trust", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--addresses", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    messages = max(1, args.mib_per_rep // args.tensor_mib)
    if args.send_buffer_mib is not None:
        SEND_BUFFER[0] = args.send_buffer_mib * 1024 * 1024
    AUDIT[0] = args.audit_dir
    if args.role == "attested":
        serve_attested(args.trust, args.addresses, messages, args.reps)
        return
    if args.role == "plain":
        serve_plain(args.trust, args.port)
        return

    tensor = np.random.default_rng(0).standard_normal((args.tensor_mib * ROWS_PER_MIB, 16), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        trust_dir = Path(tmp) / "trust"
        _identity_and_verifier(trust_dir, A)  # create the deployment once, before the children read it
        addresses = Addresses({
            n: NodeAddress(host="127.0.0.1", port=_free_port(), bootstrap_port=_free_port()) for n in (A, B)})
        addresses_file = Path(tmp) / "addresses.json"
        save_addresses(addresses, addresses_file)
        plain_port = _free_port()
        common = ["--trust", str(trust_dir), "--mib-per-rep", str(args.mib_per_rep),
                  "--tensor-mib", str(args.tensor_mib), "--reps", str(args.reps)]
        if args.audit:
            AUDIT[0] = Path(tmp) / "run"
            common += ["--audit-dir", str(AUDIT[0])]
        plain_proc = _spawn(["--role", "plain", "--port", str(plain_port), *common])
        att_proc = _spawn(["--role", "attested", "--addresses", str(addresses_file), *common])
        t = _transport(trust_dir, A, addresses)
        t.start()
        pm, am = Meter(plain_proc.pid), Meter(att_proc.pid)
        plain_rtt: list[float] = []
        att_rtt: list[float] = []
        nbytes = messages * tensor.nbytes
        try:
            t.link(B)
            for rep in range(args.reps):
                pm.run(nbytes, lambda: run_plain(trust_dir, plain_port, tensor, messages))
                am.run(nbytes, lambda rep=rep: run_attested(t, tensor, messages, rep))
                print(f"rep {rep}: plain gRPC+mTLS {pm.mbps[-1]:7.1f} MB/s   "
                      f"attested link {am.mbps[-1]:7.1f} MB/s", flush=True)
                plain_rtt.append(plain_lockstep_ms(trust_dir, plain_port))
                att_rtt.append(attested_lockstep_ms(t, rep))
        finally:
            t.close()
            assert plain_proc.stdin is not None
            plain_proc.stdin.close()
            plain_proc.wait(10)
            att_proc.wait(30)
    plain, attested = pm.mbps, am.mbps
    ratios = [a / p for a, p in zip(attested, plain, strict=True)]
    print(f"\n{args.tensor_mib} MiB float32 tensors, {messages} per rep, {args.reps} reps, one stream, "
          "pipelined")
    print(f"plain gRPC + mutual TLS (raw bytes): median {statistics.median(plain):7.1f} MB/s  "
          f"{[round(x) for x in plain]}")
    print(f"attested PeerLink (policed):         median {statistics.median(attested):7.1f} MB/s  "
          f"{[round(x) for x in attested]}")
    print(f"attested / plain (paired median):    {statistics.median(ratios):.3f}")
    med = statistics.median
    print("CPU seconds per GB moved (median; lower is better; robust to a busy machine):")
    print(f"  plain:    sender {med(pm.send_cpu):.2f}  receiver {med(pm.recv_cpu):.2f}")
    print(f"  attested: sender {med(am.send_cpu):.2f}  receiver {med(am.recv_cpu):.2f}")
    print(f"lock-step round trip, {LOCKSTEP_ROWS}x16 float32 (16 KiB) + small reply, median of reps: "
          f"plain {med(plain_rtt):.2f} ms, attested {med(att_rtt):.2f} ms")


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
