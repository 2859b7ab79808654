"""How many worker threads (or processes) a node may start for its own parallel work.

Pools sized from ``os.cpu_count()`` follow the host, but an SGX enclave has a fixed thread budget
(``sgx.max_threads`` in its signed manifest), so the manifest caps fldsl's pools with
``FLDSL_MAX_WORKER_THREADS`` (set from the pipeline's ``intra_op_threads``) as it caps TensorFlow's and
OpenBLAS's.
"""

from __future__ import annotations

import os

ENV = "FLDSL_MAX_WORKER_THREADS"


def worker_count(cap: int) -> int:
    """min(cap, cores, the enclave's limit), at least 1."""
    n = min(cap, os.cpu_count() or 1)
    limit = os.environ.get(ENV, "")
    if limit.isdigit() and int(limit) > 0:
        n = min(n, int(limit))
    return max(1, n)
