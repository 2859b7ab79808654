"""``fldsl run FILE.flp | BUILD_DIR``: run a pipeline's nodes on this machine (or one node, ``--node``)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import RenderableType
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from fldsl.cli import (
    EXIT_ENV,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RUN_FAILED,
    EXIT_TRUST,
    output,
    parse_sets,
)
from fldsl.runtime.enclave_runner import ENCLAVES


def _build_dir(target: Path, params: dict[str, str]) -> Path:
    """A build dir as is; a .flp compiled first (the runtime itself never imports the compiler)."""
    if target.is_dir():
        if params:
            raise click.UsageError("--set only applies when running a .flp (a build dir is compiled already)")
        return target
    if target.suffix != ".flp":
        raise click.UsageError(f"{target}: expected a .flp pipeline or a build directory")
    from fldsl.api import load_or_compile
    from fldsl.diagnostics import FldslError

    try:
        return Path(load_or_compile(target, params))
    except FldslError as e:  # under --json: the diagnostics as objects (this printed nothing before)
        output.fail_diagnostics(e, EXIT_INPUT)


class RichDisplay:
    """One progress bar per node (step/total, loss, examples/s) while the run lasts, under a SIMULATED line
    from the moment a node reports that it attested with a simulated quote (the quote its peers accept; the
    final summary says the same: ``print_summary``)."""

    def __init__(self, console: Any) -> None:
        self.console = console
        self.progress: _BannerProgress | None = None
        self.tasks: dict[str, Any] = {}
        self.simulated: set[str] = set()  # nodes that reported a simulated quote

    def begin(self, launcher: Any) -> None:
        self.progress = _BannerProgress(
            TextColumn("[bold]{task.fields[node]:<18}"), TextColumn("{task.fields[phase]:<8}"),
            BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
            console=self.console, transient=False)
        for nid, st in sorted(launcher.nodes.items()):
            self.tasks[nid] = self.progress.add_task(nid, total=None, node=nid, phase=st.phase, info=st.role)
        self.progress.start()

    def update(self, st: Any) -> None:
        if self.progress is None:
            return
        if (st.attestation or {}).get("simulated") and st.id not in self.simulated:
            self.simulated.add(st.id)
            self.progress.banner = sim_banner(self.simulated)
        info = []
        if st.train_loss is not None:  # the batch's training loss; holdout metrics come at epoch ends
            info.append(f"train_loss {st.train_loss:.4f}")
        for k in ("loss", "auc", "accuracy"):
            if k in st.metrics:
                info.append(f"{k} {st.metrics[k]:.4f}")
        if st.examples_per_s:
            info.append(f"{st.examples_per_s:,.0f} ex/s")
        if st.error:
            info = [f"[red]{escape(st.error[:60])}"]
        self.progress.update(self.tasks[st.id], completed=st.step, total=st.total, phase=st.phase,
                             info="  ".join(info) or st.role)

    def end(self) -> None:
        if self.progress is not None:
            self.progress.stop()


class _BannerProgress(Progress):
    """rich's Progress with an optional line above the bars."""

    banner: str | None = None

    def get_renderables(self) -> Iterable[RenderableType]:
        if self.banner:
            yield Text(self.banner, style="bold yellow")
        yield from super().get_renderables()


def sim_banner(nodes: Iterable[str]) -> str:
    """The live display's line while simulated attestation is in use."""
    return f"SIMULATED attestation ({', '.join(sorted(nodes))}): {SIM_CLAIM}"


def root_failure(result: Any) -> Any:
    """The failed node whose message the summary shows: one refused on trust, else one whose input was bad
    (exit 2), else the first to fail. Its peers often fail a moment later ("closed the link"), and the
    launcher may see one of them exit first."""
    first = getattr(result, "first_failure", None)
    if first is None:
        return None
    def said(st: Any, code: int) -> bool:  # exited with it, or announced it before it was stopped
        return code in (st.exit_code, getattr(st, "error_code", None))

    for code in (EXIT_TRUST, EXIT_INPUT):
        if said(first, code):
            return first
        for _, st in sorted(result.nodes.items()):
            if said(st, code) and st.error:
                return st
    return first


def run_exit_code(result: Any) -> int:
    """``fldsl run``'s exit code: the launcher's (0, 1, 3, 130), except that a failed run whose cause is a
    node's bad input (its data; node exit 2) exits 2, as the README's table says."""
    codes = [c for st in result.nodes.values() for c in (st.exit_code, getattr(st, "error_code", None))]
    if result.exit_code == EXIT_RUN_FAILED and EXIT_INPUT in codes:
        return EXIT_INPUT
    return int(result.exit_code)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


RUNNERS = {"none": "no enclave (plain processes)", "gramine-direct": "Gramine LibOS (gramine-direct, no SGX)",
           "gramine-sgx": "SGX enclaves (gramine-sgx)"}
SIM_CLAIM = "the compiled plan and code ran with each party's own keys; not isolation from the host"


def print_summary(console: Any, result: Any) -> None:
    from rich.table import Table

    doc = result.to_json()
    state = "ok" if result.exit_code == 0 else "INTERRUPTED" if result.interrupted else "FAILED"
    table = Table(title=f"{doc['pipeline']} — {state} in {doc['seconds']:.1f} s", show_lines=False)
    for col in ("node", "role", "status", "steps", "metrics", "examples/s", "sent", "model"):
        table.add_column(col)
    for nid, n in doc["nodes"].items():
        metrics = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in sorted((n["metrics"] or {}).items()) if k != "epoch")
        status = "ok" if n["exit_code"] == 0 else f"[red]exit {n['exit_code']}"
        sent = sum((n["bytes_sent"] or {}).values())
        root = Path(result.run_dir).resolve()
        models = ", ".join(str(Path(p).relative_to(root)) if Path(p).is_relative_to(root) else p
                           for p in (n["exports"] or {}).values())
        table.add_row(nid, n["role"], status, str(n["steps"]), metrics or "-",
                      f"{n['examples_per_s']:,.0f}" if n["examples_per_s"] else "-",
                      _fmt_bytes(sent) if sent else "-", models or "-")
    console.print(table)
    backends = ", ".join(sorted({n["attestation"]["backend"] for n in doc["nodes"].values()
                                 if n.get("attestation", {}).get("backend")})) or "?"
    runner = RUNNERS.get(doc.get("enclave", "none"), doc.get("enclave"))
    simulated = f" — SIMULATED: {SIM_CLAIM}" if "sim" in backends else ""
    console.print(f"runner: {runner}; attestation: {backends}{simulated}", highlight=False)
    flows: dict[str, int] = {}
    for n in doc["nodes"].values():
        for f, b in (n["bytes_sent"] or {}).items():
            flows[f] = flows.get(f, 0) + b
    if flows:
        ft = Table(title="bytes sent per flow")
        ft.add_column("flow")
        ft.add_column("bytes", justify="right")
        for f, b in sorted(flows.items()):
            ft.add_row(f, _fmt_bytes(b))
        console.print(ft)
    console.print(f"run directory: {result.run_dir}  (metrics.jsonl, logs/, models/ sealed, checkpoints/)")
    if (Path(result.run_dir) / "audit").is_dir():
        console.print(f"signed record of what crossed each link: {result.run_dir}/audit/ (sealed); verify "
                      f"and summarise it with: fldsl audit {result.run_dir}", highlight=False)
    exports = [(nid, name, p) for nid, n in doc["nodes"].items() for name, p in (n["exports"] or {}).items()]
    if exports and result.exit_code == 0:
        nid, name, p = exports[0]
        console.print(f"models are sealed; the owner decrypts one with: fldsl model decrypt {p} -o model.npz "
                      f"--node {nid} --name {name}", highlight=False)
    owner = [p for n in doc["nodes"].values() for p in (n.get("owner_exports") or {}).values()]
    if owner and result.exit_code == 0:
        # Under SGX a sealed model opens only inside its enclave: these copies are what the owner can open.
        console.print("models encrypted to their owner's key (fldsl compile --owner-key); the owner opens "
                      "each with:", highlight=False)
        for p in owner:  # a SavedModel pack opens into a folder, the weights into an .npz file
            out = "OUT/" if p.endswith(".savedmodel.owner") else "OUT.npz"
            console.print(f"  fldsl model decrypt {p} --owner-key PRIVATE.pem -o {out}", highlight=False)
    if result.interrupted:
        console.print("interrupted: every node stopped at a step boundary; run again with "
                      f"`--run-dir {result.run_dir}` to resume from the last common checkpoint")
    failed = root_failure(result)
    if failed is not None:
        from fldsl.runtime.launcher import tail

        console.print(f"[red]node {failed.id} failed: {escape(failed.error or '')}")
        for line in tail(failed.log_path):
            console.print(f"  [dim]{failed.id}[/dim] | {line}", markup=True, highlight=False)


@click.command("run")
@click.argument("target", type=click.Path(exists=True, path_type=Path))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="override a pipeline parameter")
@click.option("--json", "as_json", is_flag=True, help="print one JSON document instead of the live display")
@click.option("--node", "only", metavar="PARTY.NODE", help="run this one node in the foreground")
@click.option("--run-dir", type=click.Path(path_type=Path), help="run dir (default runs/<pipeline>/<id>)")
@click.option("--trust-dir", type=click.Path(path_type=Path), default=Path(".fldsl/trust"), show_default=True,
              help="simulated trust root: one folder per party (made on first use for a local run; with "
              "--node, the node's party folder made by `fldsl trust init --party`)")
@click.option("--addresses", type=click.Path(path_type=Path),
              help="--node only: addresses.json (default <run-dir>/addresses.json)")
@click.option("--enclave", type=click.Choice(ENCLAVES), default="none",
              show_default=True,
              help="start each node inside Gramine from the signed build (fldsl compile --sign KEY)")
@click.option("--data-dir", "data_dir_items", multiple=True, metavar="NODE_ID=DIR",
              help="--enclave: the folder of the node's encrypted csv files (fldsl data encrypt ... "
              "-o DIR/), mounted at /fldsl/data. Repeatable.")
@click.option("--key-service", "key_service_items", multiple=True, metavar="NODE_ID=HOST:PORT",
              help="--enclave: the node's data owner's key service (fldsl keys serve). Repeatable.")
@click.option("--listen", metavar="HOST", default=None,
              help="--node: the address the node listens on (default 127.0.0.1; 0.0.0.0 or this host's "
              "address so that other hosts reach it at its entry of --addresses)")
@click.option("--data", "data_items", multiple=True, metavar="NAME=PATH",
              help="--node: read the node's csv data set NAME from PATH on this machine. Repeatable.")
@click.option("--connect-timeout", type=click.FloatRange(min=1), default=None, metavar="SECONDS",
              help="--node: how long to wait for the peers (default 120 s; other parties may start later)")
@click.option("--allow-rollback", is_flag=True,
              help="resume even where a node's newest checkpoint is gone (rollback detected); not with "
              "--enclave")
def command(target: Path, sets: tuple[str, ...], as_json: bool, only: str | None, run_dir: Path | None,
            trust_dir: Path, addresses: Path | None, enclave: str, data_dir_items: tuple[str, ...],
            key_service_items: tuple[str, ...], listen: str | None, data_items: tuple[str, ...],
            connect_timeout: float | None, allow_rollback: bool) -> None:
    """Run a pipeline: every node as a local process over attested gRPC, with live progress."""
    from rich.console import Console

    from fldsl.runtime import launcher as L

    data_dirs = {nid: Path(d) for nid, d in _node_pairs(data_dir_items, "--data-dir", "DIR").items()}
    key_services = _key_services(key_service_items)
    if only is not None and (data_dirs or key_services):
        raise click.UsageError("--node runs one node from --addresses: put its key_service in that file")
    node_flags = [*(["--listen", listen] if listen else []), *(f"--data={item}" for item in data_items),
                  *(["--connect-timeout", str(connect_timeout)] if connect_timeout else [])]
    if only is None and node_flags:
        raise click.UsageError("--listen, --data and --connect-timeout go with --node (one party's node); a "
                               "local run of every node listens on loopback and reads the plans' paths")
    if allow_rollback and enclave != "none":
        # The signed manifest fixes an enclave's command line; a host-chosen switch cannot reach it.
        raise click.UsageError("--allow-rollback cannot reach nodes inside an enclave (their command line is "
                               "signed); resume them without it, or run without --enclave")
    build = _build_dir(target, parse_sets(sets))
    try:
        if only is not None:  # one party's node: its own trust folder only (fldsl trust init --party)
            if allow_rollback:
                node_flags.append("--allow-rollback")
            _run_one(build, only, run_dir, trust_dir, addresses, node_flags)
        console = Console(stderr=as_json)
        if not console.is_terminal and "COLUMNS" not in os.environ:
            # Logs and CI capture output: Rich's 80-column default would wrap the summary table unreadably.
            console.width = 140
        display = None if as_json else RichDisplay(console)
        node_args = {nid: ["--allow-rollback"] for nid in L.node_ids(build)} if allow_rollback else None
        result = L.run_pipeline(build, run_dir=run_dir, trust_dir=trust_dir, display=display,
                                enclave=enclave, data_dirs=data_dirs,  # type: ignore[arg-type]
                                key_services=key_services, node_args=node_args)
    except L.LaunchError as e:
        output.fail(e.exit_code, str(e))
    except KeyboardInterrupt:  # Ctrl-C outside the launcher's wait loop (during start-up)
        output.fail(EXIT_INTERRUPTED, "interrupted")
    except OSError as e:
        output.fail(EXIT_ENV, str(e))
    result.exit_code = run_exit_code(result)
    if as_json:
        doc = result.to_json()
        failed = root_failure(result) if result.exit_code else None
        if failed is not None:
            doc["error"] = {"message": f"node {failed.id} failed: {failed.error or ''}", "hint": None}
        output.emit(result.exit_code, **doc)
    else:
        print_summary(console, result)
    sys.exit(result.exit_code if result.exit_code else EXIT_OK)


def _node_pairs(items: tuple[str, ...], flag: str, what: str) -> dict[str, str]:
    """``NODE_ID=VALUE`` options as a dict; a malformed or repeated node is a usage error."""
    out: dict[str, str] = {}
    for item in items:
        nid, sep, value = item.partition("=")
        nid, value = nid.strip(), value.strip()
        if not sep or not nid or not value:
            raise click.UsageError(f"{flag} expects NODE_ID={what}, got `{item}`")
        if nid in out:
            raise click.UsageError(f"{flag} {nid} given twice")
        out[nid] = value
    return out


def _key_services(items: tuple[str, ...]) -> dict[str, str]:
    out = _node_pairs(items, "--key-service", "HOST:PORT")
    if not out:
        return out
    from fldsl.runtime.transport import check_host_port  # (imports gRPC: only when needed)

    for nid, address in out.items():
        try:
            check_host_port(address)
        except ValueError as e:
            raise click.UsageError(f"--key-service {nid}: {e}") from None
    return out


def _run_one(build: Path, only: str, run_dir: Path | None, trust_dir: Path, addresses: Path | None,
             node_flags: list[str]) -> NoReturn:
    from fldsl.runtime import launcher as L

    if only not in L.node_ids(build):
        raise L.LaunchError(f"{build}: no node `{only}` (nodes: {', '.join(L.node_ids(build))})")
    if run_dir is None:
        raise L.LaunchError("--node needs --run-dir (shared with the other nodes' addresses.json)")
    addresses = addresses or run_dir / "addresses.json"
    if not addresses.exists():
        raise L.LaunchError(f"{addresses}: missing; write one ({{node: {{host, port, bootstrap_port}}}}) "
                            "or pass --addresses")
    # Its own isolated interpreter (python -I), like every node the launcher starts: this CLI's environment
    # (PYTHONPATH, user site) does not reach the node. The node replaces this process, so a container's or
    # a supervisor's signals (SIGTERM, SIGKILL) reach the node itself, never an orphan left listening.
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = L.node_command(build, only, addresses, run_dir, trust_dir, node_flags)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, L.node_env())
