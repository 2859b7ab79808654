"""Attestation at Hello, pinned mutual TLS: refusals name the field; copied certificates are useless."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from fldsl.runtime.attestation.verify import PeerRefused
from fldsl.runtime.transport import PeerUnreachable, RemoteRefused, handshake, is_trust_failure
from fldsl.runtime.transport import fldsl_pb2 as pb
from fldsl.runtime.transport import fldsl_pb2_grpc as pb_grpc
from fldsl.runtime.transport.server import EXCHANGE_METHOD

from .conftest import A, B, Pair, Trust, make_addresses, make_test_identity, make_transport


def _hello(target: str, cert_pem: bytes, node: str, expect: str,
           key_pem: bytes | None = None) -> pb.HelloReply:
    """A Hello as a dialer sends it: a fresh challenge, signed with ``key_pem`` (a key of our own when the
    caller has only a copied certificate)."""
    key = key_pem if key_pem is not None else make_test_identity(node).key_pem
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.BootstrapStub(ch)
        challenge = stub.Challenge(pb.ChallengeRequest(), timeout=10).challenge
        return stub.Hello(handshake.hello_request(cert_pem, key, node_id=node, expect_node=expect,
                                                  challenge=challenge), timeout=10)


def _exchange_with(target: str, root: bytes, key: bytes, chain: bytes, name: str = B) -> grpc.RpcError | None:
    """Open Exchange with the given TLS material and wait for the first frame; the error if it fails."""
    creds = grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)
    opts = [("grpc.ssl_target_name_override", name), ("grpc.use_local_subchannel_pool", 1)]
    with grpc.secure_channel(target, creds, options=opts) as ch:
        call = ch.stream_stream(EXCHANGE_METHOD)(iter([]), timeout=5)
        try:
            for _ in call:
                return None
        except grpc.RpcError as e:
            return e
    return None


def _pair_with(trust: Trust, ident_a, ident_b, timeout: float = 10.0):
    addresses = make_addresses()
    a = make_transport(A, ident_a, trust.verifier(), addresses, connect_timeout_s=timeout)
    b = make_transport(B, ident_b, trust.verifier(), addresses, connect_timeout_s=timeout)
    b.start()
    a.start()
    return a, b


def test_wrongly_attested_dialer_refused_at_hello_with_field(trust: Trust) -> None:
    bad = trust.identity(A, mr_enclave=b"\x66" * 32)  # runs other code than was compiled for A
    a, b = _pair_with(trust, bad, trust.identity(B))
    try:
        with pytest.raises(RemoteRefused) as err:
            a.link(B, timeout=15)
        msg = str(err.value)
        assert err.value.field == "mr_enclave"
        assert msg.startswith(f"refused by {B}:") and "mr_enclave" in msg
        assert trust.mr[A].hex() in msg and "66" * 32 in msg
        assert is_trust_failure(err.value)
        with pytest.raises(PeerUnreachable) as unreachable:  # the acceptor never got a stream from it...
            b.link(A, timeout=0.5)
        assert "was refused: " in str(unreachable.value)  # ...and says why
        assert "mr_enclave" in str(unreachable.value)
    finally:
        a.close()
        b.close()


def test_non_attested_certificate_refused_at_hello(trust: Trust) -> None:
    a, b = _pair_with(trust, make_test_identity(A), trust.identity(B))
    try:
        with pytest.raises(RemoteRefused) as err:
            a.link(B, timeout=15)
        assert err.value.field == "certificate" and f"refused by {B}" in str(err.value)
    finally:
        a.close()
        b.close()


def test_dialer_refuses_wrongly_attested_acceptor(trust: Trust) -> None:
    a, b = _pair_with(trust, trust.identity(A), trust.identity(B, debug=True))
    try:
        with pytest.raises(PeerRefused) as err:
            a.link(B, timeout=15)
        assert err.value.field == "debug" and is_trust_failure(err.value)
    finally:
        a.close()
        b.close()


def test_hello_refuses_strangers_and_misdirected_dialers(pair: Pair) -> None:
    target = pair.addresses[B].bootstrap_target()
    ident_a, ident_b = pair.trust.identity(A), pair.trust.identity(B)
    stranger = _hello(target, ident_a.cert_pem, "evil.node", B, ident_a.key_pem)
    assert not stranger.ok and "not a peer of shop.trainer" in stranger.reason and not stranger.cert_pem
    misdirected = _hello(target, ident_a.cert_pem, A, "other.node", ident_a.key_pem)
    assert not misdirected.ok and "this is shop.trainer, not other.node" in misdirected.reason
    # B dials nobody; A dials B: B saying Hello to A is the wrong direction.
    wrong_way = _hello(pair.addresses[A].bootstrap_target(), ident_b.cert_pem, B, A, ident_b.key_pem)
    assert not wrong_way.ok and "not the other way round" in wrong_way.reason


def test_copied_certificate_without_its_key_cannot_open_the_tls_stream(pair: Pair) -> None:
    la = pair.a.link(B, timeout=15)
    victim_cert = pair.a._identity.cert_pem  # the live, genuine certificate of A...
    # ...which the attacker presents at Hello, signed with its own key: refused, nothing is pinned...
    reply = _hello(pair.addresses[B].bootstrap_target(), victim_cert, A, B)
    assert not reply.ok and reply.field == "possession", reply.reason
    b_cert = reply.cert_pem  # (certificates are public: B's comes with its signed refusal)
    attacker = make_test_identity(A)  # ...and the attacker only has its own private key.
    target = pair.addresses[B].secure_target()
    err = _exchange_with(target, b_cert, attacker.key_pem, victim_cert)
    assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE
    # Its own certificate (never verified at Hello) is not a client root either.
    err = _exchange_with(target, b_cert, attacker.key_pem, attacker.cert_pem)
    assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE
    # The genuine link is unaffected.
    la.send("act", 0, np.ones((1, 16), np.float32))
    assert pair.b.link(A).recv("act", 0, timeout=10).shape == (1, 16)
    assert la.generation == 1


def test_every_call_rechecks_the_client_certificate(pair: Pair, trust: Trust) -> None:
    # B's own certificate is in B's client roots (so the list is never empty) but was never verified at
    # Hello as a peer: a client holding B's key passes TLS and must still be refused by the per-call check.
    pair.a.link(B, timeout=15)
    ident_b = pair.b._identity  # the acceptor's own identity object
    target = pair.addresses[B].secure_target()
    err = _exchange_with(target, ident_b.cert_pem, ident_b.key_pem, ident_b.cert_pem)
    assert err is not None and err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not verified at Hello" in err.details()


def test_mitm_process_with_copied_certificate_cannot_call_rpcs(pair: Pair, tmp_path: Path) -> None:
    """A third process holding its own key presents A's copied, genuine certificate."""
    pair.a.link(B, timeout=15)
    copied = tmp_path / "a.pem"
    copied.write_bytes(pair.a._identity.cert_pem)
    out = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("mitm_proc.py")), pair.addresses[B].bootstrap_target(),
         pair.addresses[B].secure_target(), str(copied), A, B],
        capture_output=True, text=True, timeout=60)
    # Without the certificate's key it cannot sign B's fresh challenge: Hello refuses the copy.
    assert "HELLO refused possession" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "EXCHANGE UNAVAILABLE" in out.stdout, out.stdout + out.stderr[-2000:]  # the TLS handshake fails
    assert pair.b.link(A).generation == 1  # the genuine link was not disturbed


class _FakeBootstrap(pb_grpc.BootstrapServicer):
    def __init__(self, cert_pem: bytes) -> None:
        self.cert_pem = cert_pem

    def Hello(self, request: pb.HelloRequest, context: grpc.ServicerContext) -> pb.HelloReply:
        return pb.HelloReply(ok=True, cert_pem=self.cert_pem, node_id=B)


def test_impostor_acceptor_with_copied_certificate_is_never_connected(trust: Trust) -> None:
    """A process at B's address replays B's genuine certificate but has its own key: A never connects."""
    from concurrent import futures

    real_b = trust.identity(B)
    impostor = make_test_identity(B)
    addresses = make_addresses()
    boot = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_BootstrapServicer_to_server(_FakeBootstrap(real_b.cert_pem), boot)
    boot.add_insecure_port(addresses[B].bootstrap_target())
    secure = grpc.server(futures.ThreadPoolExecutor(2))
    secure.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("fldsl.transport.v1.Peer", {
        "Exchange": grpc.stream_stream_rpc_method_handler(lambda it, ctx: iter([b"\x0a\x02\x08\x01"]))}),))
    # It cannot serve B's certificate without B's key (gRPC refuses the mismatched pair at start-up),
    # so it serves its own key and a certificate naming B: the pinned root (B's real cert) rejects it.
    secure.add_secure_port(addresses[B].secure_target(), grpc.ssl_server_credentials(
        [(impostor.key_pem, impostor.cert_pem)]))
    boot.start()
    secure.start()
    a = make_transport(A, trust.identity(A), trust.verifier(), addresses, connect_timeout_s=3)
    a.start()
    try:
        with pytest.raises(PeerUnreachable) as err:
            a.link(B, timeout=15)
        assert "could not connect to shop.trainer" in str(err.value)
    finally:
        a.close()
        boot.stop(0)
        secure.stop(0)


def test_ports_serve_only_their_own_rpc(pair: Pair) -> None:
    """The insecure bootstrap port offers Hello only; the mutual-TLS port does not offer Hello."""
    pair.a.link(B, timeout=15)
    with grpc.insecure_channel(pair.addresses[B].bootstrap_target()) as ch:
        call = ch.stream_stream(EXCHANGE_METHOD)(iter([]), timeout=5)
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    ident_a = pair.a._identity
    creds = grpc.ssl_channel_credentials(root_certificates=pair.b._identity.cert_pem,
                                         private_key=ident_a.key_pem, certificate_chain=ident_a.cert_pem)
    with grpc.secure_channel(pair.addresses[B].secure_target(), creds,
                             options=[("grpc.ssl_target_name_override", B)]) as ch:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.BootstrapStub(ch).Hello(pb.HelloRequest(node_id=A), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
