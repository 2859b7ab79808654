"""The process ``fldsl bench`` starts for each of its three measurements; nothing else may start it.

    python -m fldsl.bench.node --mode native|plain|attested --report FILE -- NODE ARGS...

* ``attested``: exactly ``fldsl.runtime.node.main`` (the real node), plus a report of the process' peak RSS.
* ``native``: the pipeline's model trained centrally in this one process (``stdlib.tf.central``).
* ``plain``: the real node with attestation verification, TLS and the per-message audit record
  (``fldsl.runtime.audit``) switched OFF, so the bench can show what they cost. This is the only way to get
  an unauthenticated, unencrypted node, and it is reachable only from the bench harness: the process
  refuses to start unless its parent is the harness process named in ``FLDSL_BENCH_HARNESS_PID`` and
  ``FLDSL_BENCH_TOKEN`` equals the secret the harness wrote (0600) next to the report. ``fldsl run``, the
  launcher and the manifests only ever start ``fldsl.runtime.node``, and no .flp setting reaches this
  module. The mode is logged loudly ("INSECURE BENCH MODE").

The report (JSON) holds ``peak_rss_bytes`` and, for native, the central result. Time to the first training
step is measured by the harness from progress events (federated) or reported here (native).
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

TOKEN_ENV = "FLDSL_BENCH_TOKEN"
PARENT_ENV = "FLDSL_BENCH_HARNESS_PID"
T0_ENV = "FLDSL_BENCH_T0"  # wall-clock time (time.time()) at which the harness started this process
TOKEN_NAME = ".bench-token"
NODE_HEADER = "fldsl-bench-node"
INSECURE_BANNER = "INSECURE BENCH MODE: attestation verification and TLS are OFF on this node"

log = logging.getLogger("fldsl.bench")


class BenchRefused(Exception):
    """This process was not started by the bench harness."""


def check_harness(report: Path) -> None:
    """Fail closed unless the bench harness started us (parent pid + a secret it wrote next to the report)."""
    token, parent = os.environ.get(TOKEN_ENV, ""), os.environ.get(PARENT_ENV, "")
    if not token or not parent:
        raise BenchRefused("fldsl.bench.node is started by `fldsl bench` only "
                           "(use `fldsl run` or `python -m fldsl.runtime.node`)")
    if not parent.isdigit() or int(parent) != os.getppid():
        raise BenchRefused("fldsl.bench.node: the parent process is not the bench harness")
    secret = report.parent / TOKEN_NAME
    try:
        st = secret.stat()
        want = secret.read_text(encoding="ascii").strip()
    except OSError as e:
        raise BenchRefused(f"fldsl.bench.node: no harness secret ({e.strerror})") from None
    if st.st_mode & 0o077 or st.st_uid != os.getuid() or not hmac.compare_digest(want, token):
        raise BenchRefused("fldsl.bench.node: the harness secret does not match")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------------------
# plain mode: the real node with the attestation verdict and TLS taken out (passed to node.main: the node's
# own entry point and command line cannot select them)
# ---------------------------------------------------------------------------------------------------------


class _UnverifiedVerdict:
    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.simulated = True
        self.summary = "NOT ATTESTED (insecure bench mode)"


class NoAttestationVerifier:
    """The node's verifier in plain mode (PeerVerifier's signature): accepts the claimed node id without
    looking at its evidence."""

    def __init__(self, pins: Any, requirement: Any, *, sim_roots: Any = None, own_pins_digest: Any = b"",
                 now: Any = None) -> None:
        self.own_pins_digest = own_pins_digest

    def verify(self, cert_pem: bytes, expect_node: str | None) -> _UnverifiedVerdict:
        return _UnverifiedVerdict(expect_node or "?")


class _PlainChannel:
    """A plaintext channel whose streams name the calling node in a header (TLS named it before)."""

    def __init__(self, channel: Any, me: str) -> None:
        self._channel = channel
        self._me = me

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        call = self._channel.stream_stream(method, *args, **kwargs)
        return lambda requests, **kw: call(requests, metadata=((NODE_HEADER, self._me),), **kw)

    def close(self) -> None:
        self._channel.close()


class PlainChannels:
    """The transport's ChannelSecurity in plain mode: no TLS; a caller is who its header says, provided it
    passed Hello (the bootstrap still runs, with NoAttestationVerifier)."""

    def __init__(self, me: str) -> None:
        self.me = me

    def add_port(self, server: Any, host: str, port: int, creds: Any) -> int:
        from fldsl.runtime.transport.channel import bind

        return bind(server, host, port, server.add_insecure_port)

    def caller(self, registry: Any, context: Any) -> str | None:
        node = dict(context.invocation_metadata()).get(NODE_HEADER)
        return node if isinstance(node, str) and registry.verified(node) else None

    def channel(self, target: str, peer_id: str, peer_cert: bytes, identity: Any,
                options: list[tuple[str, Any]]) -> _PlainChannel:
        import grpc

        return _PlainChannel(grpc.insecure_channel(target, options=options), self.me)


# ---------------------------------------------------------------------------------------------------------
# native mode
# ---------------------------------------------------------------------------------------------------------


def run_native(build: Path) -> dict[str, Any]:
    """Train the build's model centrally; time to first step counted from the harness' spawn."""
    from fldsl.artifacts import Plan, load_model
    from fldsl.stdlib.tf import central

    t0 = float(os.environ.get(T0_ENV) or time.time())
    plans = [load_model(Plan, p) for p in sorted((build / "nodes").glob("*/plan.json"))]
    first_call: list[float] = []
    real_batches = central.epoch_batches

    def batches(*args: Any, **kw: Any) -> Any:  # called right before the first step: data and model ready
        if not first_call:
            first_call.append(time.time())
        return real_batches(*args, **kw)

    central.epoch_batches = batches
    try:
        res = central.train_central_plans(plans, base_dir=build)
    finally:
        central.epoch_batches = real_batches
    ready = first_call[0] if first_call else time.time()
    return {"examples_per_s": res.examples_per_s, "steps": res.steps,
            "first_step_s": (ready - t0) + res.first_step_s, "metrics": res.metrics}


# ---------------------------------------------------------------------------------------------------------


def enable_xla() -> None:
    """Experiment switch: default ``jit_compile=True`` for every ``tf.function`` created afterwards (the
    roles and the central loop decorate their step functions when they run, i.e. after this)."""
    import tensorflow as tf

    plain_function = tf.function

    def xla_function(func: Any = None, **kwargs: Any) -> Any:
        kwargs.setdefault("jit_compile", True)
        return plain_function(func, **kwargs) if func is not None else plain_function(**kwargs)

    tf.function = xla_function
    log.warning("bench experiment: XLA on for every tf.function")


def write_profile(profiler: Any, report: Path) -> None:
    import io
    import pstats

    report.parent.mkdir(parents=True, exist_ok=True)
    profiler.dump_stats(str(report) + ".prof")
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)
    Path(str(report) + ".prof.txt").write_text(text.getvalue(), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fldsl.bench.node",
                                description=__doc__.splitlines()[0])
    p.add_argument("--mode", required=True, choices=["native", "plain", "attested"])
    p.add_argument("--report", required=True, type=Path)
    p.add_argument("--build", type=Path, help="native: the build directory")
    p.add_argument("--profile", action="store_true",
                   help="cProfile the main thread; REPORT.prof and REPORT.prof.txt (top functions)")
    p.add_argument("--xla", action="store_true",
                   help="experiment: every tf.function of this process compiled with XLA (jit_compile=True)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="-- then the node's arguments")
    args = p.parse_args(argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        check_harness(args.report)
    except BenchRefused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"mode": args.mode}
    if args.mode == "native" and args.build is None:
        print("error: --mode native needs --build", file=sys.stderr)
        return 2
    if args.xla:
        enable_xla()
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    if args.mode == "native":
        report.update(run_native(args.build))
        code = 0
    else:
        from fldsl.runtime import node

        if args.mode == "plain":
            print(INSECURE_BANNER, file=sys.stderr, flush=True)
            log.warning(INSECURE_BANNER)
            me = rest[rest.index("--node") + 1] if "--node" in rest else "?"
            code = node.main(rest, security=PlainChannels(me), verifier_for=NoAttestationVerifier,
                             audit_messages=False)
        else:
            code = node.main(rest)
    if profiler is not None:
        profiler.disable()
        write_profile(profiler, args.report)
    report["peak_rss_bytes"] = peak_rss_bytes()
    report["exit_code"] = code
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, sort_keys=True), encoding="utf-8")
    return code


if __name__ == "__main__":
    from fldsl.runtime.node import _exit

    _exit(main())
