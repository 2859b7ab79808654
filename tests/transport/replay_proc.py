"""A client that replays a captured, genuine certificate at Hello in a loop (not a test module).

    python replay_proc.py BOOTSTRAP_TARGET CERT_PEM_FILE CLAIMED_NODE PEER_NODE SECONDS

CERT_PEM_FILE is a genuine RA-TLS certificate of CLAIMED_NODE (still valid; an earlier incarnation's).
The replayer does not have its private key: it plays the handshake as well as it can, asking a fresh
challenge each time and signing it with a key of its own. Runs SECONDS seconds, as fast as it can, on one
channel, then prints ``SENT <n> OK <n> REFUSED <n> ERRORS <n>`` (replies, accepted, refused; calls that
got no reply) and ``LAST <reason of the last refusal>``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fldsl.runtime.transport import fldsl_pb2 as pb
from fldsl.runtime.transport import fldsl_pb2_grpc as pb_grpc
from transport.conftest import make_test_identity


def request(stub: pb_grpc.BootstrapStub, copied: bytes, claimed: str, peer: str, key_pem: bytes) -> object:
    try:
        from fldsl.runtime.transport import handshake
    except ImportError:  # a bootstrap without challenges: the certificate is all there is to send
        return pb.HelloRequest(cert_pem=copied, node_id=claimed, expect_node=peer)
    challenge = stub.Challenge(pb.ChallengeRequest(), timeout=5).challenge
    return handshake.hello_request(copied, key_pem, node_id=claimed, expect_node=peer, challenge=challenge)


def main() -> int:
    target, cert_file, claimed, peer, seconds = sys.argv[1:6]
    copied = Path(cert_file).read_bytes()
    own_key = make_test_identity(claimed).key_pem  # the attacker's key: not the certificate's
    sent = ok = refused = errors = 0
    last = ""
    deadline = time.monotonic() + float(seconds)
    print("REPLAYING", flush=True)
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.BootstrapStub(ch)
        while time.monotonic() < deadline:
            try:
                reply = stub.Hello(request(stub, copied, claimed, peer, own_key), timeout=5)
            except grpc.RpcError:
                errors += 1  # e.g. the acceptor already ended
                time.sleep(0.01)
                continue
            sent += 1
            if reply.ok:
                ok += 1
            else:
                refused += 1
                last = reply.reason
    print(f"SENT {sent} OK {ok} REFUSED {refused} ERRORS {errors}", flush=True)
    print(f"LAST {last}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
