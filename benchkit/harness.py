"""``fldsl bench FILE.flp``: the pipeline's model trained three (four) ways, side by side, in one invocation.

* **native**: the same model trained centrally in one TensorFlow process on the joined data;
* **plain**: fldsl's runtime (one process per node, real gRPC) with attestation, TLS and the per-message audit
  record OFF — a bench-only mode (``fldsl.bench.node``), never reachable from a .flp or ``fldsl run``;
* **attested**: the real thing (attestation, RA-TLS, pinned mutual TLS, sealed checkpoints);
* **flower** (horizontal FedAvg pipelines, when ``flwr`` is installed: the ``bench`` extra): the same workers'
  training driven by a Flower FedAvg server and clients (``fldsl.bench.flower``), so fldsl's
  per-round overhead is compared with Flower's measured in the same run.

Same build (so same data, seed, batch size and model) for all three. The machine is noisy, so the modes
run interleaved rep by rep (order reversed on odd reps) and every ratio is the median of per-rep ratios.

Measured per mode: training examples/s (native: the central loop's busy time without the first, tracing,
step and without evaluation; federated: examples the label owners trained between their first and last
step event, over that wall time), time from process start to the end of the first training step, peak RSS
of each process, and the payload bytes all nodes sent.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MODES = ("native", "plain", "attested", "flower")
FEDERATED = ("plain", "attested")
DEFAULT_STEPS = 200
NATIVE_TIMEOUT_S = 900.0


@dataclass
class ModeResult:
    mode: str
    rep: int
    ok: bool
    examples_per_s: float = 0.0
    first_step_s: float = 0.0  # process start -> end of the first training step (federated: slowest node)
    peak_rss_bytes: dict[str, int] = field(default_factory=dict)  # process -> peak RSS
    wire_bytes: int = 0  # payload bytes sent by all nodes (federated)
    steps: int = 0
    seconds: float = 0.0  # wall time of the whole mode (start-up to exit)
    # federated: seconds from spawn to each progress event (first occurrence) of the slowest-starting label
    # owner: where start-up time goes (imports, attestation, connection, PSI, tracing)
    timeline: dict[str, float] = field(default_factory=dict)
    # FedAvg: median round wall time minus the slowest worker's own busy time per round (its local training
    # steps): what transfer, aggregation and applying the weights add to every round
    round_s: float | None = None
    round_overhead_s: float | None = None
    # final evaluation metrics per label owner (loss, auc, ...): the modes train the same model, so these
    # should agree across federated modes
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None


# ---------------------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------------------


def _steps_per_epoch(program: Any) -> int:
    """Training steps of one epoch, computed from the data as the runtime will (numpy only, no TF)."""
    from fldsl.runtime.data import load_dataset

    train = program.train
    sizes: list[int] = []
    ids: set[str] | None = None
    for ds in program.datasets:
        # As the nodes read it: a csv path is absolute, or (declared with a schema block) relative to the
        # working folder the nodes share with this process, not to the .flp's folder.
        table = load_dataset(ds.spec)
        sizes.append(len(table.ids))
        row_ids = {str(i) for i in table.ids.tolist()}
        ids = row_ids if ids is None else ids & row_ids
    if program.scenario == "vertical" and ids is not None:
        rows = len(ids)
    else:  # horizontal / distributed: every worker walks its own rows; the biggest sets the pace
        rows = max(sizes, default=0)
    rows = rows - round(rows * train.validation.fraction)
    return max(1, math.ceil(rows / train.batch_size))


def compile_for_bench(flp: Path, params: dict[str, str], out: Path, steps: int | None) -> Path:
    """Compile ``flp``; with ``steps``, the epoch count is raised (never lowered) to cover that many steps.

    Everything else (model, data, seed, batch size, trust) is the pipeline's own. The build is measured
    as compiled, so nodes accept it like any other."""
    from fldsl.api import _read_source, check_source
    from fldsl.compiler.emit import emit

    source = _read_source(flp)
    program = check_source(source, str(flp), params, flp.resolve().parent)
    if steps is not None:
        try:
            spe = _steps_per_epoch(program)
        except Exception:  # a data set the harness cannot size: keep the pipeline's epochs
            spe = None
        if spe is not None:
            epochs = max(program.train.epochs, math.ceil(steps / spe))
            train = program.train.model_copy(update={"epochs": epochs})
            program = program.model_copy(update={"train": train})
    return emit(program, source, out, str(flp)).build_dir


# ---------------------------------------------------------------------------------------------------------
# running one mode
# ---------------------------------------------------------------------------------------------------------


CODE_CHANGE_RETRIES = 2


class Builder:
    """The bench's build, recompiled whenever the installed code changed since it was compiled.

    The simulated measurement covers the code (``fldsl.measurement.code_digest``): a node whose code differs
    from what was compiled is refused by its peers, which is right for a deployment but would fail a bench
    run in a checkout where code is being edited. Recompiling changes nothing the bench compares (same
    source, data, seed and batch size)."""

    def __init__(self, flp: Path, params: dict[str, str], out: Path, steps: int | None) -> None:
        self.flp, self.params, self.out, self.steps = flp, params, out, steps
        self.digest: str | None = None
        self.build: Path | None = None

    def _now(self) -> str:
        from fldsl.measurement import code_digest

        code_digest.cache_clear()
        return code_digest()

    def changed(self) -> bool:
        return self.digest is not None and self._now() != self.digest

    def current(self) -> Path:
        now = self._now()
        if self.build is None or now != self.digest:
            self.build = compile_for_bench(self.flp, self.params, self.out, self.steps)
            self.digest = now
        return self.build


class Harness:
    """Owns the secret that lets ``fldsl.bench.node`` start (see its docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.token = secrets.token_hex(32)
        self.profile = False  # cProfile every process (reports/*.prof.txt)
        self.xla = False  # experiment: jit_compile=True for every tf.function, in every mode alike

    def flags(self) -> list[str]:
        return [*(["--profile"] if self.profile else []), *(["--xla"] if self.xla else [])]

    def prepare(self, rep_dir: Path) -> None:
        from fldsl.bench.node import TOKEN_NAME

        rep_dir.mkdir(parents=True, exist_ok=True)
        secret = rep_dir / "reports" / TOKEN_NAME
        secret.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(self.token)

    def env(self) -> dict[str, str]:
        from fldsl.bench.node import PARENT_ENV, T0_ENV, TOKEN_ENV
        from fldsl.runtime.launcher import node_env

        env = node_env()
        env[TOKEN_ENV] = self.token
        env[PARENT_ENV] = str(os.getpid())
        env[T0_ENV] = repr(time.time())
        return env


def _read_report(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def run_native(harness: Harness, build: Path, rep_dir: Path, rep: int) -> ModeResult:
    harness.prepare(rep_dir)
    report = rep_dir / "reports" / "native.json"
    log = rep_dir / "native.log"
    cmd = [sys.executable, "-m", "fldsl.bench.node", "--mode", "native", "--report", str(report),
           "--build", str(build), *harness.flags()]
    t0 = time.monotonic()
    with open(log, "w", encoding="utf-8") as out:
        try:
            code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  env=harness.env(), timeout=NATIVE_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            code = -1
    doc = _read_report(report)
    res = ModeResult(mode="native", rep=rep, ok=code == 0 and bool(doc), seconds=time.monotonic() - t0)
    if not res.ok:
        res.error = f"exit {code}; see {log}"
        return res
    res.examples_per_s = float(doc["examples_per_s"])
    res.first_step_s = float(doc["first_step_s"])
    res.steps = int(doc["steps"])
    res.peak_rss_bytes = {"native": int(doc["peak_rss_bytes"])}
    return res


class Timing:
    """The launcher's hooks (``LaunchHooks``) for one federated measurement: each node starts as
    ``fldsl.bench.node`` in ``mode``, and every progress event is timed on arrival."""

    def __init__(self, harness: Harness, mode: str, run_dir: Path) -> None:
        self.harness, self.mode, self.run_dir = harness, mode, run_dir
        self.spawned_at: dict[str, float] = {}
        self.steps: dict[str, list[tuple[float, int]]] = {}
        self.rates: dict[str, list[float]] = {}  # examples_per_s of each step event (its meter so far)
        self.events: dict[str, dict[str, float]] = {}

    def node_command(self, node_id: str, command: list[str]) -> tuple[list[str], dict[str, str]]:
        node_args = command[command.index("fldsl.runtime.node") + 1:]  # drop: python -I -m fldsl.runtime.node
        # Isolated like the node it measures (fldsl.runtime.node refuses PYTHONPATH hooks).
        cmd = [sys.executable, "-I", "-m", "fldsl.bench.node", "--mode", self.mode, "--report",
               str(self.run_dir / "reports" / f"{node_id}.json"), *self.harness.flags(), "--", *node_args]
        self.spawned_at[node_id] = time.monotonic()
        return cmd, self.harness.env()

    def on_event(self, node_id: str, ev: dict[str, Any]) -> None:
        now = time.monotonic()
        kind = str(ev.get("event"))
        if kind == "step":
            self.steps.setdefault(node_id, []).append((now, int(ev.get("step", 0))))
            self.rates.setdefault(node_id, []).append(float(ev.get("examples_per_s") or 0.0))
        name = f"{kind}:{ev['name']}" if kind == "phase" else kind
        self.events.setdefault(node_id, {}).setdefault(name, now - self.spawned_at.get(node_id, now))


def examples_per_step_event(plan: Any) -> int:
    """Training examples behind one unit of a node's ``step`` counter: a batch, except for FedAvg workers,
    which count rounds (``every_steps`` local batches, or one local epoch)."""
    b = plan.train.batch_size
    agg = plan.aggregation
    if not plan.role.startswith("horizontal") or agg is None or agg.mode == "sync":
        return b
    if agg.every_steps and not agg.every_epoch:
        return b * agg.every_steps
    from fldsl.runtime.data import load_dataset

    label_ds = plan.loss.label.split(".", 1)[0] if plan.loss is not None else None
    spec = next((d for d in plan.data if d.name == label_ds), plan.data[0] if plan.data else None)
    if spec is None:
        return b
    rows = len(load_dataset(spec).ids)
    if not plan.train.validation.test_data:
        rows -= round(rows * plan.train.validation.fraction)
    return b * max(1, math.ceil(rows / b))  # a final partial batch counts as full


def round_overhead(walls: list[float], busy: list[float]) -> tuple[float | None, float | None]:
    """(median round wall time, per-round overhead) from round wall times and each worker's mean busy time
    per round: overhead = median round - the slowest worker's busy time, i.e. what upload, aggregation,
    download (and anything else outside local training) add to a round. One definition for fldsl's modes
    and Flower's, so the comparison is of the same metric."""
    if not walls or not busy:
        return None, None
    round_s = statistics.median(walls)
    return round_s, round_s - max(busy)


def fedavg_rounds(plan: Any, steps: list[tuple[float, int]], rates: list[float]
                  ) -> tuple[list[float], list[float]]:
    """(wall seconds, busy seconds) per round of one FedAvg worker, from its step events.

    A worker emits (at most every 0.25 s) its round count and its meter's rate so far (examples over busy
    seconds: the local training steps). The busy time up to an event is the
    examples trained so far over that rate, so both lists cover the same rounds: from the first event on,
    which leaves the first round's tf.function tracing out of both."""
    from fldsl.bench.flower import examples_after, local_steps_per_round, train_rows

    n = train_rows(plan)
    per_round = local_steps_per_round(plan, n)

    def busy_until(rounds: int, rate: float) -> float:
        return examples_after(rounds * per_round, n, plan.train.batch_size) / rate

    walls: list[float] = []
    busy: list[float] = []
    for ((t0, r0), q0), ((t1, r1), q1) in itertools.pairwise(zip(steps, rates, strict=True)):
        if r1 > r0 and q0 > 0 and q1 > 0:
            walls.append((t1 - t0) / (r1 - r0))
            busy.append((busy_until(r1, q1) - busy_until(r0, q0)) / (r1 - r0))
    return walls, busy


def run_federated(harness: Harness, mode: str, build: Path, rep_dir: Path, rep: int,
                  trust_dir: Path) -> ModeResult:
    from fldsl.artifacts import Plan, load_model, node_dir
    from fldsl.runtime.launcher import Launcher, tail

    harness.prepare(rep_dir)
    timing = Timing(harness, mode, rep_dir)
    launcher = Launcher(build, run_dir=rep_dir, trust_dir=trust_dir, hooks=timing)
    t0 = time.monotonic()
    launcher.start()
    code, _ = launcher.wait()
    res = ModeResult(mode=mode, rep=rep, ok=code == 0, seconds=time.monotonic() - t0)
    for nid in launcher.ids:
        doc = _read_report(rep_dir / "reports" / f"{nid}.json")
        if "peak_rss_bytes" in doc:
            res.peak_rss_bytes[nid] = int(doc["peak_rss_bytes"])
    if not res.ok:
        bad = launcher.first_failure
        if bad is not None:
            lines = " | ".join(tail(bad.log_path, 4))
            res.error = f"{bad.id}: {bad.error} ({lines})"
        else:
            res.error = f"exit {code}"
        return res
    plans = {nid: load_model(Plan, node_dir(launcher.build_dir, nid) / "plan.json") for nid in launcher.ids}
    # Label owners train the examples (vertical: the active party; horizontal: each worker).
    owners = [nid for nid, p in plans.items() if p.loss is not None and timing.steps.get(nid)
              and not p.role.endswith(("server", "ps"))] or [n for n in launcher.ids if timing.steps.get(n)]
    if not owners:
        res.ok = False
        res.error = "the run ended without any training step event (nothing to time)"
        return res
    begin = min(timing.steps[n][0][0] for n in owners)
    end = max(timing.steps[n][-1][0] for n in owners)
    examples = sum((timing.steps[n][-1][1] - timing.steps[n][0][1]) * examples_per_step_event(plans[n])
                   for n in owners)
    res.examples_per_s = examples / (end - begin) if end > begin else 0.0
    slowest = max(owners, key=lambda n: timing.steps[n][0][0] - timing.spawned_at[n])
    res.first_step_s = timing.steps[slowest][0][0] - timing.spawned_at[slowest]
    res.timeline = {k: round(v, 3) for k, v in sorted(timing.events.get(slowest, {}).items(),
                                                        key=lambda kv: kv[1])}
    res.steps = max(timing.steps[n][-1][1] for n in owners)
    fedavg = [n for n in owners if (agg := plans[n].aggregation) is not None and agg.mode == "fedavg"]
    if fedavg:
        walls: list[float] = []
        busy: list[float] = []
        for n in fedavg:
            w, b = fedavg_rounds(plans[n], timing.steps[n], timing.rates.get(n, []))
            walls += w
            if b:
                busy.append(statistics.mean(b))
        res.round_s, res.round_overhead_s = round_overhead(walls, busy)
    for n in owners:
        final = (launcher.nodes[n].done or {}).get("metrics")
        if isinstance(final, dict):
            res.metrics[n] = final
    for st in launcher.nodes.values():
        res.wire_bytes += sum(int(v) for v in ((st.done or {}).get("bytes_sent") or {}).values())
    return res


# ---------------------------------------------------------------------------------------------------------
# flower mode: the same FedAvg training under Flower
# ---------------------------------------------------------------------------------------------------------


FLOWER_TIMEOUT_S = 900.0
FLOWER_HINT = "install the bench extra: pip install 'fldsl[bench]'"


def flower_unavailable(python: str = sys.executable, env: dict[str, str] | None = None) -> str | None:
    """None when the interpreter the bench starts can import flwr, else why not (one line).

    Checked in a child process of that interpreter, as the Flower processes will be: a flwr that is
    present but cannot import (e.g. a protobuf it refuses) must skip the mode, not fail every rep."""
    try:
        res = subprocess.run([python, "-c", "import flwr, sys; sys.stdout.write(flwr.__version__)"],
                             capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot check for flwr ({e})"
    if res.returncode == 0:
        return None
    lines = [ln.strip() for ln in res.stderr.splitlines() if ln.strip()]
    why = lines[-1] if lines else f"exit {res.returncode}"
    if "No module named 'flwr'" in why:
        return f"flwr is not installed for {python}; {FLOWER_HINT}"
    return f"flwr does not import ({why}); {FLOWER_HINT}"


def flower_skip_reason(build: Path) -> str | None:
    """Why the flower mode cannot run for this build (None: it can)."""
    from fldsl.bench.flower import NotFedAvg, fedavg_workers

    try:
        fedavg_workers(build)
    except NotFedAvg as e:
        return f"{e}; Flower is compared on FedAvg only"
    return flower_unavailable(env=_flower_env())


def _flower_env() -> dict[str, str]:
    from fldsl.runtime.launcher import node_env

    env = node_env()  # the thread settings of fldsl's nodes
    env["FLWR_TELEMETRY_ENABLED"] = "0"  # no network here; and it would not be part of either measurement
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def _stop(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    for p in procs.values():
        if p.poll() is None:
            p.terminate()
    for p in procs.values():
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def flower_result(res: ModeResult, server: dict[str, Any], spawned_at: float) -> None:
    """Fill ``res`` from the Flower server's report (per-round timestamps and client busy times)."""
    rounds = server.get("rounds") or []
    ends = [float(r["end"]) for r in rounds]
    walls = [b - a for a, b in itertools.pairwise(ends)]  # as fldsl: between consecutive round ends
    per_client: dict[str, list[float]] = {}
    for r in rounds[1:]:  # the rounds the walls cover (as for fldsl: the first, with tracing, is left out)
        for node, c in (r.get("clients") or {}).items():
            per_client.setdefault(node, []).append(float(c["busy_s"]))
    busy = [statistics.mean(v) for v in per_client.values()]
    res.round_s, res.round_overhead_s = round_overhead(walls, busy)
    examples = sum(int(c["examples"]) for r in rounds[1:] for c in (r.get("clients") or {}).values())
    res.examples_per_s = examples / (ends[-1] - ends[0]) if len(ends) > 1 and ends[-1] > ends[0] else 0.0
    res.first_step_s = ends[0] - spawned_at if ends else 0.0
    res.steps = len(rounds)
    res.metrics = {str(k): v for k, v in (server.get("final") or {}).items()}


def run_flower(harness: Harness, build: Path, rep_dir: Path, rep: int) -> ModeResult:
    """Flower server + one client per worker on loopback, each client training its worker's plan."""
    from fldsl.bench.flower import fedavg_workers, schedule
    from fldsl.runtime.launcher import tail

    workers = fedavg_workers(build)
    rounds, rpe = schedule(workers)
    reports, logs = rep_dir / "reports", rep_dir / "logs"
    reports.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    address = f"127.0.0.1:{_free_port()}"
    base = [sys.executable, "-m", "fldsl.bench.flower"]
    cmds = {"flower.server": [*base, "server", "--build", str(build), "--address", address,
                              "--report", str(reports / "flower.server.json"), "--clients", str(len(workers)),
                              "--rounds", str(rounds), "--rounds-per-epoch", str(rpe)]}
    for w in workers:
        cmds[w.node] = [*base, "client", "--build", str(build), "--address", address, "--node", w.node,
                        "--report", str(reports / f"{w.node}.json"), *(["--xla"] if harness.xla else [])]
    env = _flower_env()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    t0 = time.monotonic()
    spawned_at = time.time()
    res = ModeResult(mode="flower", rep=rep, ok=False)
    failed: str | None = None
    deaf = False  # the server never listened
    try:
        for name, cmd in cmds.items():
            with open(logs / f"{name}.log", "w", encoding="utf-8") as out:
                procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, env=env)
            # clients retry with back-off: start them once the server listens, so start-up is not padded
            if name == "flower.server" and not _wait_listening(int(address.rsplit(":", 1)[1]),
                                                               procs[name], 120.0):
                failed, deaf = name, True
                break
        deadline = time.monotonic() + FLOWER_TIMEOUT_S
        while failed is None:
            codes = {n: p.poll() for n, p in procs.items()}
            failed = next((n for n, c in codes.items() if c not in (None, 0)), None)
            if failed is None and all(c == 0 for c in codes.values()):
                break
            if time.monotonic() > deadline:
                failed = "timeout"
            time.sleep(0.2)
    finally:
        _stop(procs)
    res.seconds = time.monotonic() - t0
    docs = {n: _read_report(reports / f"{n}.json") for n in cmds}
    res.peak_rss_bytes = {n: int(d["peak_rss_bytes"]) for n, d in docs.items() if "peak_rss_bytes" in d}
    if failed is not None:
        if failed == "timeout":
            res.error = f"Flower did not finish within {FLOWER_TIMEOUT_S:.0f} s; see {logs}"
        else:
            why = docs.get(failed, {}).get("error") or " | ".join(tail(logs / f"{failed}.log", 3))
            what = "never listened" if deaf else f"exited {procs[failed].returncode}"
            res.error = f"{failed} {what}: {why}"
        return res
    flower_result(res, docs["flower.server"], spawned_at)
    res.ok = res.round_overhead_s is not None
    if not res.ok:
        res.error = f"the Flower server reported {res.steps} round(s): too few to time"
    return res


# ---------------------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------------------


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarise(results: list[ModeResult], reps: int) -> dict[str, Any]:
    """Medians per mode and paired ratios (median over reps of the per-rep ratio)."""
    by: dict[tuple[str, int], ModeResult] = {(r.mode, r.rep): r for r in results}

    def ratios(num: str, den: str, key: str) -> list[float]:
        out = []
        for rep in range(reps):
            a, b = by.get((num, rep)), by.get((den, rep))
            if a and b and a.ok and b.ok:
                x, y = getattr(a, key), getattr(b, key)
                if isinstance(x, dict):
                    x, y = max(x.values(), default=0), max(y.values(), default=0)
                if x is not None and y is not None and y > 0:  # an overhead <= 0 s (noise): no ratio
                    out.append(x / y)
        return out

    modes: dict[str, Any] = {}
    for m in MODES:
        rs = [r for r in results if r.mode == m and r.ok]
        modes[m] = {
            "ok_reps": len(rs),
            "examples_per_s": _median([r.examples_per_s for r in rs]),
            "first_step_s": _median([r.first_step_s for r in rs]),
            "peak_rss_bytes": _median([max(r.peak_rss_bytes.values(), default=0) for r in rs]),
            "wire_bytes": _median([r.wire_bytes for r in rs]),
            "steps": _median([r.steps for r in rs]),
            "vs_native": _median(ratios(m, "native", "examples_per_s")),
            "rss_vs_native": _median(ratios(m, "native", "peak_rss_bytes")),
            "per_rep_examples_per_s": [round(r.examples_per_s, 1) for r in rs],
            "round_s": _median([r.round_s for r in rs if r.round_s is not None]),
            "round_overhead_s": _median([r.round_overhead_s for r in rs if r.round_overhead_s is not None]),
            "timeline": {k: statistics.median(r.timeline[k] for r in rs if k in r.timeline)
                         for k in sorted({k for r in rs for k in r.timeline})},
        }
    modes["attested"]["vs_plain"] = _median(ratios("attested", "plain", "examples_per_s"))
    # Flower's per-round overhead over fldsl's, paired per rep (> 1: Flower adds more per round)
    modes["flower"]["overhead_vs_attested"] = _median(ratios("flower", "attested", "round_overhead_s"))
    modes["flower"]["overhead_vs_plain"] = _median(ratios("flower", "plain", "round_overhead_s"))
    return modes


def _fmt(x: float | None, spec: str, unit: str = "") -> str:
    return "-" if x is None else f"{format(x, spec)}{unit}"


def print_table(console: Any, title: str, summary: dict[str, Any], failures: list[ModeResult],
                modes: list[str] | None = None) -> None:
    """The table of the modes that ran (all by default) and the lines that go with it."""
    from rich.table import Table

    shown = [m for m in MODES if modes is None or m in modes]
    table = Table(title=title)
    # Short headers: the table must fit an 80-column terminal.
    for col in ("mode", "ex/s", "×native", "1st step", "peak RSS", "RSS×nat", "wire", "reps"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for m in shown:
        s = summary[m]
        mib = None if s["peak_rss_bytes"] is None else s["peak_rss_bytes"] / 2**20
        # Flower's payload bytes are not counted (its processes report none)
        wire = None if m not in FEDERATED or s["wire_bytes"] is None else s["wire_bytes"] / 2**20
        wire_spec = ",.0f" if wire is not None and wire >= 10 else ".1f"
        table.add_row(m, _fmt(s["examples_per_s"], ",.0f"), _fmt(s["vs_native"], ".2f", "x"),
                      _fmt(s["first_step_s"], ".1f", " s"), _fmt(mib, ",.0f", " MiB"),
                      _fmt(s["rss_vs_native"], ".2f", "x"), _fmt(wire, wire_spec, " MiB"), str(s["ok_reps"]))
    console.print(table)
    console.print(f"attested / plain (paired): {_fmt(summary['attested'].get('vs_plain'), '.2f', 'x')}   "
                  "ratios are medians of per-rep ratios; modes interleaved rep by rep")
    for m in ("plain", "attested", "flower"):
        if summary[m].get("round_overhead_s") is not None:
            console.print(f"{m} FedAvg round: {summary[m]['round_s']:.2f} s, of which "
                          f"{summary[m]['round_overhead_s']:.2f} s aggregation + transfer (median)",
                          highlight=False)
        if m == "flower" and summary[m].get("ok_reps"):
            fl = summary[m]
            console.print(f"flower / fldsl round overhead (paired): "
                          f"{_fmt(fl.get('overhead_vs_attested'), '.2f', 'x')} attested, "
                          f"{_fmt(fl.get('overhead_vs_plain'), '.2f', 'x')} plain", highlight=False)
        tl = summary[m].get("timeline") or {}
        if tl:
            marks = [(k.removeprefix("phase:"), v) for k, v in sorted(tl.items(), key=lambda kv: kv[1])
                     if k in ("started", "connected", "aligned", "step") or k.startswith("phase:")]
            steps = ", ".join(f"{k} {v:.1f}" for k, v in marks)
            console.print(f"{m} start-up (s after spawn): {steps}", highlight=False)
    for f in failures:
        console.print(f"[red]{f.mode} rep {f.rep} failed: {f.error}", highlight=False)


# ---------------------------------------------------------------------------------------------------------


def run_bench(flp: Path, params: dict[str, str], *, reps: int, steps: int, modes: list[str], root: Path,
              trust_dir: Path, profile: bool, xla: bool, say: Any) -> tuple[dict[str, Any], list[ModeResult]]:
    """Every rep of every chosen mode; the results document (also written to ROOT/results.json) and the
    failed measurements. Raises the compiler's FldslError, the launcher's LaunchError or OSError before any
    measurement. ``say(text)``: progress for a human."""
    from fldsl.runtime import launcher as L

    chosen = list(modes)
    builder = Builder(flp, params, root / "build", steps)
    build = builder.current()
    L.ensure_trust(trust_dir, L.node_ids(build))
    skipped: dict[str, str] = {}
    if "flower" in chosen:
        reason = flower_skip_reason(build)
        if reason is not None:
            chosen.remove("flower")
            skipped["flower"] = reason
            say(f"flower: skipped — {reason}")
    harness = Harness(root)
    harness.profile = profile
    harness.xla = xla
    results: list[ModeResult] = []
    for rep in range(reps):
        order = [m for m in MODES if m in chosen]
        if rep % 2:
            order.reverse()
        for m in order:
            say(f"rep {rep + 1}/{reps}: {m}…")
            rep_dir = root / f"rep{rep}-{m}"
            if m == "native":
                results.append(run_native(harness, build, rep_dir, rep))
                continue
            if m == "flower":  # no attestation, so no code-digest retries
                results.append(run_flower(harness, builder.current(), rep_dir, rep))
                continue
            for attempt in range(CODE_CHANGE_RETRIES + 1):
                build = builder.current()
                res = run_federated(harness, m, build, rep_dir.with_name(
                    rep_dir.name + (f"-retry{attempt}" if attempt else "")), rep, trust_dir.resolve())
                if res.ok or not builder.changed():
                    break
            results.append(res)
    summary = summarise(results, reps)
    doc = {"pipeline": flp.stem, "params": dict(sorted(params.items())), "reps": reps, "xla": xla,
           "steps_at_least": steps, "build": str(build), "summary": summary, "skipped": skipped,
           "results": [asdict(r) for r in results], "modes": chosen}
    (root / "results.json").write_text(json.dumps(doc, sort_keys=True, indent=2) + "\n", encoding="utf-8")
    return doc, [r for r in results if not r.ok]
