"""One fldsl node: ``python -m fldsl.runtime.node --build DIR --node ID --addresses FILE --run-dir DIR``.

What a container or ``gramine-sgx`` runs (the manifest fixes these arguments). Steps: load plan / policy /
pins → check plan.json and policy.json against the sha256 listed in the node's rendered manifest (refuse to
start on mismatch) → attest (sim backend by default, Gramine's ``/dev/attestation`` when present) → RA-TLS
identity bound to the pins digest → attested transport to every peer → the role loop (alignment, training,
checkpoints, export) → final metrics. Under Gramine, a node with csv data first fetches its data key from its
data owner's key service (with its RA-TLS identity) and reads the files from the encrypted mount
``/fldsl/data`` (docs/keys.md).

stdout carries only machine-readable progress lines (``fldsl.runtime.progress``) for the launcher; logs go
to stderr. Exit codes: 0 ok, 1 failure, 2 bad input (its data, its --data bindings), 3 trust failure (a peer
refused us or we refused it, or our own artifacts fail their integrity check), 130 interrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: the node starts (and fails on bad input) before heavy imports
    from fldsl.artifacts import DataSpec, Plan
    from fldsl.runtime.attestation.ratls import LocalIdentity
    from fldsl.runtime.progress import Progress
    from fldsl.runtime.transport import Addresses
    from fldsl.runtime.transport.channel import ChannelSecurity

from fldsl.exitcodes import EXIT_INPUT, EXIT_INTERRUPTED, EXIT_OK, EXIT_TRUST
from fldsl.exitcodes import EXIT_RUN_FAILED as EXIT_FAILED

MAX_REJOINS = 10  # a peer restarting more often than this in one run is crashing, or abusing rejoins
# How long past the connect deadline the node waits for the transport's own verdict on a peer (its last
# Hello attempt, up to 10 s, plus its longest back-off, 2 s).
VERDICT_GRACE_S = 15.0
# The manifest's encrypted mount (node.manifest.template.j2): { path = "/fldsl/data", uri = "file:data",
# key_name = "data" }.
ENCLAVE_DATA_DIR = "/fldsl/data"
DATA_KEY = "data"
MEASURED = ("plan.json", "policy.json")

log = logging.getLogger("fldsl.node")


class NodeError(Exception):
    """A user-facing failure of the node; ``code`` is its exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fldsl.runtime.node", description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--build", type=Path, help="build directory (fldsl compile output)")
    where.add_argument("--node-dir", type=Path, help="this node's folder of a build (nodes/<id>/)")
    p.add_argument("--node", required=True, help="node id, e.g. shop.trainer")
    p.add_argument("--addresses", required=True, type=Path, help="addresses.json written by the launcher")
    p.add_argument("--run-dir", required=True, type=Path, help="where checkpoints, models and logs go")
    p.add_argument("--trust-dir", type=Path, default=Path(".fldsl/trust"),
                   help="simulated trust material (fldsl trust init); sim backend only")
    p.add_argument("--attestation", choices=["auto", "sim", "gramine"], default="auto")
    p.add_argument("--runner", choices=["native", "gramine"], default="native",
                   help="gramine: started by gramine-direct/-sgx from a signed manifest (--manifest, "
                   "--sigstruct)")
    p.add_argument("--manifest", type=Path, help="the signed manifest Gramine runs (runner gramine)")
    p.add_argument("--sigstruct", type=Path, help="the node's SIGSTRUCT, <node>.sig (runner gramine)")
    p.add_argument("--allow-rollback", action="store_true",
                   help="resume from the newest step every node holds even where a rollback was detected")
    p.add_argument("--listen", metavar="HOST", default=None,
                   help="the address to listen on (default: `listen` of this node's entry in addresses.json, "
                   "else 127.0.0.1; 0.0.0.0 or the host's address to be reachable from other hosts); the "
                   "ports are this node's entry of addresses.json")
    p.add_argument("--data", dest="data_bindings", action="append", default=[], metavar="NAME=PATH",
                   help="read data set NAME (csv) from PATH on this machine instead of the path in the plan; "
                   "repeatable (a party binds its own files where they live)")
    p.add_argument("--predict", type=Path, default=None, metavar="MODEL",
                   help="score new rows instead of training (vertical: split over the attested channel): "
                   "MODEL is this node's sealed SavedModel pack (<node>_model.savedmodel.sealed, opened with "
                   "its own sealing key), a run folder holding it, or a folder `fldsl model decrypt` wrote")
    p.add_argument("--predict-out", type=Path, default=None, metavar="CSV",
                   help="--predict, label owner: where `id,score` goes (default <run-dir>/scores.csv)")
    p.add_argument("--connect-timeout", type=float, default=120.0)
    p.add_argument("--recv-timeout", type=float, default=300.0)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------
# integrity of the node's own artifacts
# ---------------------------------------------------------------------------------------------------------


def manifest_path(ndir: Path, args: argparse.Namespace | None = None) -> Path:
    if args is not None and args.runner == "gramine":
        if args.manifest is None or args.sigstruct is None:
            raise NodeError("--runner gramine needs --manifest and --sigstruct (the signed build's files)",
                            EXIT_TRUST)
        return Path(args.manifest)
    found = sorted(ndir.glob("*.manifest.toml"))
    if len(found) != 1:
        raise NodeError(f"{ndir}: expected one rendered manifest (*.manifest.toml), found {len(found)}; "
                        "recompile the pipeline", EXIT_TRUST)
    return found[0]


def listed_hashes(toml_text: str, where: Path) -> dict[str, str]:
    """``{file name: sha256}`` of the node files the manifest lists as trusted: the compiler's own reader
    (fldsl.trusted_files), so the node refuses whatever the compiler would (fails closed, exit 3)."""
    from fldsl.trusted_files import TrustedFilesError, trusted_node_files

    try:
        return trusted_node_files(toml_text)
    except TrustedFilesError as e:
        raise NodeError(f"{where}: {e}; recompile the pipeline", EXIT_TRUST) from None


def check_artifacts(ndir: Path, args: argparse.Namespace | None = None) -> bytes:
    """Refuse to start when plan.json / policy.json differ from what the manifest measured (under Gramine
    the LibOS enforces it too; the check stays so that both runners fail the same way).

    Returns the manifest bytes (the sim backend's measurement input)."""
    mpath = manifest_path(ndir, args)
    data = mpath.read_bytes()
    if args is not None and args.runner == "gramine":
        # Gramine itself refuses to open a trusted file whose hash differs (then loading the plan fails
        # with the file named); parsing the 2 MB signed manifest here would only repeat that, slowly.
        return data
    listed = listed_hashes(data.decode("utf-8", errors="replace"), mpath)
    for name in MEASURED:
        want = listed.get(name)
        if want is None:
            raise NodeError(f"{mpath}: {name} is not among the trusted files; recompile the pipeline",
                            EXIT_TRUST)
        got = hashlib.sha256((ndir / name).read_bytes()).hexdigest()
        if got != want:
            raise NodeError(f"{name} was modified after compile: sha256 {got[:16]}… but the manifest "
                            f"({mpath.name}) lists {want[:16]}…; recompile with `fldsl compile`", EXIT_TRUST)
    return data


# ---------------------------------------------------------------------------------------------------------
# the node
# ---------------------------------------------------------------------------------------------------------


def _backend(args: argparse.Namespace, manifest: bytes, identity: Any,
             peers: list[str]) -> tuple[Any, dict[str, bytes]]:
    """The attestation backend and ``{party: sim root}``: the roots peers' sim quotes must chain to."""
    use_gramine = args.attestation == "gramine" or (
        args.attestation == "auto" and Path("/dev/attestation/quote").exists())
    if use_gramine:
        from fldsl.runtime.attestation.gramine import GramineBackend

        return GramineBackend(), {}
    from fldsl.runtime.attestation.backend import AttestationError
    from fldsl.runtime.attestation.parties import folder_party, party_of, sim_roots
    from fldsl.runtime.attestation.sim import SimBackend

    # Its own party's folder only: quoting with another party's keys would be impersonation, and a folder
    # holding several parties' secrets is exactly what per-party trust removes.
    try:
        owner = folder_party(args.trust_dir)
        roots = sim_roots(args.trust_dir, sorted({party_of(p) for p in peers}))
    except AttestationError as e:
        raise NodeError(f"trust folder: {e}", EXIT_TRUST) from None
    if owner != party_of(args.node):
        raise NodeError(f"{args.trust_dir} is party `{owner}`'s trust folder; node {args.node} belongs to "
                        f"party `{party_of(args.node)}` and quotes only with its own party's keys",
                        EXIT_TRUST)
    missing = sorted({party_of(p) for p in peers} - set(roots))
    if missing:
        raise NodeError(f"{args.trust_dir}: no identity pinned for party {', '.join(missing)}, whose nodes "
                        f"this node talks to; get each one's identity.json and run `fldsl trust add-peer "
                        f"FILE --party {owner}`", EXIT_TRUST)
    if args.runner == "gramine":  # gramine-direct: no /dev/attestation, report the signed manifest
        backend = SimBackend.for_signed_node(args.trust_dir, signed_manifest=manifest,
                                             sigstruct=Path(args.sigstruct).read_bytes())
    else:
        backend = SimBackend.for_node(args.trust_dir, manifest_toml=manifest, identity=identity)
    return backend, roots


def _key_service(addresses: Addresses, node: str) -> str:
    try:
        address = addresses[node].key_service
    except KeyError as e:
        raise NodeError(str(e.args[0])) from None
    if not address:
        raise NodeError(f"{node} reads csv data inside the enclave, so it needs its data owner's key "
                        f"service, but addresses.json names none for it (fldsl run --key-service "
                        f"{node}=HOST:PORT)")
    return str(address)


def _check_protected(spec: DataSpec) -> None:
    """Read the whole encrypted file once, before the node talks to any peer: Gramine checks it against the
    key and the path bound into it, and its refusal is only EACCES, which the role's CSV reader would
    report as an unreadable file. Here it becomes a trust failure that names the file."""
    path = str(spec.path)
    name = Path(path).name
    try:
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass
    except FileNotFoundError:
        raise NodeError(f"data set `{spec.name}`: {path} does not exist: the node's data folder has no "
                        f"{name} (fldsl run --data-dir NODE=DIR, DIR/{name} made by `fldsl data encrypt`)"
                        ) from None
    except PermissionError:
        raise NodeError(f"trust failure: data set `{spec.name}`: {path} fails Gramine's integrity check: it "
                        f"was not encrypted with the key this node's key service sent, was encrypted for "
                        f"another name, or was modified (encrypt it with `fldsl data encrypt PLAIN --key KEY "
                        f"-o DIR/`, DIR being the node's --data-dir)", EXIT_TRUST) from None
    except OSError as e:
        raise NodeError(f"data set `{spec.name}`: cannot read {path}: {e.strerror}") from None


def _listen_host(args: argparse.Namespace, addresses: Addresses) -> str:
    # The command line (fldsl run --node --listen), else the deployment's addresses file (which reaches a node
    # whose command line is signed into its enclave), else loopback.
    try:
        entry = addresses[args.node].listen
    except KeyError:
        entry = None
    return args.listen or entry or "127.0.0.1"


def bind_data(plan: Plan, bindings: list[str]) -> Plan:
    """The plan with each ``NAME=PATH`` binding's csv path replaced. Where a data set lives is the party's
    business, not a security property (the node checks the file against the plan's columns when it loads
    it); which data sets exist, and their columns, are fixed by the measured plan."""
    if not bindings:
        return plan
    from fldsl.artifacts import FILE_READERS

    by_name = {ds.name: ds for ds in plan.data}
    paths: dict[str, str] = {}
    for item in bindings:
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise NodeError(f"--data expects NAME=PATH, got `{item}`", EXIT_INPUT)
        spec = by_name.get(name)
        if spec is None:
            known = ", ".join(sorted(by_name)) or "none"
            raise NodeError(f"--data {name}: {plan.node} reads no data set `{name}` (its data sets: {known})",
                            EXIT_INPUT)
        if spec.reader not in FILE_READERS:
            raise NodeError(f"--data {name}: data set `{name}` is generated ({spec.reader}), not read from a "
                            "file", EXIT_INPUT)
        if name in paths:
            raise NodeError(f"--data {name} given twice", EXIT_INPUT)
        if not Path(path).is_file():
            raise NodeError(f"--data {name}: {path}: no such file", EXIT_INPUT)
        paths[name] = str(Path(path).resolve())
    data = [ds.model_copy(update={"path": paths[ds.name]}) if ds.name in paths else ds for ds in plan.data]
    return plan.model_copy(update={"data": data})


def provision_data(args: argparse.Namespace, plan: Plan, identity: LocalIdentity, addresses: Addresses,
                   progress: Progress) -> Plan:
    """The plan to run: as it is, or, under Gramine with csv data, the plan reading its csv files from the
    encrypted mount, once the data key is installed (fetched from the key service with the node's attested
    RA-TLS identity, which the service verifies as a peer would)."""
    from fldsl.artifacts import FILE_READERS

    if args.runner != "gramine" or not any(ds.reader in FILE_READERS for ds in plan.data):
        return plan
    from fldsl.runtime.data import relocate_csv
    from fldsl.runtime.keyservice import fetch_key, install_gramine_key

    data = relocate_csv(plan.data, ENCLAVE_DATA_DIR)
    address = _key_service(addresses, args.node)
    progress.emit("phase", name="data-key", detail=address)
    install_gramine_key(DATA_KEY, fetch_key(address, identity=identity, node_id=args.node, name=DATA_KEY,
                                            timeout=args.connect_timeout))
    log.info("data key installed (from %s); reading csv data from %s", address, ENCLAVE_DATA_DIR)
    for spec in data:
        if spec.reader in ("csv", "parquet"):
            _check_protected(spec)
    return plan.model_copy(update={"data": data})


def _preload_tensorflow() -> None:
    try:
        import tensorflow  # noqa: F401
    except Exception:  # the role's own import reports any problem properly
        log.debug("background TensorFlow import failed", exc_info=True)


def run_node(args: argparse.Namespace, progress: Any, stop: threading.Event,
             security: ChannelSecurity | None = None, verifier_for: Callable[..., Any] | None = None,
             audit_messages: bool = True) -> dict[str, Any]:
    """The node. ``security`` and ``verifier_for`` (PeerVerifier's signature) default to the attested
    mutual TLS and the pins' verifier; only a Python caller can pass others (main's docstring)."""
    from fldsl.artifacts import Pins, Plan, Policy, load_model, node_dir
    from fldsl.runtime.attestation.ratls import make_identity
    from fldsl.runtime.attestation.verify import PeerVerifier
    from fldsl.runtime.audit import AuditingProgress, AuditLog
    from fldsl.runtime.checkpoint import CheckpointStore
    from fldsl.runtime.roles import role_main
    from fldsl.runtime.roles.common import PeerRestarted, RoleContext, RollbackRequested
    from fldsl.runtime.transport import Transport, load_addresses
    from fldsl.runtime.transport.channel import MUTUAL_TLS

    check_interpreter()
    ndir = Path(args.node_dir) if args.node_dir is not None else node_dir(args.build, args.node)
    if not ndir.is_dir():
        raise NodeError(f"{ndir}: no such folder (is `{args.node}` a node of this build?)")
    plan = load_model(Plan, ndir / "plan.json")
    policy = load_model(Policy, ndir / "policy.json")
    pins = load_model(Pins, ndir / "pins.json")
    if plan.node != args.node or policy.node != args.node:
        raise NodeError(f"{ndir}: plan/policy are for {plan.node}/{policy.node}, not {args.node}", EXIT_TRUST)
    progress.emit("started", role=plan.role, pipeline=plan.pipeline, pid=os.getpid())
    # Importing TensorFlow takes seconds: overlap it with attestation and waiting for the peers. Inside
    # Gramine, only with the wait: dlopen keeps the GIL while Gramine hashes TensorFlow's 800 MB of
    # libraries, which stalled attestation by half a minute; started once the transport listens and dials,
    # it delays the peers' handshakes by seconds at most.
    preload = plan.role != "distributed.chief"  # the chief only reads and streams data
    if preload and args.runner != "gramine":
        threading.Thread(target=_preload_tensorflow, daemon=True, name="tf-import").start()

    progress.emit("phase", name="attest")
    manifest = check_artifacts(ndir, args)
    plan = bind_data(plan, args.data_bindings)  # after the check: the measured plan is the file on disk
    me = pins.nodes.get(args.node)
    if me is None:
        raise NodeError(f"pins.json has no identity for {args.node}; recompile the pipeline", EXIT_TRUST)
    backend, roots = _backend(args, manifest, me, [p.id for p in plan.peers])
    digest = pins.digest()
    identity = make_identity(backend, node_id=args.node, pins_digest=digest)
    predicting: dict[str, Any] | None = None
    if args.predict is not None:  # the node's own model, checked against its plan before any peer is met
        from fldsl.runtime.predict import PredictError, open_node_model, predict_plan

        progress.emit("phase", name="model", detail=str(args.predict))
        try:
            part = open_node_model(Path(args.predict), plan, backend.sealing_key())
        except PredictError as e:
            raise NodeError(str(e), EXIT_TRUST if e.exit_code == EXIT_TRUST else EXIT_INPUT) from None
        plan = predict_plan(plan)
        predicting = {"part": part, "out": args.predict_out or args.run_dir / "scores.csv"}
    progress.emit("attested", backend=backend.kind, simulated=backend.kind == "sim", runner=args.runner)
    make_verifier = verifier_for or PeerVerifier
    verifier = make_verifier(pins, policy.attestation, sim_roots=roots, own_pins_digest=digest)
    addresses = load_addresses(args.addresses)
    plan = provision_data(args, plan, identity, addresses, progress)
    from fldsl.runtime.csvschema import check_schemas

    # Declared schemas are checked before the node connects to anyone: a party's file that does not match
    # the pipeline the parties agreed on is reported here, with every problem, not after its peers waited.
    check_schemas(plan.data)

    progress.emit("phase", name="connect", detail=", ".join(p.id for p in plan.peers))
    # The signed record of what crosses each link (docs/trust.md "The audit record"), sealed with the
    # party's key; prediction runs keep one too (activations cross there as well).
    audit = AuditLog(args.run_dir, node_id=args.node, sealing_root=backend.sealing_key(), policy=policy,
                     identity=identity)
    progress = AuditingProgress(progress, audit)

    def renew() -> Any:  # a fresh key and quote before the 1-day certificate lapses (long runs reconnect)
        fresh = make_identity(backend, node_id=args.node, pins_digest=digest)
        audit.set_identity(fresh)
        return fresh

    try:
        transport = Transport(
            node_id=args.node, policy=policy, peers=plan.peers, identity=identity, verifier=verifier,
            addresses=addresses, connect_timeout_s=args.connect_timeout, renew_identity=renew,
            listen_host=_listen_host(args, addresses), security=security or MUTUAL_TLS)
        if audit_messages:  # off only in the bench's plain mode (main's docstring): it still opens its record
            transport.attach_audit(audit)
        transport.start()
    except BaseException:
        audit.close()  # what it holds (its opening records) is written and signed
        raise
    closed = False  # closed with the full flush on success; the finally below closes it on any failure
    if preload and args.runner == "gramine":
        threading.Thread(target=_preload_tensorflow, daemon=True, name="tf-import").start()
    try:
        links = {}
        deadline = time.monotonic() + args.connect_timeout
        for peer in plan.peers:
            while True:  # wait in slices so Ctrl-C is honoured while peers come up
                if stop.is_set():
                    from fldsl.runtime.roles.common import Interrupted

                    raise Interrupted()
                try:
                    links[peer.id] = transport.link(peer.id, timeout=1.0)
                    break
                except Exception as e:  # only "not yet" is retried
                    from fldsl.runtime.transport import PeerUnreachable

                    if not isinstance(e, PeerUnreachable):
                        raise
                    if time.monotonic() > deadline:
                        # The transport gives its verdict at its own deadline, after its last attempt and
                        # back-off: a certificate refused for the whole window is a trust failure, not
                        # "unreachable". Wait for that verdict instead of racing it.
                        links[peer.id] = transport.link(peer.id, timeout=VERDICT_GRACE_S)
                        break
            progress.emit("connected", peer=peer.id)
        # Checkpoints are always sealed, whatever at_rest says: they hold the model.
        # Bound to the pins digest: it changes with any plan, policy or measurement of the deployment, so
        # another pipeline's checkpoints (same node ids) are refused, naming both digests.
        store = None if predicting is not None else CheckpointStore(
            args.run_dir / "checkpoints" / args.node, node_id=args.node, key=backend.sealing_key(),
            pipeline_digest=digest)
        ctx = RoleContext(plan=plan, policy=policy, links=links, progress=progress, store=store,
                          run_dir=args.run_dir, seal_key=backend.sealing_key(), stop=stop,
                          recv_timeout_s=args.recv_timeout, allow_rollback=args.allow_rollback)
        ctx.mark_links()
        main_fn = role_main(plan)
        if predicting is not None:
            from fldsl.runtime.roles import predict as predict_role

            ctx.cache["predict"] = predicting
            main_fn = predict_role.run
        restarts = 0
        while True:
            try:
                result = main_fn(ctx)
                break
            except PeerRestarted as e:
                if predicting is not None:  # nothing to resume: the peer lost its half of the alignment
                    raise NodeError(f"{e.peer} restarted during prediction; start every node again") from None
                # The peer process was restarted (it re-attested with a fresh key): run the role again;
                # it agrees on a checkpoint with the peer, rolls back to it and drops stale messages.
                restarts += 1
                if restarts > MAX_REJOINS:
                    raise NodeError(f"{e.peer} restarted {restarts} times during this run; giving up (at "
                                    f"most {MAX_REJOINS} rejoins: a peer that keeps restarting is crashing "
                                    "or misbehaving; see its log)") from None
                why = "asks to agree again" if isinstance(e, RollbackRequested) else "restarted"
                log.warning("%s %s: rejoining (resume agreement again)", e.peer, why)
                progress.emit("phase", name="rejoin", detail=f"{e.peer} {why}")
                ctx.rejoining = e.peer
                ctx.mark_links()
        stats = transport.stats
        result["bytes_sent"] = {k: v.bytes_sent for k, v in sorted(stats.items()) if v.bytes_sent}
        result["bytes_received"] = {k: v.bytes_received for k, v in sorted(stats.items()) if v.bytes_received}
        result["exports"] = dict(ctx.exports)
        result["owner_exports"] = dict(ctx.owner_exports)
        result["audit"] = str(audit.dir)
        # Let the peers read what we sent last before our end of the streams goes away.
        transport.close(flush_timeout=10.0)
        closed = True
        return result
    except BaseException as e:
        # Say why before the streams close: the peers fail as soon as they notice, and the launcher stops
        # this node then; it must already know the cause (a bad input, a trust refusal), not only theirs.
        raise _report(e, progress) from e
    finally:
        if not closed:
            transport.close(flush_timeout=1.0)
        audit.close()  # after the links closed: nothing more can be sent or received


class _Reported(Exception):
    """A failure whose error event was already emitted (``code``: the exit code it announced)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _report(exc: BaseException, progress: Progress) -> _Reported:
    code, message = _classify(exc)
    if code == EXIT_FAILED and message.startswith("internal error"):
        log.error("node failed", exc_info=exc)
    else:
        log.error("%s", message)
    progress.emit("error", message=message, code=code)
    return _Reported(code)


def _classify(exc: BaseException) -> tuple[int, str]:
    from fldsl.artifacts import ArtifactError
    from fldsl.runtime.attestation.backend import AttestationError
    from fldsl.runtime.checkpoint import CheckpointError
    from fldsl.runtime.data import DataError
    from fldsl.runtime.keyservice import KeyReplyError, KeyServiceError
    from fldsl.runtime.roles.common import Interrupted, RoleError
    from fldsl.runtime.sealing import SealError
    from fldsl.runtime.transport import FlowRefused, TransportError, is_trust_failure

    if isinstance(exc, NodeError):
        return exc.code, str(exc)
    if isinstance(exc, Interrupted | KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted; the last checkpoint is kept"
    if is_trust_failure(exc):
        return EXIT_TRUST, f"trust failure: {exc}"
    if isinstance(exc, FlowRefused):
        return EXIT_TRUST, f"policy violation: {exc}"
    if isinstance(exc, AttestationError | SealError | CheckpointError | KeyReplyError):
        return EXIT_TRUST, f"trust failure: {exc}"
    if isinstance(exc, KeyServiceError):  # unavailable, or the key could not be installed (KeyRefused: above)
        return EXIT_FAILED, str(exc)
    if isinstance(exc, ArtifactError | RoleError | DataError | TransportError):
        return (2 if isinstance(exc, DataError) else EXIT_FAILED), str(exc)  # 2: input error (bad data)
    if isinstance(exc, PermissionError) and _in_gramine():
        # Gramine refuses a file that is neither trusted nor allowed, or a trusted one whose content no
        # longer matches the hash signed into the manifest.
        return EXIT_TRUST, (f"trust failure: the enclave refused to open {exc.filename}: it changed after "
                            "signing or is not in the signed manifest (sign the build again)")
    return EXIT_FAILED, f"internal error: {type(exc).__name__}: {exc} (see the node log)"


# Ways to run code beside the measured package, which the node refuses when they took effect.
_ENV_HOOKS = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "PYTHONINSPECT")


def check_interpreter() -> None:
    """Refuse to run where the interpreter loaded code the measurement does not cover: a sitecustomize or
    usercustomize module (PYTHONPATH, user site) or PYTHON* variables that steer imports. `fldsl run` starts
    nodes with ``python -I`` and Gramine's manifest fixes ``-I``, so these are off; a host that starts the
    node some other way is told why it is refused."""
    found = [f"{m} ({getattr(sys.modules[m], '__file__', '?')})"
             for m in ("sitecustomize", "usercustomize") if m in sys.modules]
    if not sys.flags.ignore_environment:
        found += [f"{v}={os.environ[v]}" for v in _ENV_HOOKS if os.environ.get(v)]
    if found:
        raise NodeError("refusing to start: this Python runs code outside the measured fldsl package ("
                        + ", ".join(found) + "); start the node in isolated mode (python -I), as fldsl run "
                        "does", EXIT_TRUST)


def _in_gramine() -> bool:
    return Path("/dev/attestation").exists()


def main(argv: list[str] | None = None, *, security: ChannelSecurity | None = None,
         verifier_for: Callable[..., Any] | None = None, audit_messages: bool = True) -> int:
    """``python -m fldsl.runtime.node``. The keywords exist for the bench's plain mode (fldsl.bench.node),
    which measures the node without attestation, TLS and the per-message audit record: no flag or file of
    the node reaches them."""
    # Before TensorFlow is imported anywhere: quiet C++ logs, and keep oneDNN from printing its banner.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {args.node} %(levelname)s %(name)s: %(message)s")
    from fldsl.runtime.progress import Progress

    progress = Progress(args.node, log=logging.getLogger("fldsl.progress"))
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():  # second Ctrl-C: stop waiting for the step to finish
            raise KeyboardInterrupt
        log.warning("signal %d: stopping at the next step boundary", signum)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    try:
        result = run_node(args, progress, stop, security, verifier_for, audit_messages)
    except _Reported as r:
        return r.code
    except BaseException as e:  # every failure becomes an exit code + one clear line
        return _report(e, progress).code
    progress.emit("done", **result)
    return EXIT_OK


def _exit(code: int) -> None:
    """Flush, then exit; if non-daemon threads (gRPC, TensorFlow) keep the interpreter alive, force it."""
    sys.stdout.flush()
    sys.stderr.flush()
    timer = threading.Timer(10.0, lambda: os._exit(code))
    timer.daemon = True
    timer.start()
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
