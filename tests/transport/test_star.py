"""Parameter-server topology: several workers dial one server at once; each link is separate and policed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fldsl.artifacts import AttestationRequirement, PeerRef, Policy
from fldsl.runtime.transport import Addresses, NodeAddress, Transport

from .conftest import flow, free_port, make_trust

PS = "agg.ps"
WORKERS = ["w1.worker", "w2.worker", "w3.worker"]


def test_three_workers_dial_one_server_concurrently(tmp_path: Path) -> None:
    trust = make_trust(tmp_path / "trust", nodes=(PS, *WORKERS))
    flows = [f for w in WORKERS for f in (
        flow(f"{w}->ps:gradients", w, PS, None, 1 << 20, kind="gradients"),
        flow(f"ps->{w}:weights", PS, w, None, 1 << 20, kind="weights"))]
    addresses = Addresses({n: NodeAddress(host="127.0.0.1", port=free_port(), bootstrap_port=free_port())
                           for n in (PS, *WORKERS)})

    def transport(node: str, peers: list[PeerRef]) -> Transport:
        policy = Policy(pipeline="t", node=node, attestation=AttestationRequirement(mode="sim"),
                        accept_peers=[p.id for p in peers],
                        flows=[f for f in flows if node in (f.src, f.dst)], max_message_bytes=1 << 20)
        return Transport(node_id=node, policy=policy, peers=peers, identity=trust.identity(node),
                         verifier=trust.verifier(), addresses=addresses, connect_timeout_s=20)

    server = transport(PS, [PeerRef(id=w, party=w.split(".")[0], dial=False) for w in WORKERS])
    workers = {w: transport(w, [PeerRef(id=PS, party="agg", dial=True)]) for w in WORKERS}
    server.start()
    for t in workers.values():
        t.start()
    try:
        for i, w in enumerate(WORKERS):
            workers[w].link(PS, timeout=20).send_arrays(f"{w}->ps:gradients", 0, [np.full(4, i, np.float32)])
        total = sum(server.link(w, timeout=20).recv_arrays(f"{w}->ps:gradients", 0, timeout=10)[0]
                    for w in WORKERS)
        for w in WORKERS:
            server.link(w).send_arrays(f"ps->{w}:weights", 1, [total])
        for w in WORKERS:
            got = workers[w].link(PS).recv_arrays(f"ps->{w}:weights", 1, timeout=10)
            np.testing.assert_array_equal(got[0], np.full(4, 3, np.float32))
        assert all(server.link(w).generation == 1 for w in WORKERS)
    finally:
        for t in workers.values():
            t.close()
        server.close()
