"""Micro benchmarks for issue #5 targets that need no node processes: ECDH PSI and sealing throughput.

    /work/venv/bin/python bench/micro_bench.py psi [--n 100000] [--overlap 0.9] [--reps 3]
    /work/venv/bin/python bench/micro_bench.py seal [--mib 200] [--reps 3]
    /work/venv/bin/python bench/micro_bench.py csv [--rows 30000] [--cols 23] [--reps 3]

``psi``: leader and follower run in two threads of this process over in-memory queues (no network), each
with ``n`` ids of which ``overlap * n`` are common; prints seconds per run and the intersection size.
Target: 1M x 1M <= 30 s. ``seal``: ``seal_bytes`` / ``unseal_bytes`` of ``mib`` MiB of random bytes; prints
GB/s (10^9 bytes/s). Target: >= 1 GB/s at 200 MB. ``csv``: ``read_csv`` of a generated FATE-shaped file
(CPU seconds, so contention on a shared box does not count). One JSON line per rep on stdout, a summary on
stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import threading
import time


def bench_psi(n: int, overlap: float, reps: int) -> list[dict[str, float]]:
    from fldsl.runtime.psi import psi_follower, psi_leader

    common = int(n * overlap)
    leader_ids = [f"id{i}" for i in range(n)]
    follower_ids = [f"id{i}" for i in range(n - common, 2 * n - common)]
    out = []
    for rep in range(reps):
        a2b: queue.Queue[bytes] = queue.Queue()
        b2a: queue.Queue[bytes] = queue.Queue()
        result: dict[str, list[str]] = {}

        def follower(result: dict[str, list[str]] = result, send: queue.Queue[bytes] = b2a,
                     recv: queue.Queue[bytes] = a2b) -> None:
            result["f"] = psi_follower(follower_ids, send.put, recv.get)

        t = threading.Thread(target=follower)
        t0 = time.perf_counter()
        t.start()
        result["l"] = psi_leader(leader_ids, a2b.put, b2a.get)
        t.join()
        s = time.perf_counter() - t0
        assert result["l"] == result["f"] and len(result["l"]) == common
        rec = {"bench": "psi", "n": n, "common": common, "rep": rep, "seconds": round(s, 3)}
        print(json.dumps(rec), flush=True)
        out.append(rec)
    med = statistics.median(r["seconds"] for r in out)
    print(f"psi {n} x {n}: median {med:.2f} s ({n / med:,.0f} ids/s per side)", file=sys.stderr)
    return out


def bench_seal(mib: int, reps: int) -> list[dict[str, float]]:
    from fldsl.runtime.sealing import seal_bytes, unseal_bytes

    data = os.urandom(mib * 2**20)
    key = os.urandom(32)
    out = []
    for rep in range(reps):
        t0 = time.perf_counter()
        blob = seal_bytes(data, key=key, node_id="bench.node", name="model", version=1)
        t1 = time.perf_counter()
        back = unseal_bytes(blob, key=key, node_id="bench.node", name="model")
        t2 = time.perf_counter()
        assert back == data
        rec = {"bench": "seal", "mib": mib, "rep": rep, "seal_gb_s": round(len(data) / (t1 - t0) / 1e9, 3),
               "unseal_gb_s": round(len(data) / (t2 - t1) / 1e9, 3)}
        print(json.dumps(rec), flush=True)
        out.append(rec)
    print(f"seal {mib} MiB: median seal {statistics.median(r['seal_gb_s'] for r in out):.2f} GB/s, "
          f"unseal {statistics.median(r['unseal_gb_s'] for r in out):.2f} GB/s", file=sys.stderr)
    return out


def bench_csv(rows: int, cols: int, reps: int) -> list[dict]:
    import tempfile
    from pathlib import Path

    import numpy as np

    from fldsl.runtime.data import read_csv

    x = np.random.default_rng(0).standard_normal((rows, cols))
    lines = ["id,y," + ",".join(f"x{j}" for j in range(cols))]
    lines += [f"{i},{i % 2}," + ",".join(f"{v:.6f}" for v in row) for i, row in enumerate(x)]
    out = []
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bench.csv"
        path.write_text("\n".join(lines) + "\n")
        for rep in range(reps):
            t0 = time.process_time()
            read_csv(path, id_column="id", label_column="y", feature_columns=[f"x{j}" for j in range(cols)])
            rec = {"bench": "csv", "rows": rows, "cols": cols, "rep": rep,
                   "cpu_s": round(time.process_time() - t0, 3)}
            print(json.dumps(rec), flush=True)
            out.append(rec)
    median = statistics.median(r["cpu_s"] for r in out)
    print(f"csv {rows} x {cols}: median {median:.3f} CPU s", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    ps = sub.add_parser("psi")
    ps.add_argument("--n", type=int, default=100_000)
    ps.add_argument("--overlap", type=float, default=0.9)
    ps.add_argument("--reps", type=int, default=3)
    ss = sub.add_parser("seal")
    ss.add_argument("--mib", type=int, default=200)
    ss.add_argument("--reps", type=int, default=3)
    cs = sub.add_parser("csv")
    cs.add_argument("--rows", type=int, default=30_000)
    cs.add_argument("--cols", type=int, default=23)
    cs.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    if args.what == "psi":
        bench_psi(args.n, args.overlap, args.reps)
    elif args.what == "csv":
        bench_csv(args.rows, args.cols, args.reps)
    else:
        bench_seal(args.mib, args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
