"""Start-up inside Gramine vs without: the figures issue #9 asks for, side by side in one run.

    .venv/bin/python bench/enclave_startup.py [PIPELINE.flp] [--reps 2] [--json]

Compiles the pipeline twice into a scratch folder, once plain and once signed (``--sign`` with a scratch
simulated deployment key, timed), then runs it ``--reps`` times per runner, alternating ``none`` and
``gramine-direct`` so that machine load hits both alike. For each run and node it records the seconds from
spawning the node's process to each phase (attested, connected, aligned, first training step) and the whole
run's wall time. Also reports the signed manifest's trusted-file count and size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class Timeline:
    """A launcher display that writes down when each node first reached each phase."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.marks: dict[str, dict[str, float]] = {}

    def begin(self, launcher: Any) -> None:
        self.t0 = time.monotonic()

    def update(self, st: Any) -> None:
        m = self.marks.setdefault(st.id, {})
        now = round(time.monotonic() - self.t0, 2)
        if st.attestation and "attested" not in m:
            m["attested"] = now
        m.setdefault(st.phase, now)
        if st.step and "first_step" not in m:
            m["first_step"] = now

    def end(self) -> None:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pipeline", nargs="?", default=str(ROOT / "pipelines" / "vertical_wide_deep.flp"))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from fldsl.api import compile_pipeline
    from fldsl.compiler.sign import sign_build
    from fldsl.runtime.attestation.sim import trust_init
    from fldsl.runtime.launcher import run_pipeline

    work = Path(tempfile.mkdtemp(prefix="fldsl-enclave-bench-"))
    trust = work / "trust"
    trust_init(trust)
    plain = Path(compile_pipeline(args.pipeline, work / "plain", {}).build_dir)
    signed = Path(compile_pipeline(args.pipeline, work / "signed", {}).build_dir)
    t = time.monotonic()
    nodes = sign_build(signed, trust / "enclave_signing.key")
    sign_s = time.monotonic() - t
    manifest = next((signed / "nodes" / nodes[0].node_id).glob("*.manifest"))
    doc = tomllib.loads(manifest.read_text())
    report: dict[str, Any] = {
        "pipeline": Path(args.pipeline).name,
        "sign_s": round(sign_s, 1),
        "trusted_files": len(doc["sgx"]["trusted_files"]),
        "manifest_bytes": manifest.stat().st_size,
        "runs": [],
    }
    for rep in range(args.reps):
        for enclave, build in (("none", plain), ("gramine-direct", signed)):
            tl = Timeline()
            t = time.monotonic()
            res = run_pipeline(build, run_dir=work / "runs" / f"{enclave}-{rep}", trust_dir=trust, display=tl,
                               enclave=enclave)  # type: ignore[arg-type]
            wall = round(time.monotonic() - t, 1)
            run = {"enclave": enclave, "rep": rep, "exit": res.exit_code, "wall_s": wall, "nodes": tl.marks}
            report["runs"].append(run)
            print(json.dumps(run), file=sys.stderr)
    for enclave in ("none", "gramine-direct"):
        firsts = [max(m.get("first_step", float("nan")) for m in r["nodes"].values())
                  for r in report["runs"] if r["enclave"] == enclave]
        report[f"{enclave}_first_step_s"] = round(statistics.median(firsts), 1)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['pipeline']}: signed in {report['sign_s']} s; {report['trusted_files']} trusted "
              f"files, manifest {report['manifest_bytes'] / 1e6:.1f} MB")
        for enclave in ("none", "gramine-direct"):
            print(f"  {enclave:>15}: spawn to first training step (slowest node, median of {args.reps}) "
                  f"{report[f'{enclave}_first_step_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
