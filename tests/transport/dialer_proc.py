"""The dialer (media.trainer) in its own process, ending as a node does (not a test module).

    python dialer_proc.py TRUST_DIR ADDRESSES_JSON CONNECT_TIMEOUT STEPS [--first-step N] [--crash] [--bad-mr]

Attests to shop.trainer at the addresses in ADDRESSES_JSON, then sends STEPS ``act`` tensors (from step N,
default 0) and checks each ``grad`` answer (peer_proc.py echoes -act), then closes. Prints
``CONNECTED <seconds>`` once the link is up and ``DONE`` at the end. On failure prints ``ERROR <message>``
and exits as fldsl's node classifies transport failures: 3 for a trust failure (``is_trust_failure``), 1
for anything else. ``--crash`` exits without closing the link (as a killed node: the peer waits for it to
come back); ``--bad-mr`` runs other code than was pinned (a genuinely wrongly attested node).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fldsl.runtime.transport import is_trust_failure, load_addresses
from transport.conftest import A, B, make_transport, make_trust


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("trust_dir", type=Path)
    p.add_argument("addresses", type=Path)
    p.add_argument("timeout", type=float)
    p.add_argument("steps", type=int)
    p.add_argument("--first-step", type=int, default=0)
    p.add_argument("--crash", action="store_true")
    p.add_argument("--bad-mr", action="store_true")
    args = p.parse_args()
    trust = make_trust(args.trust_dir)
    ident = trust.identity(A, mr_enclave=b"\x66" * 32) if args.bad_mr else trust.identity(A)
    t = make_transport(A, ident, trust.verifier(), load_addresses(args.addresses),
                       connect_timeout_s=args.timeout)
    start = time.monotonic()
    t.start()
    try:
        link = t.link(B, timeout=args.timeout + 5)
        print(f"CONNECTED {time.monotonic() - start:.2f}", flush=True)
        for step in range(args.first_step, args.first_step + args.steps):
            x = np.full((4, 16), step, np.float32)
            link.send("act", step, x)
            np.testing.assert_array_equal(link.recv("grad", step, timeout=30), -x)
        print("DONE", flush=True)
        if args.crash:
            os._exit(0)  # no CLOSE: the acceptor keeps the link and waits for us to come back
        return 0
    except Exception as e:
        print(f"ERROR {e}", flush=True)
        return 3 if is_trust_failure(e) else 1
    finally:
        t.close()


if __name__ == "__main__":
    sys.exit(main())
