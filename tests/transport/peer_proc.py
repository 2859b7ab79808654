"""A transport node in its own process, for the multi-process tests (not a test module).

    python peer_proc.py TRUST_DIR ADDRESSES_JSON NODE_ID FIRST_STEP

Runs ``NODE_ID`` (the acceptor, shop.trainer) attested with the sim deployment in TRUST_DIR and echoes:
for step = FIRST_STEP, FIRST_STEP+1, ... it receives ``act`` and answers ``grad`` = -act. Prints
``READY`` once listening; exits 0 when the peer closes the link.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fldsl.runtime.transport import TransportError, load_addresses
from transport.conftest import A, make_transport, make_trust


def main() -> int:
    trust_dir, addresses_path, node, first = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    trust = make_trust(Path(trust_dir))
    t = make_transport(node, trust.identity(node), trust.verifier(), load_addresses(addresses_path),
                       connect_timeout_s=60)
    t.start()
    print("READY", flush=True)
    link = t.link(A, timeout=60)
    step = first
    try:
        while True:
            x = link.recv("act", step, timeout=60)
            link.send("grad", step, -x)
            step += 1
    except TransportError as e:
        print(f"END {e}", flush=True)
    finally:
        t.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
