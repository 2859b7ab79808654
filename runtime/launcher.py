"""The local launcher behind ``fldsl run``: one OS process per node on loopback, live progress, a summary.

It writes ``runs/<pipeline>/<run-id>/``: ``addresses.json``, ``metrics.jsonl`` (every progress event of every
node, one JSON object a line), ``logs/<node>.log`` (each node's stderr), ``checkpoints/<node>/`` and
``models/`` (sealed, written by the nodes themselves). A node that fails stops the others (SIGINT, then
SIGKILL after a grace period); Ctrl-C does the same for all nodes. Exit code: 0 all ok, 3 a node failed a
trust check, 2 a node's input (its data) was bad, 1 any other failure, 130 interrupted.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from fldsl.artifacts import PipelineFile, Plan, load_model, node_dir
from fldsl.exitcodes import EXIT_INPUT, EXIT_INTERRUPTED, EXIT_OK, EXIT_TRUST
from fldsl.exitcodes import EXIT_RUN_FAILED as EXIT_FAILED
from fldsl.runtime import enclave_runner
from fldsl.runtime.enclave_runner import Enclave
from fldsl.runtime.progress import parse_line

GRACE_S = 10.0


class LaunchError(Exception):
    """The run cannot start (bad build dir, no free port); user-facing. ``exit_code``: 2 input, 4 a tool
    is missing."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class NodeState:
    id: str
    role: str
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    phase: str = "starting"
    step: int = 0
    total: int | None = None
    train_loss: float | None = None  # the last step's training loss (progress bar)
    examples_per_s: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    done: dict[str, Any] | None = None
    error: str | None = None
    error_code: int | None = None  # the exit code the node said it would use (its error event)
    exit_code: int | None = None
    restarting: bool = False
    restarts: int = 0
    attestation: dict[str, Any] = field(default_factory=dict)  # backend, simulated, runner (from the node)


def _audit_dir(run_dir: Path, node: str) -> str | None:
    folder = run_dir / "audit" / node
    return str(folder) if folder.is_dir() else None


@dataclass
class RunResult:
    pipeline: str
    run_dir: Path
    exit_code: int
    nodes: dict[str, NodeState]
    seconds: float
    interrupted: bool = False
    enclave: str = "none"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pipeline": self.pipeline, "run_dir": str(self.run_dir),
                               "exit_code": self.exit_code, "seconds": round(self.seconds, 3),
                               "interrupted": self.interrupted, "enclave": self.enclave, "nodes": {}}
        for nid, st in sorted(self.nodes.items()):
            done = st.done or {}
            out["nodes"][nid] = {
                "role": st.role, "exit_code": st.exit_code, "error": st.error, "steps": st.step,
                "metrics": done.get("metrics", st.metrics), "history": done.get("history", st.history),
                "examples_per_s": done.get("examples_per_s", st.examples_per_s),
                "bytes_sent": done.get("bytes_sent", {}), "bytes_received": done.get("bytes_received", {}),
                "exports": done.get("exports", {}), "owner_exports": done.get("owner_exports", {}),
                # The node's signed record of its links (the host's path: inside Gramine the node's differs).
                "audit": _audit_dir(self.run_dir, nid),
                "log": str(st.log_path) if st.log_path else None,
                "attestation": st.attestation,
            }
        return out


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct free TCP ports (bound together so none is handed out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def node_ids(build_dir: Path) -> list[str]:
    nodes = build_dir / "nodes"
    if not nodes.is_dir():
        raise LaunchError(f"{build_dir}: not a build directory (no nodes/); "
                          "compile a .flp with `fldsl compile`")
    ids = sorted(p.name for p in nodes.iterdir() if (p / "plan.json").is_file())
    if not ids:
        raise LaunchError(f"{build_dir}: no node plans under nodes/")
    return ids


def pipeline_name(build_dir: Path, ids: list[str]) -> str:
    pf = build_dir / "pipeline.json"
    if pf.is_file():
        return load_model(PipelineFile, pf).pipeline
    return load_model(Plan, node_dir(build_dir, ids[0]) / "plan.json").pipeline


def new_run_dir(root: Path, pipeline: str) -> Path:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    base = root / pipeline
    for i in range(1000):
        cand = base / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            cand.mkdir(parents=True)
            return cand
        except FileExistsError:
            continue
    raise LaunchError(f"{base}: cannot create a fresh run directory")


def write_addresses(path: Path, ids: list[str], host: str = "127.0.0.1",
                    key_services: dict[str, str] | None = None) -> None:
    """Fresh ports for every node, and the key service of each node that reads encrypted data."""
    from fldsl.runtime.transport import Addresses, save_addresses

    ports = free_ports(2 * len(ids), host)
    doc: dict[str, dict[str, Any]] = {
        nid: {"host": host, "port": ports[2 * i], "bootstrap_port": ports[2 * i + 1]}
        for i, nid in enumerate(ids)}
    for nid, address in (key_services or {}).items():
        doc[nid]["key_service"] = address
    save_addresses(Addresses.model_validate(doc), path)


def ensure_trust(trust_dir: Path, ids: list[str]) -> list[str]:
    """Simulate every party of the build on this machine: one trust folder per party under ``trust_dir``,
    each holding only that party's secrets and pinning the others' public identities. Created on first use;
    returns what was created. (Across organisations each party makes only its own: ``fldsl trust init``.)"""
    from fldsl.runtime.attestation.backend import AttestationError
    from fldsl.runtime.attestation.parties import local_deployment, party_of

    try:
        return local_deployment(trust_dir, [party_of(n) for n in ids])
    except AttestationError as e:
        raise LaunchError(str(e), EXIT_TRUST) from None


def party_trust_dir(trust_dir: Path, nid: str) -> Path:
    """The trust folder a node is given: its own party's, never the whole trust root."""
    from fldsl.runtime.attestation.parties import party_folder, party_of

    return party_folder(trust_dir, party_of(nid))


def node_command(build_dir: Path, nid: str, addresses: Path, run_dir: Path, trust_dir: Path,
                 extra: list[str] | None = None) -> list[str]:
    # -I (isolated mode): no PYTHONPATH, PYTHONSTARTUP, user site or current folder, so the node runs the
    # code its simulated measurement covers and nothing a host slipped in beside it.
    return [sys.executable, "-I", "-m", "fldsl.runtime.node", "--build", str(build_dir), "--node", nid,
            "--addresses", str(addresses), "--run-dir", str(run_dir),
            "--trust-dir", str(party_trust_dir(trust_dir, nid)),
            *(extra or [])]


def node_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    env["PYTHONUNBUFFERED"] = "1"
    # Several nodes share the machine's cores: keep each one's thread pools small.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class LaunchHooks(Protocol):
    """What a Python caller (the bench, ``fldsl.bench.harness``) may change about a local run without
    subclassing the launcher: the process each node starts as, and a look at every progress event."""

    def node_command(self, node_id: str, command: list[str]) -> tuple[list[str], dict[str, str]]:
        """The command and environment that start ``node_id`` (given its ordinary ``command``); called right
        before it starts. Not with an enclave: the signed manifest fixes the command there."""
        ...

    def on_event(self, node_id: str, event: dict[str, Any]) -> None:
        """Every progress event of a node, as it arrives (before the launcher's own bookkeeping)."""
        ...


class Launcher:
    """Starts the nodes of a build dir and follows them until all end (or one fails)."""

    def __init__(self, build_dir: Path, *, run_dir: Path, trust_dir: Path, display: Any = None,
                 node_args: dict[str, list[str]] | None = None, enclave: Enclave = "none",
                 data_dirs: dict[str, Path] | None = None, key_services: dict[str, str] | None = None,
                 hooks: LaunchHooks | None = None) -> None:
        if hooks is not None and enclave != "none":
            raise LaunchError("launch hooks change a node's command line; an enclave's is signed")
        self.hooks = hooks
        self.build_dir = build_dir.resolve()
        self.enclave: Enclave = enclave
        self.run_dir = run_dir.resolve()
        self.trust_dir = trust_dir.resolve()
        self.ids = node_ids(self.build_dir)
        self.pipeline = pipeline_name(self.build_dir, self.ids)
        self.nodes = {nid: NodeState(id=nid, role=load_model(
            Plan, node_dir(self.build_dir, nid) / "plan.json").role) for nid in self.ids}
        self.display = display
        self.node_args = node_args or {}
        self.data_dirs = data_dirs or {}  # node id -> host folder of its encrypted csv files (enclave runs)
        self.key_services = key_services or {}  # node id -> HOST:PORT of its data owner's key service
        self._lock = threading.Lock()
        self._metrics: TextIO | None = None
        self._changed = threading.Event()

    # -- events ---------------------------------------------------------------------------------------------

    def _on_event(self, st: NodeState, ev: dict[str, Any]) -> None:
        if self.hooks is not None:
            self.hooks.on_event(st.id, ev)
        kind = ev.get("event")
        with self._lock:
            if kind == "phase":
                st.phase = str(ev.get("name"))
            elif kind == "attested":
                st.attestation = {k: ev[k] for k in ("backend", "simulated", "runner") if k in ev}
            elif kind == "plan":
                st.total = ev.get("total_steps")
                st.step = ev.get("resumed_from") or 0
            elif kind == "step":
                st.phase = "train"
                st.step = int(ev.get("step", st.step))
                st.total = ev.get("total", st.total)
                if ev.get("train_loss") is not None:
                    st.train_loss = float(ev["train_loss"])
                if ev.get("examples_per_s"):
                    st.examples_per_s = float(ev["examples_per_s"])
            elif kind == "checkpoint":
                # Unthrottled, unlike step events (one per 0.25 s): a checkpoint at step k means k steps are
                # done, so fast runs still show (and fault tests still see) every checkpointed step.
                st.step = max(st.step or 0, int(ev.get("step", 0)))
            elif kind == "epoch":
                st.metrics = dict(ev.get("metrics") or {})
                st.history.append({"epoch": ev.get("epoch"), **st.metrics})
            elif kind == "done":
                if self.enclave != "none":  # the node names its files by their enclave paths
                    for key in ("exports", "owner_exports"):
                        ev[key] = {k: enclave_runner.host_path(v, self.run_dir)
                                   for k, v in (ev.get(key) or {}).items()}
                st.done = ev
                st.phase = "done"
            elif kind == "error":
                st.error = str(ev.get("message"))
                code = ev.get("code")
                st.error_code = code if isinstance(code, int) else None
                st.phase = "failed"
            if self._metrics is not None:
                self._metrics.write(json.dumps(ev, sort_keys=True) + "\n")
                self._metrics.flush()
        if self.display is not None:
            self.display.update(st)

    def _reader(self, st: NodeState, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        with open(st.log_path, "a", encoding="utf-8") as log:  # type: ignore[arg-type]
            for line in proc.stdout:
                ev = parse_line(line)
                if ev is None:
                    log.write(line)  # library output on stdout: keep it, but in the log
                    log.flush()
                    continue
                self._on_event(st, ev)
        self._changed.set()

    # -- running --------------------------------------------------------------------------------------------

    def start(self) -> None:
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        # Fresh ports on every start: a resumed run reuses the directory, not the (maybe taken) ports.
        addresses = self.run_dir / "addresses.json"
        write_addresses(addresses, self.ids, key_services=self.key_services)
        self._metrics = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        for nid, st in self.nodes.items():
            st.log_path = self.run_dir / "logs" / f"{nid}.log"
            self._spawn(st)

    def _spawn(self, st: NodeState) -> None:
        cwd: Path | None = None
        env = node_env()
        if self.enclave == "none":
            cmd = node_command(self.build_dir, st.id, self.run_dir / "addresses.json", self.run_dir,
                               self.trust_dir, self.node_args.get(st.id))
            if self.hooks is not None:
                cmd, env = self.hooks.node_command(st.id, cmd)
        else:  # the manifest fixes the node's command line: nothing to pass but the manifest
            cmd, cwd = enclave_runner.prepare(self.build_dir, st.id, self.run_dir,
                                              party_trust_dir(self.trust_dir, st.id),
                                              self.enclave, self.data_dirs.get(st.id))
        err = open(st.log_path, "a", encoding="utf-8")  # type: ignore[arg-type]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                text=True, bufsize=1, env=env, cwd=cwd)
        err.close()
        st.proc = proc
        threading.Thread(target=self._reader, args=(st, proc), daemon=True, name=f"read-{st.id}").start()

    def restart_node(self, nid: str) -> None:
        """Kill one node (SIGKILL: no clean shutdown) and start it again on the same address; the others
        keep running, notice the peer's new attested connection and agree with it where to resume."""
        st = self.nodes[nid]
        with self._lock:
            st.restarting = True
        old = st.proc
        if old is not None and old.poll() is None:
            old.kill()
            old.wait()
        st.restarts += 1
        st.phase = "restart"
        self._spawn(st)
        with self._lock:
            st.restarting = False

    def stop_all(self, sig: int | None = None) -> None:
        """Signal every running node; by default the signal that makes it stop at a step boundary: SIGINT,
        or SIGTERM under Gramine, which passes only SIGTERM on to the enclave (sys.enable_sigterm_injection
        in the manifest) and would leave the node running until the grace period's SIGKILL."""
        if sig is None:
            sig = signal.SIGINT if self.enclave == "none" else signal.SIGTERM
        for st in self.nodes.values():
            if st.proc is not None and st.proc.poll() is None:
                try:
                    st.proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    def wait(self) -> tuple[int, bool]:
        """Follow the nodes; returns (exit code, interrupted)."""
        interrupted = False
        failed: NodeState | None = None
        stop_sent: float | None = None
        try:
            while True:
                running = 0
                for st in self.nodes.values():
                    with self._lock:  # a node being restarted is running, whatever its old process says
                        code = None if st.restarting else (st.proc.poll() if st.proc else 0)
                    if code is None:
                        running += 1
                    elif st.exit_code is None:
                        st.exit_code = code
                        if code != 0 and failed is None and not interrupted:
                            failed = st
                            if st.error is None:
                                st.error = f"exited with code {code}"
                            self.stop_all()
                            stop_sent = time.monotonic()
                if running == 0:
                    break
                if stop_sent is not None and time.monotonic() - stop_sent > GRACE_S:
                    self.stop_all(signal.SIGKILL)
                    stop_sent = time.monotonic() + 3600
                self._changed.wait(0.2)
                self._changed.clear()
        except KeyboardInterrupt:
            interrupted = True
            self.stop_all()  # the terminal usually sent SIGINT to the nodes already; make sure
            deadline = time.monotonic() + GRACE_S
            for st in self.nodes.values():
                if st.proc is None:
                    continue
                try:
                    st.exit_code = st.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    st.proc.kill()
                    st.exit_code = st.proc.wait()
        finally:
            time.sleep(0.05)
            if self._metrics is not None:
                with self._lock:
                    self._metrics.close()
                    self._metrics = None
        if interrupted:
            return EXIT_INTERRUPTED, True
        if failed is not None:
            self.first_failure = failed
            # What each node said it would exit with counts too: a node stopped by the launcher while it
            # wound down (after its peers saw the streams close and failed first) still said why.
            codes = [c for st in self.nodes.values() for c in (st.exit_code, st.error_code)]
            # The cause over its consequences: a trust refusal, else a node's bad input (its data), else a
            # failure; the peers of the failed node usually end a moment later with "closed the link".
            for code in (EXIT_TRUST, EXIT_INPUT):
                if code in codes:
                    return code, False
            return EXIT_FAILED, False
        return EXIT_OK, False

    first_failure: NodeState | None = None


def tail(path: Path | None, n: int = 15) -> list[str]:
    if path is None or not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return lines[-n:]


def run_pipeline(build_dir: Path, *, runs_root: Path = Path("runs"), run_dir: Path | None = None,
                 trust_dir: Path = Path(".fldsl/trust"), display: Any = None,
                 node_args: dict[str, list[str]] | None = None, enclave: Enclave = "none",
                 data_dirs: dict[str, Path] | None = None, key_services: dict[str, str] | None = None
                 ) -> RunResult:
    """Run every node of a build dir on this machine; returns when all have ended. Inside an enclave,
    ``data_dirs`` / ``key_services`` (node id -> folder / HOST:PORT) give the nodes with csv data their
    encrypted files and their data owner's key service."""
    ids = node_ids(build_dir)
    ensure_trust(trust_dir, ids)
    try:
        enclave_runner.check_runnable(build_dir, ids, enclave)
        enclave_runner.check_data_inputs(build_dir, ids, enclave, data_dirs or {}, key_services or {})
    except enclave_runner.EnclaveError as e:
        raise LaunchError(str(e), e.exit_code) from None
    pipeline = pipeline_name(build_dir, ids)
    if run_dir is None:
        run_dir = new_run_dir(runs_root, pipeline)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_dir = run_dir.resolve()
    launcher = Launcher(build_dir, run_dir=run_dir, trust_dir=trust_dir, display=display, node_args=node_args,
                        enclave=enclave, data_dirs=data_dirs, key_services=key_services)
    t0 = time.monotonic()
    if display is not None:
        display.begin(launcher)
    try:
        launcher.start()
        code, interrupted = launcher.wait()
    finally:
        if display is not None:
            display.end()
    result = RunResult(pipeline=pipeline, run_dir=run_dir, exit_code=code, nodes=launcher.nodes,
                       seconds=time.monotonic() - t0, interrupted=interrupted, enclave=enclave)
    result.first_failure = launcher.first_failure  # type: ignore[attr-defined]
    return result
