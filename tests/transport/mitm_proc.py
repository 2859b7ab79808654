"""A would-be man in the middle, in its own process (not a test module).

    python mitm_proc.py BOOTSTRAP_TARGET SECURE_TARGET COPIED_CERT_PEM_FILE CLAIMED_NODE PEER_NODE

Has its own private key and a copied (genuine, attested) certificate of CLAIMED_NODE. Presents the copy
at Hello (signing the fresh challenge with its own key, all it can do), then tries to open the mutual-TLS
Exchange stream with it. Prints ``HELLO ok|refused <field>`` and ``EXCHANGE <grpc status code name>``
(or ``EXCHANGE OPEN`` if it got a frame: that would be a breach).
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fldsl.runtime.transport import fldsl_pb2 as pb
from fldsl.runtime.transport import fldsl_pb2_grpc as pb_grpc
from fldsl.runtime.transport import handshake
from fldsl.runtime.transport.server import EXCHANGE_METHOD
from transport.conftest import make_test_identity


def main() -> int:
    boot, secure, cert_file, claimed, peer = sys.argv[1:6]
    copied = Path(cert_file).read_bytes()
    own = make_test_identity(claimed)  # the attacker's own key (and a certificate it could make itself)
    with grpc.insecure_channel(boot) as ch:
        stub = pb_grpc.BootstrapStub(ch)
        challenge = stub.Challenge(pb.ChallengeRequest(), timeout=10).challenge
        reply = stub.Hello(handshake.hello_request(copied, own.key_pem, node_id=claimed, expect_node=peer,
                                                   challenge=challenge), timeout=10)
    print("HELLO", "ok" if reply.ok else f"refused {reply.field}", flush=True)
    creds = grpc.ssl_channel_credentials(root_certificates=reply.cert_pem, private_key=own.key_pem,
                                         certificate_chain=copied)
    with grpc.secure_channel(secure, creds, options=[("grpc.ssl_target_name_override", peer)]) as ch:
        call = ch.stream_stream(EXCHANGE_METHOD)(iter([]), timeout=5)
        try:
            for _ in call:
                print("EXCHANGE OPEN", flush=True)
                return 0
            print("EXCHANGE ENDED", flush=True)
        except grpc.RpcError as e:
            print("EXCHANGE", e.code().name, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
